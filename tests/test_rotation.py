"""rotation.py: the pretext labels, and the script as a user runs it."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import common
import rotation
from conftest import ROOT, differences_between_processes, script_env, torchrun


# -- pretext data ---------------------------------------------------------------
def test_four_rotations_match_rot90_applied_k_times():
    torch.manual_seed(0)
    x = torch.rand(3, 2, 5, 5)
    views, labels = rotation.rotate_batch(x, 4)
    assert views.shape == (12, 2, 5, 5)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for row, (view, k) in enumerate(zip(views, labels)):
        expected = x[row % 3]
        for _ in range(int(k)):  # k quarter turns, one at a time
            expected = torch.rot90(expected, 1, dims=(1, 2))
        assert torch.equal(view, expected)
    # A quarter turn is counter-clockwise: the top-right pixel goes to the top-left.
    grid = torch.arange(4.0).view(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    assert rotation.rotate_batch(grid, 4)[0][1, 0].tolist() == [[1.0, 3.0], [0.0, 2.0]]


def test_two_angles_are_0_and_180():
    x = torch.rand(2, 3, 4, 4)
    views, labels = rotation.rotate_batch(x, 2)
    assert labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(views[:2], x) and torch.equal(views[2:], x.flip(2, 3))


def _smooth(n, size):
    return F.interpolate(torch.rand(n, 3, 4, 4), size=(size, size), mode="bicubic", align_corners=True)


def test_eight_angles_are_multiples_of_45_degrees_inside_the_disc():
    torch.manual_seed(0)
    size = 32
    x = _smooth(2, size)
    views, labels = rotation.rotate_batch(x, 8)
    assert labels.tolist() == [k for k in range(8) for _ in range(2)]
    disc = rotation._disc(size, x.device, x.dtype)
    for k in range(0, 8, 2):  # exact quarter turns, cut to the disc
        assert torch.allclose(views[2 * k:2 * k + 2], torch.rot90(x, k // 2, dims=(2, 3)) * disc)
    # 45 degrees twice is a quarter turn (up to bilinear resampling, away from the rim).
    twice = rotation._rotate(views[2:4], 45.0)
    inner = rotation._disc(size, x.device, x.dtype) * (torch.arange(size) - size / 2 + 0.5).abs().le(10).float()
    inner = inner * inner.T
    assert ((twice - torch.rot90(x, 1, dims=(2, 3))) * inner).abs().max() < 0.05
    # Every view has the same empty corners, so corners do not give the label away.
    assert (views[:, :, 0, 0] == 0).all()


def test_rotation_rejects_non_square_images():
    with pytest.raises(ValueError):
        rotation.rotate_batch(torch.rand(1, 3, 4, 6))


# -- the script -----------------------------------------------------------------
def tiny(folder, out, *extra):
    return ["--dataset", "folder", "--data-dir", str(folder), "--batch-size", "16", "--workers", "0",
            "--out", str(out), "--log-every", "0", *extra]


def test_end_to_end_writes_the_run_folder(tiny_folder, tmp_path):
    rotation.main(tiny(tiny_folder, tmp_path / "run", "--epochs", "2"))
    out = tmp_path / "run"
    for name in ("config.json", "log.jsonl", "checkpoint.pt", "encoder.pt", "eval.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "eval.json").read_text())
    for key in ("knn_top1", "linear_top1", "random_knn_top1", "random_linear_top1", "pretext_top1"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["steps"] == 2 * (160 // 16) and saved["method"] == "rotation"
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    progress = [l for l in lines if "loss" in l]
    assert progress[-1]["step"] == 20 and "images_per_s" in progress[-1]
    encoder = torch.load(out / "encoder.pt", weights_only=True)
    net, _ = common.build_backbone("small", 32)
    net.load_state_dict(encoder)  # the backbone alone, without the rotation head


def test_a_short_run_learns_the_pretext_task(tmp_path):
    """60 steps on the built-in shapes: rotation accuracy on held-out images far above 1/4."""
    results = rotation.main(["--out", str(tmp_path), "--max-steps", "60", "--batch-size", "64", "--no-eval",
                             "--log-every", "0"])
    assert results["pretext_top1"] > 0.5


def test_interrupted_and_resumed_run_ends_in_the_same_state(tiny_folder, tmp_path):
    rotation.main(tiny(tiny_folder, tmp_path / "straight", "--epochs", "2", "--no-eval"))
    rotation.main(tiny(tiny_folder, tmp_path / "split", "--epochs", "2", "--no-eval", "--max-steps", "13"))
    first = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert first["step"] == 13 and first["epoch"] == 1
    rotation.main(tiny(tiny_folder, tmp_path / "split", "--epochs", "2", "--no-eval", "--resume", str(tmp_path / "split")))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def test_sigterm_saves_a_checkpoint_and_resume_continues(tiny_folder, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "rotation.py", *tiny(tiny_folder, out, "--epochs", "1000", "--no-eval")],
                            cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120  # until a training step is logged
    while time.time() < deadline and '"step"' not in ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text() or ""):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and f"--resume {out}" in stdout
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step > 0
    rotation.main(tiny(tiny_folder, out, "--epochs", "1000", "--no-eval", "--resume", str(out), "--max-steps", str(step + 3)))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step + 3


def test_non_finite_loss_stops_with_a_clear_message(tiny_folder, tmp_path):
    with pytest.raises(common.RunError) as e:
        rotation.main(tiny(tiny_folder, tmp_path, "--lr", "1e30", "--epochs", "3", "--no-eval"))
    assert e.value.code == 1 and "Try a lower --lr" in str(e.value)


def run_script(*argv, timeout=300):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_script_runs_as_a_subprocess(tiny_folder, tmp_path):
    proc = run_script("rotation.py", *tiny(tiny_folder, tmp_path, "--max-steps", "4", "--angles", "8"))
    assert proc.returncode == 0, proc.stderr
    assert "rotation done" in proc.stdout and "random init" in proc.stdout
    assert json.loads((tmp_path / "eval.json").read_text())["steps"] == 4


@pytest.mark.parametrize("make_argv, needle", [
    (lambda d, t: ["--dataset", "folder", "--data-dir", str(t / "nowhere")], "does not exist"),
    (lambda d, t: ["--dataset", "folder", "--data-dir", str(t)], "no images found"),
    (lambda d, t: ["--dataset", "mnist"], "unknown dataset"),
    (lambda d, t: ["--backbone", "resnet9"], "unknown backbone"),
    (lambda d, t: ["--dataset", "folder", "--data-dir", str(d), "--image-size", "8"], "too small"),
    (lambda d, t: ["--angles", "3"], "--angles must be 2, 4 or 8"),
    (lambda d, t: ["--resume", str(t)], "no checkpoint.pt"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(tiny_folder, tmp_path, make_argv, needle):
    proc = run_script("rotation.py", *make_argv(tiny_folder, tmp_path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0 and needle in err, err


def test_two_process_torchrun_on_cpu(tiny_folder, tmp_path):
    proc = torchrun("rotation.py", *tiny(tiny_folder, tmp_path, "--max-steps", "3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert differences_between_processes(tmp_path) == []
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("rotation done") == 1  # rank 0 alone prints and evaluates
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3
    # 80 images per process per epoch at batch 16: both processes stepped together.
    assert json.loads((tmp_path / "eval.json").read_text())["steps"] == 3


def test_the_eight_angle_encoder_is_evaluated_on_discs_like_its_training_views():
    backbone = torch.nn.Identity()
    x = torch.rand(2, 3, 16, 16)
    four, eight = rotation.encoder_of(backbone, 4), rotation.encoder_of(backbone, 8)
    normalise = common.Normalize()
    assert torch.equal(four(x), normalise(x))
    disc = rotation._disc(16, x.device, x.dtype)
    assert torch.allclose(eight(x), normalise(x * disc))
    assert torch.equal(eight(x)[:, :, 0, 0], normalise(torch.zeros(2, 3, 1, 1)).view(2, 3))  # corners black
