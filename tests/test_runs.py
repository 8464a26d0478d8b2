"""Long runs that survive their users: resume restores the run, run folders are never
clobbered, signals at any point, checkpoints by time, one line for every bad input.

Where a test is about exit codes, signals or tracebacks it runs the script as a
subprocess, as a user would."""
import json
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import common
import rotation
from conftest import PER_PROCESS, ROOT, checkpoint_tensors, differences_between_processes, script_env

SCRIPTS = ["rotation.py", "patch_location.py", "jigsaw.py", "inpainting.py", "colorization.py", "split_brain.py",
           "video_colorization.py", "simclr.py", "moco.py", "common.py", "builtin_data.py",
           *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.py"))]


def tiny(folder, out, *extra):
    return ["--dataset", "folder", "--data-dir", str(folder), "--batch-size", "16", "--workers", "0",
            "--out", str(out), "--log-every", "0", *extra]


def script(*argv, timeout=300):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=timeout)


def start(*argv):
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_line_error(proc, code=2):
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and err.count("\n") == 0 and err.startswith("error: "), err
    return err


def wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def logged_steps(out: Path) -> list[int]:
    """Steps of the training records in log.jsonl (the kNN monitor's records, which also
    carry a step, are left out)."""
    path = out / "log.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return [r["step"] for r in records if "step" in r and "knn_top1" not in r]


# -- every script answers --help ------------------------------------------------
def test_every_script_answers_help_and_exits_0():
    procs = {name: start(name, "--help") for name in SCRIPTS}  # all at once: each is mostly `import torch`
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-1500:])
        assert "usage:" in out and "Traceback" not in err, name


def test_moco_help_shows_the_schedule_option_with_its_percent_signs(capsys):
    import moco
    with pytest.raises(SystemExit) as e:
        moco.main(["--help"])
    assert e.value.code == 0
    assert "60% and 80%" in capsys.readouterr().out


# -- resume restores the run ------------------------------------------------------
def test_bare_resume_continues_with_the_runs_own_options(tiny_folder, tmp_path):
    out = tmp_path / "run"
    rotation.main(tiny(tiny_folder, out, "--batch-size", "32", "--angles", "2", "--lr", "0.05", "--max-steps", "2",
                       "--no-eval"))
    results = rotation.main(["--resume", str(out), "--max-steps", "4"])  # nothing else typed
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and results["steps"] == 4
    assert (state["args"]["batch_size"], state["args"]["angles"], state["args"]["lr"]) == (32, 2, 0.05)
    assert state["args"]["eval"] is False and state["args"]["data_dir"] == str(tiny_folder)
    assert state["model"]["head.weight"].shape[0] == 2  # the 2-angle head, loaded without a size mismatch


def test_resume_refuses_options_that_change_the_run_naming_each(tiny_folder, tmp_path):
    out = tmp_path / "run"
    rotation.main(tiny(tiny_folder, out, "--max-steps", "1", "--no-eval"))
    before = (out / "checkpoint.pt").read_bytes()
    proc = script("rotation.py", "--resume", str(out), "--data-dir", str(tmp_path), "--batch-size", "64",
                  "--epochs", "1")
    err = one_line_error(proc)
    assert f"--data-dir {tmp_path} (the run has {tiny_folder})" in err
    assert "--batch-size 64 (the run has 16)" in err and "--epochs 1 (the run has 6)" in err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_accepts_the_options_that_may_change_and_says_so(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rotation.main(tiny(tiny_folder, out, "--epochs", "2", "--max-steps", "3", "--no-eval"))
    capsys.readouterr()
    rotation.main(["--resume", str(out), "--epochs", "3", "--workers", "1", "--log-every", "7", "--no-eval",
                   "--device", "cpu", "--batch-size", "16", "--max-steps", "5"])
    said = capsys.readouterr().out
    assert "resumed" in said and "--epochs 2 -> 3" in said and "--workers 0 -> 1" in said
    assert "--batch-size" not in said  # typed, but equal to the run's
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5 and state["args"]["epochs"] == 3 and state["args"]["workers"] == 1


def test_config_json_is_written_once_and_resumes_are_appended(tiny_folder, tmp_path):
    out = tmp_path / "run"
    rotation.main(tiny(tiny_folder, out, "--max-steps", "2", "--no-eval"))
    first = json.loads((out / "config.json").read_text())
    rotation.main(["--resume", str(out), "--max-steps", "3", "--epochs", "7"])
    rotation.main(["--resume", str(out), "--max-steps", "4"])
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in first} == first  # the record of how the run started is untouched
    assert [r["at_step"] for r in config["resumes"]] == [2, 3]
    assert config["resumes"][0]["changed"] == {"epochs": [6, 7]} and config["resumes"][1]["changed"] == {}
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [2, 3]


def test_resume_from_one_folder_into_another(tiny_folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    rotation.main(tiny(tiny_folder, a, "--max-steps", "3", "--no-eval"))
    a_checkpoint = (a / "checkpoint.pt").read_bytes()
    rotation.main(["--resume", str(a), "--out", str(b), "--max-steps", "5"])
    assert torch.load(b / "checkpoint.pt", weights_only=True)["step"] == 5
    assert (a / "checkpoint.pt").read_bytes() == a_checkpoint  # A is left as it was
    config = json.loads((b / "config.json").read_text())
    assert config["resumes"][0]["from"] == str(a) and config["resumes"][0]["at_step"] == 3
    assert logged_steps(b)[:3] == [1, 2, 3]  # B's log starts with A's
    # A folder that holds a checkpoint of its own is not a place to continue in.
    with pytest.raises(common.RunError, match="holds another run's checkpoint"):
        rotation.main(["--resume", str(b), "--out", str(a)])


def test_resume_of_a_folder_without_a_checkpoint_or_of_another_method(tiny_folder, tmp_path):
    import moco
    with pytest.raises(common.RunError, match="no checkpoint.pt"):
        rotation.main(["--resume", str(tmp_path)])
    rotation.main(tiny(tiny_folder, tmp_path / "rot", "--max-steps", "1", "--no-eval"))
    with pytest.raises(common.RunError, match="holds a rotation run, not a moco run"):
        moco.main(["--resume", str(tmp_path / "rot")])


# -- run folders are never clobbered ------------------------------------------------
def test_out_naming_a_folder_with_a_checkpoint_exits_2_and_touches_nothing(tiny_folder, tmp_path):
    out = tmp_path / "run"
    rotation.main(tiny(tiny_folder, out, "--max-steps", "3", "--no-eval"))
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    proc = script("rotation.py", *tiny(tiny_folder, out, "--max-steps", "1"))
    err = one_line_error(proc)
    assert f"--resume {out}" in err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == files


def test_default_run_folders_of_runs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    import datetime

    class Noon(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 12, 0, 0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common.datetime, "datetime", Noon)
    args = common.parse_args(common.Args, ["--log-every", "0"])
    first = common.Run(args, "demo")
    first.close()
    second = common.Run(args, "demo")
    second.close()
    assert (first.out, second.out) == (Path("runs/demo-20260101-120000"), Path("runs/demo-20260101-120000-2"))


# -- preemption -----------------------------------------------------------------------
def test_sigterm_mid_epoch_then_bare_resume_equals_the_uninterrupted_run(tiny_folder, tmp_path):
    """A run with non-default options, stopped by SIGTERM inside an epoch and continued
    with nothing but --resume DIR, ends with the encoder of the run never stopped. A
    second copy is killed hard (SIGKILL): --save-every had saved it inside the epoch."""
    # 96 px (the 32 px images upscaled) makes a step slow enough to be hit in the middle of a run.
    options = tiny(tiny_folder, "{out}", "--image-size", "96", "--epochs", "3", "--angles", "2", "--lr", "0.05",
                   "--batch-size", "32", "--seed", "3", "--no-eval")  # 5 steps an epoch, 15 in all

    def argv(out, *extra):
        return ["rotation.py", *[str(out) if a == "{out}" else a for a in options], *extra]

    straight = script(*argv(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    reference = torch.load(tmp_path / "straight" / "encoder.pt", weights_only=True)

    for how, extra in ((signal.SIGTERM, ()), (signal.SIGKILL, ("--save-every", "1e-9"))):
        out = tmp_path / how.name
        proc = start(*argv(out, *extra))
        # Signal once step 7, 8, 12 or 13 is done: the checkpoint then falls inside an epoch.
        wait_for(lambda: proc.poll() is not None or any(s % 5 in (2, 3) and s > 5 for s in logged_steps(out)))
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(how)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == (128 + how if how == signal.SIGTERM else -how), stderr[-2000:]
        stopped = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
        assert 5 < stopped < 15 and stopped % 5 != 0, stopped  # inside the second or third epoch
        if how == signal.SIGTERM:
            assert "Traceback" not in stderr and f"--resume {out}" in stdout
        resumed = script("rotation.py", "--resume", str(out))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"at step {stopped}" in resumed.stdout
        encoder = torch.load(out / "encoder.pt", weights_only=True)
        for key in reference:
            assert torch.equal(reference[key], encoder[key]), (how.name, key)


@pytest.mark.parametrize("method, options", [
    ("rotation.py", ()),
    ("moco.py", ("--bn-splits", "2", "--queue-size", "256")),  # f_k and the queue: state outside DDP
])
def test_two_processes_stopped_by_sigterm_mid_epoch_resume_as_the_uninterrupted_run(tiny_folder, tmp_path, method,
                                                                                     options):
    """torchrun passes SIGTERM to every process; they finish the step together, save and
    stop. A bare --resume then ends where the run that was never stopped ends, on every
    process: rank 0 in everything it holds, rank 1 too, but for its batch-norm running
    statistics (the checkpoint holds rank 0's)."""
    def argv(out, *extra):  # 20 steps an epoch: 80 images per process, 4 at a time
        return [method, *tiny(tiny_folder, out, "--batch-size", "4", "--epochs", "3", "--no-eval", *options), *extra]

    def launch(*argv):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "tests/dist_state.py", *map(str, argv)], cwd=ROOT, env=script_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finished(proc):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        return stdout

    finished(launch(*argv(tmp_path / "straight")))
    out = tmp_path / "stopped"
    proc = launch(*argv(out))
    wait_for(lambda: proc.poll() is not None or any(s > 21 for s in logged_steps(out)))  # inside the second epoch
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    stopped = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 21 < stopped < 60 and stopped % 20 != 0, (stopped, proc.returncode, stdout[-2000:], stderr[-4000:])
    assert f"stopped at step {stopped}; continue with: torchrun --nproc_per_node=2 {method} --resume {out}" in stdout
    assert f"at step {stopped}" in finished(launch(method, "--resume", out))
    for rank in (0, 1):
        straight, resumed = (dict(checkpoint_tensors(torch.load(folder / f"state-rank{rank}.pt", weights_only=True)))
                             for folder in (tmp_path / "straight", out))
        assert straight.keys() == resumed.keys()
        differ = [name for name in straight if not torch.equal(straight[name], resumed[name])
                  and not (rank > 0 and name.endswith(PER_PROCESS))]
        assert differ == [], (rank, differ)
    assert differences_between_processes(out) == []
    rngs = torch.load(out / "checkpoint.pt", weights_only=True)["rng"]  # augmentations differ between processes
    assert len(rngs) == 2 and not torch.equal(rngs[0]["cpu"], rngs[1]["cpu"])


def test_a_signal_that_reaches_one_process_just_after_the_processes_agreed_stops_them_together(tiny_folder,
                                                                                                tmp_path):
    """A signal handled on one process between the collective in which the processes agree
    to go on and the decision it feeds must wait for the next step's agreement: acted on at
    once, that process alone went into the checkpoint's collective while the other went on
    to the next step, and both waited there until torchrun killed them (the checkpoint then
    stayed at the epoch end). Here rank 1 is signalled right there after step 25 of 60."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/dist_state.py", "rotation.py",
                             *map(str, tiny(tiny_folder, out, "--batch-size", "4", "--epochs", "3", "--no-eval"))],
                            cwd=ROOT, env={**script_env(), "SIGTERM_AFTER_AGREEMENT": "1:25"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # torchrun kills its processes 30 s after a SIGTERM they do not end on
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
        raise AssertionError("the processes hung: " + stdout[-1500:] + stderr[-1500:]) from None
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 26, (stdout[-1500:], stderr[-3000:])
    assert "stopped at step 26; continue with: torchrun --nproc_per_node=2 rotation.py --resume" in stdout
    assert "Unable to shutdown" not in stderr  # torchrun did not have to kill them
    assert differences_between_processes(out) == []  # each wrote its state at step 26


def _slow_folder(root: Path, n: int = 1500) -> Path:
    """Copies of one 640 x 480 JPEG, so that decoding them all takes seconds."""
    import io
    from PIL import Image
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=torch.Generator().manual_seed(0)),
                                        size=(480, 640), mode="bilinear")
    buffer = io.BytesIO()
    Image.fromarray((x[0] * 255).to(torch.uint8).permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    for split, count in (("train", n), ("test", n // 10)):
        for i in range(count):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:05d}.jpg").write_bytes(data)
    return root


def _stopped_within_seconds(proc, when: str, seconds: float = 10.0):
    """Wait for `when` on stdout, send SIGTERM, and return (seconds to exit, stdout, stderr)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if when in line:
            break
    else:
        raise AssertionError("never saw " + when + ": " + "".join(lines) + proc.stderr.read()[-2000:])
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    took = time.time() - sent
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert took < seconds, took
    return took, "".join(lines) + rest, err


def test_sigterm_while_decoding_the_data_leaves_at_once(tmp_path):
    root = _slow_folder(tmp_path / "photos")
    proc = start("rotation.py", "--dataset", "folder", "--data-dir", str(root), "--image-size", "64",
                 "--workers", "2", "--out", str(tmp_path / "run"))
    _, out, _ = _stopped_within_seconds(proc, "decoding")
    assert "no checkpoint was saved yet" in out
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_sigterm_during_the_final_evaluation_leaves_at_once(tmp_path):
    out = tmp_path / "run"
    proc = start("rotation.py", "--max-steps", "2", "--out", str(out), "--log-every", "0")
    _, said, _ = _stopped_within_seconds(proc, "rotation accuracy on the test split")
    assert "the checkpoint of step 2 is kept" in said
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2 and (out / "encoder.pt").is_file()
    assert not (out / "eval.json").exists()


def test_a_signal_is_not_lost_between_runs_started_in_one_process(tmp_path):
    """A sweep that calls main() twice: SIGTERM in the first run's evaluation ends the
    process; the second run never starts."""
    code = ("import common, rotation\n"
            "def sweep():\n"
            "    for i in range(2):\n"
            "        print('starting run', i, flush=True)\n"
            f"        rotation.main(['--max-steps', '2', '--log-every', '0', '--out', r'{tmp_path}/run' + str(i)])\n"
            "common.cli(sweep)\n")
    proc = start("-c", code)
    _, said, _ = _stopped_within_seconds(proc, "rotation accuracy on the test split")
    assert "starting run 1" not in said


def test_a_second_signal_stops_at_once(tiny_folder, tmp_path):
    out = tmp_path / "run"
    proc = start("rotation.py", *tiny(tiny_folder, out, "--image-size", "96", "--epochs", "100", "--no-eval"))
    assert wait_for(lambda: len(logged_steps(out)) >= 2)
    # Two signals in one go (two kinds, so they cannot merge into one): the first asks for a
    # checkpoint after the step, the second leaves now.
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-2000:]
    assert "saving a checkpoint after this step" in stdout and "stopping now" in stdout


def test_the_same_signal_twice_within_a_second_is_one_request(tiny_folder, tmp_path):
    """Ctrl-C under torchrun reaches each process twice: from the terminal and passed on by
    torchrun. The repeat still lets the step finish and the checkpoint be written."""
    out = tmp_path / "run"
    proc = start("rotation.py", *tiny(tiny_folder, out, "--image-size", "96", "--epochs", "100", "--no-eval"))
    assert wait_for(lambda: len(logged_steps(out)) >= 2)
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:  # the first signal has been handled: the next one is a second call
        if "saving a checkpoint after this step" in line:
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-2000:]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert f"stopped at step {step}; continue with: python rotation.py --resume {out}" in stdout, stdout[-2000:]
    assert "stopping now" not in stdout


def test_main_from_python_leaves_no_handler_behind_and_raises_a_run_error(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(common.RunError) as e:  # fails inside the run, after its handlers were installed
        rotation.main(["--dataset", "folder", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "no images found" in str(e.value)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert not common._OPEN_RUNS


# -- checkpoints by time, and never from diverged weights --------------------------
def _toy_run(tmp_path, *extra):
    args = common.parse_args(common.Args, ["--out", str(tmp_path), "--epochs", "4", "--batch-size", "4",
                                           "--log-every", "0", *extra])
    run = common.Run(args, "toy")
    data = common.TensorImages(torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.arange(8))
    return run, run.loader(data), nn.Linear(2, 2)


def test_save_every_writes_checkpoints_inside_an_epoch(tmp_path):
    run, loader, model = _toy_run(tmp_path, "--save-every", "1e-9")  # due after every step
    saved = []
    try:
        for step, _ in run.steps(loader, {"model": model}):
            if step > 0:
                saved.append(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"])
            run.log(4)
    finally:
        run.close()
    assert saved == [1, 2, 3, 4, 5, 6, 7]  # 2 steps an epoch: every odd step is inside an epoch


def test_non_finite_weights_are_never_saved_and_the_kept_checkpoint_is_named(tmp_path):
    run, loader, model = _toy_run(tmp_path)
    with torch.no_grad():
        model.weight.fill_(0.5)
    with pytest.raises(common.RunError) as e:
        try:
            for step, _ in run.steps(loader, {"model": model}):
                if step == 2:  # the update of step 3 (of epoch 2) diverges
                    with torch.no_grad():
                        model.weight.fill_(float("nan"))
                run.log(4)
        finally:
            run.close()
    assert e.value.code == 1 and "NaN or infinite by step 4" in str(e.value)
    assert "the checkpoint of step 2 is kept" in str(e.value)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and torch.isfinite(state["model"]["weight"]).all()


def test_a_non_finite_loss_names_the_step_of_the_kept_checkpoint(tiny_folder, tmp_path):
    # lr 1e30: the first update wrecks the network; the loss of a later step is NaN or infinite.
    proc = script("rotation.py", *tiny(tiny_folder, tmp_path / "run", "--lr", "1e30", "--epochs", "3",
                                       "--batch-size", "80", "--no-eval"))
    err = one_line_error(proc, code=1)
    assert ("the loss became" in err or "the weights became NaN" in err) and "Try a lower --lr" in err
    if (tmp_path / "run" / "checkpoint.pt").exists():
        state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
        assert f"the checkpoint of step {state['step']} is kept" in err
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# -- one line for every bad input ---------------------------------------------------
def _png_bomb(path: Path):
    """A PNG whose header claims 20000 x 10000 pixels, over PIL's decompression-bomb limit."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def _unreadable_folder(root: Path) -> Path:
    for split in ("train", "test"):
        for i in range(3):
            folder = root / split / f"c{i}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "a.jpg").write_bytes(b"not a jpeg at all")
    return root


@pytest.mark.parametrize("make_argv, needle", [
    (lambda t: ["--lr", "-1"], "--lr must be above 0"),
    (lambda t: ["--lr", "nan"], "--lr must be a finite number"),
    (lambda t: ["--workers", "-1"], "--workers must not be negative"),
    (lambda t: ["--device", "mps"], "--device mps"),
    (lambda t: ["--device", "cuda:7"], "--device cuda:7"),
    (lambda t: ["--image-size", "100000"], "--image-size 100000 is larger than"),
    (lambda t: ["--resume", str(t / "truncated")], "cannot be read"),
    (lambda t: ["--dataset", "folder", "--data-dir", str(_unreadable_folder(t / "bad"))], "can be read"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, make_argv, needle):
    (tmp_path / "truncated").mkdir()
    whole = tmp_path / "whole.pt"
    torch.save({"args": {}, "step": 1, "model": torch.zeros(1000)}, whole)
    (tmp_path / "truncated" / "checkpoint.pt").write_bytes(whole.read_bytes()[:300])
    proc = script("rotation.py", "--workers", "2", *make_argv(tmp_path), "--out", str(tmp_path / "out"))
    err = one_line_error(proc)
    assert needle in err, err


def test_unreadable_files_are_skipped_counted_once_and_never_duplicated(tiny_folder, tmp_path, capsys):
    import shutil
    root = tmp_path / "folder"
    shutil.copytree(tiny_folder, root)
    some_png = next((root / "train" / "house").glob("*.png"))
    (root / "train" / "house" / "broken.jpg").write_bytes(some_png.read_bytes()[:50])  # cut after its header
    _png_bomb(root / "train" / "tree" / "bomb.png")
    args = common.parse_args(common.Args, ["--dataset", "folder", "--data-dir", str(root), "--workers", "2"])
    data = common.load_image_data(args)
    said = capsys.readouterr().out
    assert "skipped 2 of 222 image files that cannot be read" in said and said.count("skipped") == 1
    assert len(data.train) == 160 and len(data.test) == 60
    flat = data.train.images.flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(flat)  # no image stands in for another
    proc = script("rotation.py", "--dataset", "folder", "--data-dir", str(root), "--max-steps", "1", "--no-eval",
                  "--out", str(tmp_path / "run"))  # and as a user runs it: no traceback
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "skipped 2 of 222" in proc.stdout and "bomb.png" not in proc.stderr


def test_files_checked_from_disk_skip_the_unreadable_and_count_the_small(tiny_folder, tmp_path, monkeypatch,
                                                                          capsys):
    import shutil
    root = tmp_path / "folder"
    shutil.copytree(tiny_folder, root)
    (root / "train" / "house" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    _png_bomb(root / "test" / "tree" / "bomb.png")
    monkeypatch.setattr(common, "_CACHE_BYTES", 0)  # too big for memory: read from disk as used
    args = common.parse_args(common.Args, ["--dataset", "folder", "--data-dir", str(root), "--image-size", "48"])
    data = common.load_image_data(args)
    said = capsys.readouterr().out
    assert isinstance(data.train, common.FolderImages) and len(data.train) == 160 and len(data.test) == 60
    assert "skipped 2 of 222" in said
    assert "220 of 220 images are smaller than --image-size 48" in said


def test_images_smaller_than_the_image_size_are_counted_and_said_once(tiny_folder, capsys):
    args = common.parse_args(common.Args, ["--dataset", "folder", "--data-dir", str(tiny_folder), "--image-size", "40",
                                           "--workers", "0"])
    common.load_image_data(args)
    said = capsys.readouterr().out
    assert said.count("smaller than --image-size 40") == 1 and "220 of 220 images" in said
    args.image_size = 32
    common.load_image_data(args)
    assert "smaller" not in capsys.readouterr().out


def test_a_davis_folder_annotated_on_the_first_frame_only(tmp_path):
    """The DAVIS-2017 test-dev layout: masks are propagated and drawn, J is not scored."""
    from PIL import Image
    clips, masks = common.make_videos(2, 8, 48, seed=0)
    for v in range(2):
        frames = tmp_path / "JPEGImages" / "480p" / f"video{v}"
        notes = tmp_path / "Annotations" / "480p" / f"video{v}"
        frames.mkdir(parents=True), notes.mkdir(parents=True)
        for t in range(8):
            Image.fromarray(clips[v, t].permute(1, 2, 0).numpy()).save(frames / f"{t:05d}.jpg")
        ids = Image.frombytes("P", (48, 48), masks[v, 0].numpy().tobytes())  # a DAVIS-2017 palette PNG
        ids.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * 756)
        ids.save(notes / "00000.png")
    videos = common.load_davis(tmp_path)
    assert all(m.shape == (1, 48, 48) for _, m in videos.values())
    proc = script("video_colorization.py", "--dataset", "davis", "--data-dir", str(tmp_path), "--image-size", "32",
                  "--crop", "0", "--batch-size", "4", "--max-steps", "2", "--out", str(tmp_path / "run"),
                  "--log-every", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "J not scored" in proc.stdout and (tmp_path / "run" / "strip.png").is_file()
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["J"] is None
