"""Every command a method's docstring shows parses and passes the file's own checks: each
is run for one step, on tiny data in place of the dataset it names, so that no documented
command can be refused (a check on sizes, flags or their combination fails at once)."""
import importlib
import shlex

import pytest

import common
from test_video_colorization import _davis_folder

METHODS = ("rotation", "patch_location", "jigsaw", "inpainting", "colorization", "split_brain",
           "video_colorization", "simclr", "moco")
TINY_BATCH = 16  # the tiny folder has 160 training images


def docstring_commands(method: str) -> list[list[str]]:
    """The options of each `python <method>.py ...` or `torchrun ... <method>.py ...` line of
    the module docstring, continuation lines (ending in a backslash) joined, comments cut."""
    lines = importlib.import_module(method).__doc__.splitlines()
    commands, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        words = shlex.split(line, comments=True) if line.split()[:1] in (["python"], ["torchrun"]) else []
        if f"{method}.py" in words:
            commands.append(words[words.index(f"{method}.py") + 1:])
        i += 1
    return commands


CASES = [(m, i, argv) for m in METHODS for i, argv in enumerate(docstring_commands(m))]


def test_every_method_shows_commands():
    for method in METHODS:
        assert len(docstring_commands(method)) >= 2, method


def option(argv: list[str], name: str, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def replaced(argv: list[str], name: str, value: str | None) -> list[str]:
    """argv with option `name` set to value (None: removed)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == name:
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out + ([name, value] if value is not None else [])


@pytest.mark.parametrize("method, index, argv", CASES, ids=[f"{m}-{i}" for m, i, _ in CASES])
def test_docstring_command_runs_a_step(method, index, argv, tiny_folder, tmp_path):
    module = importlib.import_module(method)
    if "--resume" in argv:  # continue a run: one made here, in the tiny folder, stands in for the one named
        first = module.main(["--dataset", "folder", "--data-dir", str(tiny_folder), "--batch-size", str(TINY_BATCH),
                             "--workers", "0", "--log-every", "0", "--max-steps", "1", "--no-eval",
                             "--out", str(tmp_path / "run")])
        assert first["steps"] == 1
        argv = replaced(argv, "--resume", str(tmp_path / "run"))
        assert module.main([*argv, "--max-steps", "2", "--no-eval"])["steps"] == 2
        return
    common.parse_args(module.Args, argv)  # as typed
    run = list(argv)
    dataset = option(run, "--dataset", module.Args.dataset)
    if dataset == "davis":
        davis = str(_davis_folder(tmp_path / "davis"))
        run = replaced(replaced(run, "--data-dir", davis), "--eval-dir", davis if "--eval-dir" in run else None)
    elif dataset != "shapes":  # a folder, or a torchvision dataset: the tiny folder stands in for either
        run = replaced(replaced(run, "--dataset", "folder"), "--data-dir", str(tiny_folder))
        run = [a for a in run if a != "--download"]
    if int(option(run, "--batch-size", module.Args.batch_size)) > TINY_BATCH and dataset != "shapes":
        run = replaced(run, "--batch-size", str(TINY_BATCH))
    for name, value in (("--workers", "0"), ("--out", str(tmp_path / "run")), ("--log-every", "0"),
                        ("--max-steps", "1")):
        run = replaced(run, name, value)
    result = module.main([*run, "--no-eval"])
    assert result["steps"] == 1
