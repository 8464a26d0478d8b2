"""Every method file reads the same way (STYLE.md): docstring, Args, then the lecture's
parts under the same banners in the same order, engineering the paper adds after them."""
import ast
import re

import pytest

from conftest import ROOT

METHODS = ("rotation", "patch_location", "jigsaw", "inpainting", "colorization", "split_brain",
           "video_colorization", "simclr", "moco")
SKELETON = ["Pretext data", "Model", "Loss", "Training", "Evaluation"]


@pytest.mark.parametrize("method", METHODS)
def test_the_same_banners_in_the_same_order(method):
    source = (ROOT / f"{method}.py").read_text()
    lines = source.splitlines()
    titles = [lines[i + 1][2:] for i in range(len(lines) - 2)
              if lines[i].startswith("# ----") and lines[i + 2].startswith("# ----")]
    heads = [re.split(r":", t)[0] for t in titles]
    assert heads[:len(SKELETON)] == SKELETON, heads
    assert all(h.startswith("Beyond the lecture") for h in heads[len(SKELETON):]), heads
    tree = ast.parse(source)
    assert isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant)  # the docstring
    first_banner = next(i for i, line in enumerate(lines) if line.startswith("# ----")) + 1
    args = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args"]
    assert args and args[0].lineno < first_banner  # Args comes before the lecture's parts
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defs[-1] == "main" and "train" in defs
    loss_section = source.split("# Loss")[1].split("# Training")[0]
    assert "def " in loss_section  # the loss is a function of its own, called by the loop by name


def test_a_method_runs_from_a_copy_of_its_file_and_common_py(tmp_path, tiny_folder):
    """What an engineer copies: the method file and common.py for their own data, plus
    builtin_data.py for the built-in data."""
    import shutil
    import subprocess
    import sys
    for name in ("rotation.py", "common.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}

    def run(*argv):
        return subprocess.run([sys.executable, "rotation.py", *argv, "--max-steps", "2", "--no-eval",
                               "--batch-size", "16", "--log-every", "0", "--workers", "0"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    alone = run("--dataset", "folder", "--data-dir", str(tiny_folder), "--out", "own")
    assert alone.returncode == 0, alone.stderr[-2000:]
    missing = run("--out", "builtin")  # the built-in data without its file: a clear failure, then it works
    assert missing.returncode == 2 and missing.stderr.startswith("error: the built-in data needs builtin_data.py")
    shutil.copy(ROOT / "builtin_data.py", tmp_path / "builtin_data.py")
    builtin = run("--out", "builtin2")
    assert builtin.returncode == 0, builtin.stderr[-2000:]
