"""benchmarks/compare.py: runs the methods' own scripts and tabulates their eval.json."""
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import ROOT, script_env


def test_compare_writes_the_table_and_reports_a_failed_method(tiny_folder, tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "benchmarks/compare.py", "--methods", "jigsaw", "rotation", "video_colorization",
         "--dataset", "folder", "--data-dir", str(tiny_folder), "--image-size", "32", "--max-steps", "2",
         "--extra", "--batch-size 16 --workers 0", "--out", str(out), "--result", str(tmp_path / "r" / "cmp.json")],
        cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "table.md").read_text()
    assert text in proc.stdout
    lines = text.splitlines()
    assert lines[0].startswith("Dataset folder") and "32 px" in lines[0] and "at most 2 steps" in lines[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"method", "rotation", "jigsaw", "video_colorization"}
    assert "skipped: give --davis-dir" in rows["video_colorization"]  # videos, off the built-in data

    # rotation: every figure in its row is read from its own eval.json.
    saved = json.loads((out / "rotation" / "eval.json").read_text())
    cells = [c.strip() for c in rows["rotation"].strip("|").split("|")]
    assert cells[1] == f"top1 {saved['pretext_top1']:.3g}"
    assert cells[2:6] == [f"{saved[k]:.3f}" for k in ("knn_top1", "random_knn_top1", "linear_top1",
                                                        "random_linear_top1")]
    assert cells[6] == (f"{saved['knn_top1'] - saved['random_knn_top1']:+.3f} / "
                        f"{saved['linear_top1'] - saved['random_linear_top1']:+.3f}")
    assert float(cells[7]) == round(saved["train_images_per_s"]) and saved["steps"] == 2
    assert cells[9].endswith("MB RSS") and float(cells[9].split()[0]) > 50  # torch alone takes more

    # jigsaw's 14 px tiles do not fit 32 px images: failed, with the method's own one-line reason.
    assert "failed (exit 2): error: --image-size 32 is too small" in rows["jigsaw"]
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == ["jigsaw", "rotation", "video_colorization"]
    assert results[2]["status"].startswith("skipped")  # videos need --davis-dir off the built-in data
    # The raw result renders, through report.py, as the very table the command printed.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report
    record = json.loads((tmp_path / "r" / "cmp.json").read_text())
    assert record["kind"] == "compare" and record["data"]["rows"] == results
    assert "rotation.py" in record["code"] and "common.py" in record["code"]
    # the command as a shell reads it: --extra's value quoted, so that it can be copied and run
    assert shlex.split(record["command"])[2:] == proc.args[2:]
    assert report.RENDER["compare"](record["data"]) + "\n" + record["provenance"] + "\n" == text
    assert [share for share, _ in results[1]["knn_curve"]][:1] == [0.0]  # the learning curve, from before training
    # Again with the same folder: finished runs are read back, not run again, even after a method
    # run again first (jigsaw failed); other options are refused.
    again = subprocess.run(proc.args, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "rotation: already run" in again.stdout
    assert json.loads((out / "results.json").read_text())[1] == results[1]
    other = subprocess.run([*proc.args[:-4], "--epochs", "1", *proc.args[-4:]], cwd=ROOT, env=script_env(),
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "holds a run of another compare" in other.stderr


def test_hooks_record_the_outermost_network_calls_with_their_inputs():
    """What the method's own code calls: modules with parameters, not those called inside
    them, not parameter-free ones; inputs copied, gradient mode and training mode kept;
    the optimizers it steps, replayed with their kind and settings (lr 0)."""
    import torch
    import torch.nn as nn
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import efficiency
    encoder = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    key_encoder = nn.Linear(4, 2).eval()
    x = torch.randn(5, 4)
    adam = torch.optim.Adam(encoder.parameters(), lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)
    with efficiency.NetworkCalls() as recorder:
        nn.ReLU()(x)  # no parameters: not a network
        encoder(x).sum().backward()
        adam.step()
        with torch.no_grad():
            key_encoder(x)
    given = x.clone()
    x.add_(1)  # the method changing its tensor afterwards does not change the record
    modules = [call[0] for call in recorder.calls]
    assert modules == [encoder, key_encoder]  # encoder's two Linear layers are inside it: not recorded
    (_, args, _, grad, training, _), (_, key_args, _, key_grad, key_training, _) = recorder.calls
    assert torch.equal(args[0], given) and grad and training
    assert torch.equal(key_args[0], given) and not key_grad and not key_training
    nn.Linear(4, 2)(x)  # after the block: nothing more recorded
    assert len(recorder.calls) == 2 and recorder.stepped == [adam]
    (replayed,) = efficiency.replay_optimizers(recorder)
    assert type(replayed) is torch.optim.Adam and replayed is not adam
    group = replayed.param_groups[0]
    assert group["lr"] == 0 and group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0.01
    assert [p for p in group["params"]] == list(encoder.parameters())
    before = encoder[0].weight.detach().clone()
    with efficiency.NetworkCalls() as again:
        times = efficiency.replay_times(recorder, torch.device("cpu"), 3)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert encoder[0].weight.grad is not None and key_encoder.weight.grad is None  # backward where grad was on
    assert [type(o) for o in again.stepped] == [torch.optim.Adam] * (efficiency.WARM + 3)  # an Adam step each time
    assert adam not in again.stepped and torch.equal(encoder[0].weight, before)  # a copy, lr 0: the weights stay
    recorder.stepped.clear()  # a method that steps no optimizer: SGD over the calls' parameters
    (fallback,) = efficiency.replay_optimizers(recorder)
    assert type(fallback) is torch.optim.SGD and len(fallback.param_groups[0]["params"]) == 6


def test_efficiency_table_has_a_ratio_per_method(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import efficiency
    text = efficiency.main(["--methods", "moco", "split_brain", "--steps", "6", "--repeats", "2",
                            "--out", str(tmp_path / "eff.md"), "--result", str(tmp_path / "eff.json")])
    assert (tmp_path / "eff.md").read_text() == text
    import report
    kept = json.loads((tmp_path / "eff.json").read_text())
    assert report.RENDER["efficiency"](kept["data"]) + "\n" + kept["provenance"] + "\n" == text
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| moco") or
            line.startswith("| split_brain")]
    assert len(rows) == 2
    # MoCo: the query encoder learns, the key encoder only goes forward, batch 256.
    assert rows[0][1].strip() == "Encoder 256x3x32x32, Encoder 256x3x32x32 (no grad)"
    import split_brain
    assert rows[1][1].strip() == f"SplitBrain {split_brain.Args.batch_size}x3x32x32"  # both halves in one call
    for row in rows:
        ours, nets = float(row[2]), float(row[3])
        ratio, low, _, high = row[4].replace("(", "").replace(")", "").split()
        assert ours > 0 and nets > 0 and float(low) <= float(ratio) <= float(high)


def test_claims_table_has_a_row_per_run_a_verdict_and_the_grids(tiny_folder, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import claims
    extra = f"--dataset folder --data-dir {tiny_folder} --batch-size 16 --workers 0 --max-steps 2"
    record = claims.main(["--claims", "colorization_loss", "--epoch-scale", "0.1", "--extra", extra,
                          "--seeds", "2", "--out", str(tmp_path), "--results", str(tmp_path / "results")])
    text = (tmp_path / "claims.md").read_text()
    kept = json.loads((tmp_path / "results" / "claim-colorization_loss.json").read_text())
    assert kept["kind"] == "claim" and set(kept["code"]) == {"colorization.py", "common.py", "builtin_data.py",
                                                              "benchmarks/claims.py"}
    assert kept["command"] == f"python benchmarks/claims.py --claims colorization_loss --epoch-scale 0.1 --seeds 2 " \
                              f"--extra '{extra}'"
    import report
    assert text.startswith(report.RENDER["claim"](kept["data"]) + "\nMade by commit")  # the sweep's own table
    # the kept provenance's wall time is its runs' own (the sweep's line: this sitting's)
    walls = [run["wall_s"] for r in kept["data"]["colorization_loss"].values() for run in r["runs"]]
    assert len(walls) == 4 and all(w > 0 for w in walls)
    assert f"{sum(walls) / 60:.0f} min wall time" in kept["provenance"]
    rows = [line for line in text.splitlines() if line.startswith("| classification") or
            line.startswith("| regression")]
    import colorization
    epochs = math.ceil(colorization.Args.epochs * 0.1)  # --epoch-scale of the default
    assert len(rows) == 2 and f"`python colorization.py --loss regression --epochs {epochs} " in rows[1]
    c = record["colorization_loss"]
    runs = {label: c[label]["runs"] for label in c}
    assert all(len(r) == 2 for r in runs.values()) and "Mean ± standard deviation over 2 seeds" in text
    # The table's figures: mean ± sample standard deviation of the two seeds, worked out here.
    knn = [r["knn_top1"] for r in runs["regression (L2)"]]
    mean, std = (knn[0] + knn[1]) / 2, abs(knn[0] - knn[1]) / 2 ** 0.5
    assert f"| {mean:.3f} ± {std:.3f} |" in rows[1]
    chroma = {label: [r["pretext_colourfulness"] for r in rs] for label, rs in runs.items()}
    cls, reg = chroma["classification (rebalanced)"], chroma["regression (L2)"]
    spread = abs(cls[0] - cls[1]) / 2 ** 0.5 + abs(reg[0] - reg[1]) / 2 ** 0.5
    holds, opposite = sum(cls) / 2 - sum(reg) / 2 > spread, sum(reg) / 2 - sum(cls) / 2 > spread
    verdict = [line for line in text.splitlines() if line.startswith("Measured: ")]
    word = "holds" if holds else "contradicted" if opposite else "not shown"
    assert len(verdict) == 1 and verdict[0].startswith(f"Measured: {word}")
    assert (tmp_path / "colorization_loss-classification.png").is_file()
    assert (tmp_path / "colorization_loss-regression.png").is_file()
    claims.main(["--render", "--out", str(tmp_path)])  # rebuilt from results.json alone: the same tables
    assert (tmp_path / "claims.md").read_text() == text

    # The same command again continues a stopped sweep: finished runs are read back, a run
    # without its eval.json (stopped before its end) continues from its checkpoint.
    regression = [f for f in tmp_path.glob("colorization-*") if "regression" in (f / "seed0" / "claims_command.txt").read_text()]
    stopped = regression[0] / "seed1"
    (stopped / "eval.json").unlink()
    argv = ["--claims", "colorization_loss", "--epoch-scale", "0.1", "--extra", extra, "--seeds", "2",
            "--out", str(tmp_path)]
    again = claims.main(argv)["colorization_loss"]
    for label in c:
        for first, second in zip(c[label]["runs"], again[label]["runs"]):
            assert {k: first[k] for k in first if "top1" in k} == {k: second[k] for k in second if "top1" in k}
    assert (stopped / "eval.json").is_file() and f"resumed {stopped}" in (stopped.parent / "seed1.log").read_text()
    # A run's folder is named by its command, so other options land elsewhere; a folder that
    # still holds another command's run (named by hand, or a hash collision) is refused.
    assert stopped.parent.name.startswith("colorization-") and len({f.name for f in regression}) == 1
    with pytest.raises(common.RunError, match="another sweep"):
        claims.run_seed("colorization", ["--loss", "regression", "--epochs", "3"], stopped)


def test_claims_need_a_difference_beyond_the_spread_of_the_seeds():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import claims

    def row(*knn):
        return claims.Row([{"knn_top1": k, "random_knn_top1": 0.1} for k in knn])

    assert claims.beats(row(0.50, 0.52), row(0.40, 0.42), "knn_top1")  # 0.51 - 0.014 > 0.41 + 0.014
    assert not claims.beats(row(0.45, 0.60), row(0.45, 0.47), "knn_top1")  # the spread swallows the 0.065
    assert not claims.beats(row(0.9), row(0.1), "knn_top1")  # one seed: no spread measured, no verdict
    assert abs(row(0.5, 0.6).mean("gain_knn_top1") - 0.45) < 1e-9
    rows = {"2 angles": row(0.30, 0.31), "4 angles": row(0.40, 0.41), "8 angles": row(0.38, 0.42)}
    assert claims._best(rows, "knn_top1").startswith("none clearly")  # 8 angles' spread reaches 4 angles


def test_a_claims_verdict_is_holds_partly_contradicted_or_not_shown():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import claims

    def row(knn, linear):  # two seeds each, 0.01 apart
        return claims.Row([{"knn_top1": k, "linear_top1": li} for k, li in ((knn, linear), (knn + 0.01, linear + 0.01))])

    def verdict(moco, bank):
        return claims._negatives({"MoCo: queue + momentum encoder": row(*moco), "memory bank": row(*bank),
                                  "end-to-end": row(0.3, 0.3)})

    assert verdict((0.5, 0.5), (0.3, 0.3)).startswith("holds: ")
    assert verdict((0.5, 0.3), (0.3, 0.3)).startswith("partly: ") and "for kNN only" in verdict((0.5, 0.3), (0.3, 0.3))
    assert "the opposite for linear" in verdict((0.5, 0.3), (0.3, 0.5))
    assert verdict((0.3, 0.3), (0.5, 0.5)).startswith("contradicted: ")
    assert verdict((0.3, 0.3), (0.302, 0.3)).startswith("not shown: ")  # within the spread either way
    summary = claims.summary_row("moco_negatives", verdict((0.3, 0.3), (0.5, 0.5)))
    assert summary.startswith("| moco_negatives | ") and "| contradicted |" in summary


def test_profile_rows_are_what_the_step_spends_outside_its_networks():
    """The step's operators less the same step's networks replayed alone: the convolutions,
    which the networks do, mostly cancel; what is left is the method's own work."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import efficiency
    step, recorder = efficiency.profile_steps("rotation", ["--backbone", "small", "--device", "cpu", "--batch-size",
                                                           "16"], 2)
    networks = efficiency.profile_replay(recorder, 2)
    calls = recorder.calls
    assert [type(c[0]).__name__ for c in calls] == ["RotationNet"]  # one network call a step, recorded after the window
    assert [type(o).__name__ for o in recorder.stepped] == ["SGD"]  # rotation's own optimizer, stepped once
    assert step["aten::convolution_backward"] > 0 and networks["aten::convolution_backward"] > 0
    rows = efficiency.outside_rows("rotation", step, networks)
    cells = [row.strip("|").split("|") for row in rows]
    assert cells[0][0].strip() == "rotation" and cells[0][1].strip() == "all, outside the networks"
    total, ms = float(cells[0][2]), [float(c[2]) for c in cells[1:]]
    assert ms == sorted(ms, reverse=True) and 0 < sum(ms) <= total + 0.1
    # Only training steps: data generation (bicubic noise) is setup, left out.
    assert not any("upsample_bicubic" in c[1] for c in cells)


def test_reference_speed_times_each_step_and_stops_the_reference_loop():
    """The loader handed to the reference code: --steps batches (a second pass over a
    small data set), a time as each batch is handed over and one when the loop asks
    for more, then StopTraining, which ends the reference's own loop."""
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reference_speed as rs
    loader = torch.utils.data.DataLoader(torch.arange(4), batch_size=2)
    timed = rs.TimedLoader(loader, steps=3)
    assert len(timed) == 2 and timed.batch_size == 2  # the whole loader's length, for the reference's schedule
    seen = []
    with pytest.raises(rs.StopTraining):
        for batch in timed:
            seen.append(batch.tolist())
    assert seen == [[0, 1], [2, 3], [0, 1]]
    assert len(timed.times) == 4 and timed.times == sorted(timed.times)
    # images/s over the steps after WARM: 10 timed steps of 0.5 s at batch 128 -> 256 images/s.
    result = {"step_s": [9.0] * rs.WARM + [0.5] * 10, "losses": [5.0] * 5 + [3.0] * 10, "batch": 128}
    assert rs.summary(result) == {"images_per_s": 256.0, "ms_per_step": 500.0, "loss_last10": 3.0}


def test_reference_speed_reads_an_image_folder_as_cifar10(tiny_folder):
    """The stand-in for torchvision's CIFAR10: .data (N, H, W, 3) uint8 in class-folder
    order, .targets, .classes; the training split decoded once however often it is built."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reference_speed as rs
    CIFAR10 = rs.folder_cifar10(tiny_folder)
    train, again = CIFAR10(root="data", train=True, download=True), CIFAR10(root="data", train=True)
    classes = sorted(p.name for p in (tiny_folder / "train").iterdir())
    assert train.classes == classes and len(train) == 160 and train.data.shape == (160, 32, 32, 3)
    assert train.data is again.data
    first = sorted((tiny_folder / "train" / classes[0]).iterdir())
    assert train.targets[:len(first)] == [0] * len(first) and train.targets[len(first)] == 1
    from PIL import Image
    import numpy as np
    assert np.array_equal(train.data[0], np.asarray(Image.open(first[0]).convert("RGB")))


def test_reference_speed_needs_a_reference_and_the_data(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reference_speed as rs
    with pytest.raises(SystemExit, match="give --moco-demo, --simclr-repo or both"):
        rs.main(["--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--moco-demo not found"):
        rs.main(["--data-dir", str(tmp_path), "--moco-demo", str(tmp_path / "missing.ipynb")])


def test_official_curve_reads_the_demos_log_and_runs_moco_epoch_by_epoch(tiny_folder, tmp_path):
    import time
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import official_curve as oc
    assert oc.DEMO_LOG[1] == 31.98 and oc.DEMO_LOG[6] == 39.87 and oc.DEMO_LOG[200] == 82.58
    rows = [{"epoch": 1, "head": 33.0, "backbone": 40.0}, {"epoch": 2, "head": 36.0, "backbone": 41.0}]
    text = oc.table(rows, {"head": 20.0, "backbone": 30.0}, 60.0, time.time())
    assert "| 1 | 31.98 | 33.00 | +1.02 | 40.00 |" in text and "| 2 | 33.52 | 36.00 | +2.48 | 41.00 |" in text
    assert "No verdict yet: epoch 2 reached; the verdicts are at epochs 5 and 10" in text and "Made by commit" in text
    five = [{"epoch": e, "head": h, "backbone": 0.0} for e, h in ((4, 36.0), (5, 39.5))]
    assert oc.verdict(five) == "At epoch 5 on the demo's curve (39.50 against its log's 37.95, +1.55; the band: 2 points)."
    ten = five + [{"epoch": 10, "head": 44.0, "backbone": 0.0}]
    assert oc.verdict(ten).endswith("; at epoch 10 off the demo's curve (44.00 against its log's 48.03, -4.03; "
                                    "the band: 2 points).")
    r = oc.main(["--data-dir", str(tiny_folder), "--epochs", "2", "--workers", "0", "--out", str(tmp_path),
                 "--extra", "--backbone small --batch-size 16 --queue-size 64"])
    assert [e["epoch"] for e in r["epochs"]] == [1, 2] and [e["step"] for e in r["epochs"]] == [10, 20]
    assert all(0 <= e[k] <= 100 for e in r["epochs"] for k in ("head", "backbone"))
    assert "| 2 | 33.52 |" in (tmp_path / "curve.md").read_text()
    # Stopped after one epoch and continued with --resume: the same curve, epoch 1 kept as measured.
    split = tmp_path / "split"
    one = oc.main(["--data-dir", str(tiny_folder), "--epochs", "1", "--workers", "0", "--out", str(split),
                   "--extra", "--backbone small --batch-size 16 --queue-size 64"])
    kept = json.loads((split / "curve.json").read_text())
    assert kept["epochs"] == one["epochs"] and kept["seconds"] > 0 and "--epochs 1" in kept["command"]
    with pytest.raises(common.RunError):  # a second start on the same folder is refused
        oc.main(["--data-dir", str(tiny_folder), "--epochs", "2", "--workers", "0", "--out", str(split)])
    two = oc.main(["--data-dir", str(tiny_folder), "--epochs", "2", "--workers", "0", "--out", str(split), "--resume",
                   "--result", str(tmp_path / "results" / "curve.json"),
                   "--extra", "--backbone small --batch-size 16 --queue-size 64"])
    assert two["epochs"][0] == one["epochs"][0] and two["epochs"] == r["epochs"] and two["random_init"] == r["random_init"]
    record = json.loads((tmp_path / "results" / "curve.json").read_text())  # the raw result, for report.py
    assert record["kind"] == "official_curve" and record["data"]["epochs"] == two["epochs"]
    # the command that makes the table from nothing: split as a shell splits it, the options given but --resume
    assert shlex.split(record["command"])[2:] == ["--data-dir", str(tiny_folder), "--epochs", "2", "--workers", "0",
                                                  "--out", str(split), "--result", str(tmp_path / "results" / "curve.json"),
                                                  "--extra", "--backbone small --batch-size 16 --queue-size 64"]
    assert set(record["code"]) == {"moco.py", "common.py", "benchmarks/official_curve.py", "benchmarks/registry.py"}
    import report
    rendered = report.RENDER["official_curve"](record["data"])
    assert "| 2 | 33.52 |" in rendered and "Made by commit" not in rendered  # the provenance is the record's


# A notebook laid out as the MoCo CIFAR-10 demo (the same cell markers and names), with a
# tiny model of its own: the test's, not the demo's code.
DEMO_CELLS = [
    "!nvidia-smi",
    "parser = argparse.ArgumentParser()\nparser.add_argument('--batch-size', default=16, type=int)\n"
    "parser.add_argument('--epochs', default=200, type=int)\nparser.add_argument('--results-dir', default='')\n"
    "args = parser.parse_args('')",
    "class CIFAR10Pair(CIFAR10):\n    def __getitem__(self, index):\n        img = Image.fromarray(self.data[index])\n"
    "        return self.transform(img), self.transform(img)\n"
    "t = test_transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])])\n"
    "train_data = CIFAR10Pair(root='data', train=True, transform=t, download=True)\n"
    "train_loader = DataLoader(train_data, batch_size=args.batch_size, shuffle=True, num_workers=16, drop_last=True)\n"
    "memory_loader = DataLoader(CIFAR10(root='data', train=True, transform=t), batch_size=args.batch_size, num_workers=16)\n"
    "test_loader = DataLoader(CIFAR10(root='data', train=False, transform=t), batch_size=args.batch_size, num_workers=16)",
    "class SplitBatchNorm(nn.BatchNorm2d):\n    pass",
    "class ModelMoCo(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    "        self.encoder_q = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8))\n"
    "    def forward(self, im1, im2):\n"
    "        return -F.cosine_similarity(self.encoder_q(im1), self.encoder_q(im2)).mean()\n"
    "model = ModelMoCo().cuda()",
    "def train(net, data_loader, train_optimizer, epoch, args):\n    net.train()\n    total = []\n"
    "    for im_1, im_2 in tqdm(data_loader):\n        loss = net(im_1.cuda(), im_2.cuda())\n"
    "        train_optimizer.zero_grad()\n        loss.backward()\n        train_optimizer.step()\n"
    "        total.append(loss.item())\n    note('train', epoch, len(total))\n    return sum(total) / len(total)",
    "def note(*call):\n    os.makedirs(args.results_dir, exist_ok=True)\n"
    "    with open(os.path.join(args.results_dir, 'calls.txt'), 'a') as f:\n        f.write(' '.join(map(str, call)) + '\\n')\n"
    "def test(net, memory_data_loader, test_data_loader, epoch, args):\n    net.eval()\n"
    "    with torch.no_grad():\n"
    "        bank = torch.cat([F.normalize(net(x), dim=1) for x, _ in memory_data_loader])\n"
    "        labels = torch.tensor(memory_data_loader.dataset.targets)\n        right = total = 0\n"
    "        for x, y in test_data_loader:\n            nearest = (F.normalize(net(x), dim=1) @ bank.t()).argmax(1)\n"
    "            right += (labels[nearest] == y).sum().item()\n            total += len(y)\n"
    "    note('test', epoch, total)\n    return 100 * right / total\n"
    "def knn_predict(feature, feature_bank, feature_labels, classes, knn_k, knn_t):\n    pass",
    "# define optimizer\noptimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n# training loop\n"
    "for epoch in range(1, args.epochs + 1):\n    raise RuntimeError('the curve drives the epochs itself')",
]


def test_official_curve_runs_the_demos_own_code_and_its_own_monitor(tiny_folder, tmp_path):
    """--demo-notebook: the notebook's cells run as they are, on the folder (test split
    decoded for its monitor), its optimizer line, then train() and test() epoch by epoch
    after a test() at random init; the table sets its figures beside the demo's log."""
    notebook = tmp_path / "demo.ipynb"
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "source": c} for c in DEMO_CELLS]}))
    out = tmp_path / "curve"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "official_curve.py"), "--data-dir",
                           str(tiny_folder), "--epochs", "2", "--workers", "0", "--demo-notebook", str(notebook),
                           "--out", str(out), "--result", str(tmp_path / "demo-curve.json")],
                          capture_output=True, text=True, env=script_env())
    assert done.returncode == 0, done.stderr
    calls = (out / "demo" / "calls.txt").read_text().split("\n")[:-1]  # 160 training images in batches of 16
    assert calls == ["test 0 60", "train 1 10", "test 1 60", "train 2 10", "test 2 60"]
    record = json.loads((out / "curve.json").read_text())
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert all(0 <= e["head"] <= 100 for e in record["epochs"]) and 0 <= record["random_init"] <= 100
    text = (out / "curve.md").read_text()
    assert "| 0 (random init) | | " in text and "| 1 | 31.98 | " in text and "| 2 | 33.52 | " in text
    assert "The demo's own code, run here: " in text and "Made by commit" in text
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report
    kept = json.loads((tmp_path / "demo-curve.json").read_text())  # the raw result renders as the table written
    assert kept["kind"] == "demo_curve" and report.RENDER["demo_curve"](kept["data"]) in text
    missing = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "official_curve.py"), "--data-dir",
                              str(tiny_folder), "--demo-notebook", str(tmp_path / "none.ipynb"), "--out", str(out)],
                             capture_output=True, text=True, env=script_env())
    assert missing.returncode != 0 and "--demo-notebook not found" in missing.stderr


def test_a_stopped_demo_curve_resumes_as_if_never_stopped(tiny_folder, tmp_path):
    """--demo-notebook --resume: the demo's code goes on after its last epoch from the kept
    state (model and queue, optimizer, random state): one epoch, then --resume to three,
    gives the figures of three epochs in one go, without training or testing again."""
    notebook = tmp_path / "demo.ipynb"
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "source": c} for c in DEMO_CELLS]}))

    def curve(out, epochs, *more):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "official_curve.py"), "--data-dir",
                               str(tiny_folder), "--epochs", str(epochs), "--workers", "0", "--demo-notebook",
                               str(notebook), "--out", str(out), *more], capture_output=True, text=True,
                              env=script_env())
        return done, (json.loads((out / "curve.json").read_text()) if done.returncode == 0 else None)

    _, whole = curve(tmp_path / "whole", 3)
    first, _ = curve(tmp_path / "stopped", 1)
    assert first.returncode == 0, first.stderr
    again, _ = curve(tmp_path / "stopped", 3)  # without --resume: refused, nothing overwritten
    assert again.returncode != 0 and "continue it with --resume" in again.stderr
    resumed, kept = curve(tmp_path / "stopped", 3, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert kept == whole and [e["epoch"] for e in kept["epochs"]] == [1, 2, 3]
    calls = (tmp_path / "stopped" / "demo" / "calls.txt").read_text().split("\n")[:-1]
    assert calls == ["test 0 60", "train 1 10", "test 1 60", "train 2 10", "test 2 60", "train 3 10", "test 3 60"]
    fresh, _ = curve(tmp_path / "none", 2, "--resume")
    assert fresh.returncode != 0 and "holds no demo run to continue" in fresh.stderr


def test_official_curve_measures_a_moco_checkpoint_with_the_demos_monitor(tiny_folder, tmp_path):
    """--demo-notebook --checkpoint: moco.py's f_q fed the demo's normalised input gives what
    it gives on the pixels; both monitors' figures in one table; no checkpoint, no run."""
    import torch
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import official_curve as oc
    a = oc.parse(["--data-dir", str(tiny_folder), "--out", str(tmp_path), "--extra", "--backbone small"])
    f_q = oc.encoder_from(None, a).eval()
    x = torch.rand(4, 3, 32, 32)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    demo_input = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(oc.FromDemoInput(f_q, mean, std)(demo_input), f_q(x), atol=1e-5)
    notebook = tmp_path / "demo.ipynb"
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "source": c} for c in DEMO_CELLS]}))
    extra = "--backbone small --batch-size 16 --queue-size 64"
    oc.main(["--data-dir", str(tiny_folder), "--epochs", "1", "--workers", "0", "--out", str(tmp_path / "c"),
             "--extra", extra])
    checkpoint = tmp_path / "c" / "moco" / "checkpoint.pt"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "official_curve.py"), "--data-dir",
                           str(tiny_folder), "--workers", "0", "--demo-notebook", str(notebook), "--checkpoint",
                           str(checkpoint), "--extra", extra, "--out", str(tmp_path / "m"),
                           "--result", str(tmp_path / "measures.json")],
                          capture_output=True, text=True, env=script_env())
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "m" / "measures.md").read_text()
    assert "(step 10)" in text and "| the demo's test() | " in text and "| official_curve.py (knn_both) | " in text
    assert "Made by commit" in text
    import report
    kept = json.loads((tmp_path / "measures.json").read_text())
    assert kept["kind"] == "demo_measures" and text.startswith(report.RENDER["demo_measures"](kept["data"]))
    alone = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "official_curve.py"), "--data-dir",
                            str(tiny_folder), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "n")],
                           capture_output=True, text=True, env=script_env())
    assert alone.returncode != 0 and "give --demo-notebook as well" in alone.stderr


def test_reference_speed_compares_each_sides_best_loader_setting(tmp_path):
    """Every --workers setting of each side is in the table; the ratio is best against best."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reference_speed as rs
    rows = [{"pair": "moco", "side": side, "workers": w, "repeat": 0, "images_per_s": speed, "ms_per_step": 1000.0,
             "loss_last10": 5.0}
            for side, speeds in (("moco.py", (49.3, 44.0, 43.4)), ("MoCo CIFAR-10 demo", (40.3, 36.0, 32.8)))
            for w, speed in zip((0, 1, 2), speeds)]
    data = {"data_dir": "data/cifar10-jpg", "steps": 45, "repeats": 1, "threads": 2, "device": "cpu", "rows": rows}
    text = rs.table(data)
    import report
    assert report.RENDER["reference_speed"](data) == text  # what --result keeps renders as the same table
    assert text.count("\n| moco.py |") == 3 and text.count("\n| MoCo CIFAR-10 demo |") == 3
    assert "| MoCo CIFAR-10 demo | 2 | 32.8 |" in text
    assert ("moco.py at its best (49.3 images/s, --workers 0) against MoCo CIFAR-10 demo at its best (40.3, "
            "--workers 0): 1.22x.") in text


def test_data_pipeline_keeps_its_raw_figures_and_they_render_as_printed(tiny_folder, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import data_pipeline
    import report
    rows = data_pipeline.main(["--data-dir", str(tiny_folder), "--size", "32", "--batch-size", "16", "--workers", "0",
                               "--passes", "1", "--result", str(tmp_path / "pipeline.json")])
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "pipeline.json").read_text())
    assert record["kind"] == "data_pipeline" and record["command"].startswith("python benchmarks/data_pipeline.py --data-dir")
    assert [name for name, _ in rows] == [name for name, _ in record["data"]["rows"]]
    rendered = report.RENDER["data_pipeline"](record["data"])
    assert rendered + "\n" + record["provenance"] in printed
    assert "| torchvision: ImageFolder + transforms.v2, in the workers |" in rendered and "| 1.00 |" in rendered


def test_plot_summarises_the_seeds_with_their_provenance(tmp_path):
    """plot.py's table (no matplotlib needed): mean ± standard deviation over the compare
    folders, the median wall time, video colorization's J, and each folder's provenance."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plot
    folders = []
    for seed, (knn, wall, J) in enumerate(((0.30, 30.0, 0.40), (0.40, 50.0, 0.50), (0.35, 40.0, 0.45))):
        folder = tmp_path / f"compare-s{seed}"
        for method, result in (("rotation", {"knn_top1": knn, "random_knn_top1": 0.2, "linear_top1": 0.5,
                                             "random_linear_top1": 0.3}),
                               ("video_colorization", {"J": J, "J_random_init": 0.0, "J_copy_first": 0.2,
                                                       "pretext_top1": 0.8, "videos": 32, "objects": 86})):
            (folder / method).mkdir(parents=True)
            (folder / method / "eval.json").write_text(json.dumps(result))
            (folder / method / "config.json").write_text(json.dumps({"epochs": 2}))
            (folder / method / "log.jsonl").write_text(json.dumps({"epoch": 1, "step": 5, "knn_top1": 0.25}) + "\n")
        (folder / "results.json").write_text(json.dumps([{"method": "rotation", "wall_s": wall},
                                                         {"method": "video_colorization", "wall_s": 2 * wall}]))
        (folder / "table.md").write_text(f"| ... |\n\nMade by commit abc{seed}, 2026-11-30.\n")
        folders.append(folder)
    found = plot.load(folders)
    text = plot.table(found)
    assert "| rotation | 40 s | 0.350 ± 0.050 | 0.200 ± 0.000 | 0.500 ± 0.000 | 0.300 ± 0.000 | +0.150 ± 0.050 /" in text
    video = plot.video_table(folders)
    assert "| video_colorization (32 videos, 86 objects) | 80 s | 0.800 ± 0.000 | 0.450 ± 0.050 | 0.000 ± 0.000 |" in video
    assert plot.made_by(folders)[2] == ("compare-s2", "Made by commit abc2, 2026-11-30.")


def test_report_renders_a_raw_result_into_its_block_and_marks_it_stale(tmp_path, monkeypatch):
    """results/<name>.json -> the block between its markers: the command, the benchmark's own
    table, the provenance line; "Stale" once a file of the measured code is not as it was."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import registry
    import report
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    rows = [{"status": "ok", "setting": "left out", "tracked": "cows", "seed": s, "J": j, "J_random_init": 0.0,
             "J_copy_first": 0.5} for s, j in ((0, 0.3), (1, 0.4))]
    record = registry.save_result(tmp_path / "demo.json", "unseen_videos", "python benchmarks/unseen_videos.py",
                                  ["common.py"], rows, 0.0)
    assert record["code"]["common.py"] == registry.code_hashes(["common.py"])["common.py"]
    doc = "before\n<!-- report: demo -->\nold text\n<!-- /report -->\nafter\n"
    out = report.generated(doc)
    assert out.startswith("before\n<!-- report: demo -->\n    python benchmarks/unseen_videos.py\n")
    assert "| the other videos | cows | 0.350 ± 0.071 |" in out and record["provenance"] in out
    assert out.endswith("<!-- /report -->\nafter\n") and "Stale" not in out and report.generated(out) == out
    record["code"]["common.py"] = "0" * 64
    (tmp_path / "demo.json").write_text(json.dumps(record))
    assert "**Stale:** `common.py` changed" in report.generated(doc)
    # an earlier code's result kept on purpose to compare: its commit named, not called stale
    kept = report.generated(doc.replace("report: demo", "report: kept demo"))
    assert "Stale" not in kept and f"commit {record['provenance'].split()[3].rstrip(',')}'s code" in kept
    assert "| the other videos | cows | 0.350 ± 0.071 |" in kept
    assert "Not measured yet: results/other.json" in report.generated(doc.replace("demo", "other"))


def test_a_change_recorded_as_unaffecting_a_result_leaves_it_current_for_that_result_alone(tmp_path, monkeypatch):
    """results/unaffected.json (same_steps.py --record) bridges a file's digest from the one a
    result measured to the current one, for the results it names and only along its chain;
    RESULTS.md's block lists each entry."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import registry
    import report
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    now = registry.code_hashes(["common.py"])["common.py"]
    rows = [{"status": "ok", "setting": "left out", "tracked": "cows", "seed": 0, "J": 0.3, "J_random_init": 0.0,
             "J_copy_first": 0.5}]
    for name in ("vouched", "other"):
        record = registry.save_result(tmp_path / f"{name}.json", "unseen_videos", "python benchmarks/unseen_videos.py",
                                      ["common.py"], rows, 0.0)
        record["code"]["common.py"] = "a" * 64
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    doc = "<!-- report: vouched -->\n<!-- /report -->\n<!-- report: other -->\n<!-- /report -->\n"
    assert report.generated(doc).count("**Stale:**") == 2
    assert report.unaffected_list().startswith("None")

    def entry(before, after):
        return {"file": "common.py", "from": before, "to": after, "why": "Only the stop.", "results": ["vouched"],
                "checked": "python benchmarks/same_steps.py --before abc"}

    (tmp_path / "unaffected.json").write_text(json.dumps([entry("a" * 64, "b" * 64)]))
    assert report.generated(doc).count("**Stale:**") == 2  # a chain that does not reach today's file
    (tmp_path / "unaffected.json").write_text(json.dumps([entry("a" * 64, "b" * 64), entry("b" * 64, now)]))
    out = report.generated(doc)
    assert out.count("**Stale:**") == 1 and out.index("**Stale:**") > out.index("report: other")
    assert report.stale_files(report.load(tmp_path / "vouched.json")) == []
    assert report.stale_files(report.load(tmp_path / "other.json")) == ["common.py"]
    listed = report.unaffected_list()
    assert listed.count("\n") == 1  # one check: one line for its files
    assert listed.startswith("- `common.py` (aaaaaaaa to bbbbbbbb), `common.py` (bbbbbbbb to ") and \
        "Only the stop. Checked by `python benchmarks/same_steps.py --before abc`" in listed
    assert listed.endswith("Covers 1 results: vouched.\n")  # "other" is not named
    (tmp_path / "unaffected.json").write_text(json.dumps([entry("a" * 64, "b" * 64), entry("b" * 64, "a" * 64)]))
    assert report.stale_files(report.load(tmp_path / "vouched.json")) == ["common.py"]  # a loop ends


def test_same_steps_compares_every_tensor_of_two_checkpoints():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import same_steps
    state = {"model": {"w": torch.ones(2), "b": torch.zeros(1)}, "rng": [{"cpu": torch.arange(3)}], "step": 4}
    found = dict(same_steps.tensors(state))
    assert sorted(found) == ["model.b", "model.w", "rng.0.cpu"]
    assert same_steps.compare(found, dict(found)) == "3 tensors equal"
    moved = {**found, "model.w": torch.tensor([1.0, 1.0 + 1e-6])}
    assert same_steps.compare(found, moved).startswith("1 of 3 tensors differ")
    assert same_steps.compare(found, {"model.w": found["model.w"]}).startswith("different parts")
    # a file that differs only in comments and docstrings is the same code; any other change is not
    code = '"""Run it:\n\n    python x.py --data-dir ../shared/data\n"""\ndef f(x):\n    """Twice."""\n    return 2 * x  # why\n'
    same = same_steps.without_docstrings
    assert same(code) == same(code.replace("../shared/data", "data/x").replace("# why", "# as").replace("Twice", "2x"))
    assert same(code) != same(code.replace("2 * x", "3 * x"))
    assert same(code) != same(code.replace('"""Twice."""', "x = 1"))


def test_a_stopped_curve_is_not_fresh_so_its_step_goes_on(tmp_path, monkeypatch):
    """tables.sh skips a step whose result is fresh: a curve kept after each epoch is not,
    until it has the epochs its command asks for."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import registry
    import report
    monkeypatch.setattr(report, "RESULTS", tmp_path)

    def curve(last):
        rows = [{"epoch": e, "head": 30.0 + e, "backbone": 31.0 + e} for e in range(1, last + 1)]
        registry.save_result(tmp_path / "curve.json", "official_curve", "python benchmarks/official_curve.py --epochs 3",
                             ["common.py"], {"random_init": {}, "epochs": rows, "seconds": 1.0}, 0.0)
        with pytest.raises(SystemExit) as stop:
            report.main(["--fresh", "curve"])
        return stop.value.code

    def resumable():
        with pytest.raises(SystemExit) as stop:
            report.main(["--resumable", "curve"])
        return stop.value.code

    assert curve(2) == 1 and resumable() == 0  # stopped early: tables.sh resumes it
    assert curve(3) == 0 and resumable() == 1  # finished
    curve(2)
    record = json.loads((tmp_path / "curve.json").read_text())
    record["code"]["common.py"] = "0" * 64
    (tmp_path / "curve.json").write_text(json.dumps(record))
    assert resumable() == 1  # measured other code: started again, not resumed


def test_report_check_passes_on_the_committed_docs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_report_seeds_view_averages_the_compare_results_it_names(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import registry
    import report
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    for seed, knn in ((0, 0.30), (1, 0.40)):
        row = {"method": "rotation", "status": "ok", "knn_top1": knn, "random_knn_top1": 0.1, "linear_top1": 0.5,
               "random_linear_top1": 0.2, "wall_s": 40.0 + seed, "knn_curve": [[0.0, 0.1], [1.0, knn]],
               "images_per_s": 1000.0, "peak_rss_mb": 500.0}
        registry.save_result(tmp_path / f"s{seed}.json", "compare", f"python benchmarks/compare.py --extra '--seed {seed}'",
                             ["rotation.py"], {"options": {}, "rows": [row]}, 0.0)
    out = report.generated("<!-- report: seeds s0 s1 -->\n<!-- /report -->\n")
    assert "| rotation | 40 s | 0.350 ± 0.071 | 0.100 ± 0.000 | 0.500 ± 0.000 | 0.200 ± 0.000 | +0.250 ± 0.071 / " in out
    assert "--seed 0'" in out and "--seed 1'" in out and out.count("Made by commit") == 2
    assert "\n- `s0`: Made by commit" in out and "\n- `s1`: Made by commit" in out  # which seed's line is which
    one = report.generated("<!-- report: seeds.rotation s0 s1 -->\n<!-- /report -->\n")
    assert "| rotation | 40 s | 0.350 ± 0.071 |" in one
    assert "| rotation |" not in report.generated("<!-- report: seeds.moco s0 s1 -->\n<!-- /report -->\n")
    row = report.generated("<!-- report: compare.rotation s1 -->\n<!-- /report -->\n")  # one result's row
    assert "| rotation | " in row and "| 0.400 |" in row and "| 0.300 |" not in row and "--seed 1'" in row
    assert "No run of moco" in report.generated("<!-- report: compare.moco s1 -->\n<!-- /report -->\n")


def test_report_summaries_say_what_their_tables_show(tmp_path, monkeypatch):
    """The prose beside a table is generated from the same results: who gains, largest first,
    the seed's spread, and tracking against the copied first mask, each from its figures."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import registry
    import report
    monkeypatch.setattr(report, "RESULTS", tmp_path)

    def row(method, knn, linear, wall=30.0):
        return {"method": method, "status": "ok", "knn_top1": knn, "random_knn_top1": 0.2, "linear_top1": linear,
                "random_linear_top1": 0.3, "wall_s": wall}
    for seed, (rot, jig) in enumerate(((0.40, 0.18), (0.50, 0.19))):
        video = {"method": "video_colorization", "status": "ok", "J": 0.4 + seed / 10, "J_random_init": 0.0,
                 "J_copy_first": 0.2, "videos": 32, "objects": 86}
        registry.save_result(tmp_path / f"s{seed}.json", "compare", "c", [], {"options": {}, "rows": [
            row("rotation", rot, 0.5, 40.0), row("jigsaw", jig, 0.35, 90.0), row("moco", 0.3, 0.4), video]}, 0.0)

    def say(spec):
        return report.generated(f"<!-- report: {spec} -->\n<!-- /report -->\n").split("\n")[1]
    seeds = say("seeds-summary s0 s1")
    assert seeds.startswith("Every method but jigsaw gains over its own random-init network on both probes "
                            "(the mean of 2 seeds), in 30 to 90 s a run (median).")
    assert "kNN / linear: rotation (+0.250 ± 0.071 / +0.200 ± 0.000), moco (+0.100 ± 0.000 / +0.100 ± 0.000) " \
           "and jigsaw (-0.015 ± 0.007 / +0.050 ± 0.000); the smallest: jigsaw's kNN -0.015 ± 0.007 and " in seeds
    assert "up to 0.071 (a standard deviation: rotation's kNN)" in seeds and "J 0.450 ± 0.071" in seeds
    registry.save_result(tmp_path / "q.json", "compare", "c", [], {"options": {}, "rows": [
        {**row("rotation", 0.34, 0.41, 56.4), "pretext_top1": 0.838}]}, 0.0)
    assert say("quickstart q") == (
        f"As `benchmarks/tables.sh` runs it, this took 56 s on {os.cpu_count()} CPU cores; it tells the four turns of a "
        "test image apart 84% of the time (chance 25%); its features give the image's class (one of ten) with 0.340 "
        "kNN accuracy and 0.410 linear, against 0.200 and 0.300 for the same network with random weights.")
    assert say("gains-summary s1").startswith("Gain over random init, kNN / linear, largest kNN gain first: "
                                              "rotation +0.300 / +0.200, moco +0.100 / +0.100, jigsaw -0.010 / +0.050.")
    assert say("davis-summary s0") == ("The paper's pointer tracks the 86 objects of the 32 videos at J 0.400, "
                                       "against 0.200 for the first mask copied unchanged and 0.000 for the same "
                                       "pointer with a random network.")
    rows = [{"status": "ok", "setting": setting, "tracked": tracked, "seed": seed, "J": j, "J_random_init": 0.0,
             "J_copy_first": 0.5} for setting, tracked, js in (("seen", "a, b", (0.6, 0.7)), ("left out", "a", (0.3, 0.4)),
                                                                ("left out", "b", (0.6, 0.6)), ("built-in", "a, b", (0.4, 0.4)))
            for seed, j in enumerate(js)]
    registry.save_result(tmp_path / "unseen.json", "unseen_videos", "u", [], rows, 0.0)
    assert say("unseen-summary unseen") == (
        "Trained on the videos it tracks, the pointer beats copying the first mask (0.650 against 0.500); on a video "
        "left out of its training it beats copying on b (0.600 against 0.500) and falls below it on a (0.350 against "
        "0.500); trained on the built-in videos, it falls below copying on the sample (0.400 against 0.500) "
        "(J, the mean over seeds).")


def test_report_answers_the_curve_question_in_one_sentence(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import registry
    import report
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    data = {"random_init": {"head": 34.0, "backbone": 36.0}, "seconds": 60.0,
            "epochs": [{"epoch": e, "step": 97 * e, "head": h, "backbone": h + 2} for e, h in ((4, 36.0), (5, 38.5))]}
    registry.save_result(tmp_path / "curve.json", "official_curve", "python benchmarks/official_curve.py", [], data, 0.0)
    out = report.generated("<!-- report: answer-curve curve -->\n<!-- /report -->\n")
    assert out == ("<!-- report: answer-curve curve -->\nDoes moco.py follow the official MoCo CIFAR-10 demo? Run to "
                   "epoch 5 of the demo's 200, kNN on the head output as the demo measures it: at epoch 5 on the "
                   "demo's curve (38.50 against its log's 37.95, +0.55; the band: 2 points).\n<!-- /report -->\n")


def test_report_reproduce_lists_each_step_of_tables_sh_with_its_time_and_state(tmp_path, monkeypatch):
    """README's "Reproduce the results" names every result tables.sh writes, no other; a
    measured step shows its command, its provenance's wall time and whether it is stale."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import registry
    import report
    script = (ROOT / "benchmarks" / "tables.sh").read_text()
    loops = {f"${var}": values.split() for var, values in re.findall(r"for (\w+) in ([\w ]+); do", script)}
    assert loops == {"$seed": ["0", "1", "2"], "$size": ["224", "64"]}
    written = set()
    for name in re.findall(r"results/([a-z0-9$-]+)\.json", script):
        var = next((v for v in loops if v in name), None)
        written |= {name.replace(var, value) for value in loops[var]} if var else {name}
    assert "--results results" in script  # the claims: one claim-<name>.json each
    spec = re.search(r"<!-- report: reproduce (.+?) -->", (ROOT / "README.md").read_text()).group(1).split()
    assert {s.split(":")[0] for s in spec} == written | {"claims"}
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    record = registry.save_result(tmp_path / "davis.json", "compare", "python benchmarks/compare.py --davis-dir D",
                                  ["common.py"], {"options": {}, "rows": []}, time.time() - 600)
    out = report.reproduce(["davis:davis", "cifar10:cifar"])
    assert "| davis | `python benchmarks/compare.py --davis-dir D` | the DAVIS sample (`--davis`) | 10 min | up to date |" in out
    assert "| cifar10 | its step in `benchmarks/tables.sh` | CIFAR-10 as JPEGs (`--cifar`) | ? | not measured yet |" in out
    assert "Total of the times measured: 0.2 h (steps not measured yet not counted)." in out
    record["code"]["common.py"] = "0" * 64
    (tmp_path / "davis.json").write_text(json.dumps(record))
    assert "| 10 min | stale |" in report.reproduce(["davis:davis"])
    # a compare finished in a later sitting (its runs read back): the runs' own times, not the last sitting's
    registry.save_result(tmp_path / "davis.json", "compare", "c", ["common.py"],
                         {"options": {}, "rows": [{"wall_s": 900.0}, {"wall_s": 300.0}]}, time.time())
    assert "| 20 min | up to date |" in report.reproduce(["davis:davis"])
    made = report._made(json.loads((tmp_path / "davis.json").read_text()))  # the line under its table
    assert made.endswith(" 0 min wall time. Its runs took 20 min in all, some in an earlier sitting."), made


def test_report_claims_summary_gives_each_claim_its_verdict(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import claims
    import registry
    import report
    monkeypatch.setattr(report, "RESULTS", tmp_path)

    def runs(colourfulness):
        return [{"pretext_colourfulness": c, "knn_top1": 0.3, "random_knn_top1": 0.1} for c in colourfulness]

    data = {"colorization_loss": {"classification (rebalanced)": {"runs": runs((0.80, 0.82)), "command": "a"},
                                  "regression (L2)": {"runs": runs((0.45, 0.46)), "command": "b"}}}
    registry.save_result(tmp_path / "claim-colorization_loss.json", "claim", "c", ["common.py"], data, 0.0)
    out = report.render("claims-summary")
    rows = out.splitlines()[2:]
    assert len(rows) == len(claims.CLAIMS)
    assert [r for r in rows if r.startswith("| colorization_loss |")][0].split(" | ")[2] == "holds"
    assert all("not measured yet" in r for r in rows if not r.startswith("| colorization_loss |"))


def test_gpu_table_reads_gpu_checks_runs_and_keeps_them(tmp_path):
    """gpu_check.sh's table (benchmarks/gpu_table.py): warm images/s the median of the second
    half's steps, the loss of the first and last tenth, a failed run named; its raw result
    renders as the same table."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_table
    import report
    run = tmp_path / "rotation-no-compile"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"train_images_per_s": 900.0, "peak_gpu_memory_mb": 1234.0}))
    log = [{"step": i, "loss": 2.0 - i / 10, "images_per_s": 100.0 * i} for i in range(1, 11)]
    (run / "log.jsonl").write_text("\n".join(json.dumps(line) for line in log) + "\n")
    data = gpu_table.main([str(tmp_path), "--steps", "10", "--backbone", "resnet18", "--methods", "rotation",
                           "--result", str(tmp_path / "gpu.json")])
    ok, failed = data["rows"]
    assert ok["warm_images_per_s"] == 800.0 and ok["loss_first"] == pytest.approx(1.9) and ok["loss_last"] == 1.0
    assert failed == {"method": "rotation", "compile": True, "status": "failed: see rotation-compile.log"}
    text = (tmp_path / "table.md").read_text()
    assert "| rotation | False | 800 | 900 | 1234 MB | loss 1.900 -> 1.000 |" in text
    assert "| rotation | True | failed: see rotation-compile.log |" in text
    kept = json.loads((tmp_path / "gpu.json").read_text())
    assert kept["kind"] == "gpu_check" and report.RENDER["gpu_check"](kept["data"]) + "\n" + kept["provenance"] + "\n" == text


def test_gpu_curve_says_in_one_line_what_it_lacks(tmp_path):
    """gpu_curve.sh reads CIFAR-10 from $CIFAR (or unpacks $CIFAR_TAR): without either it
    stops with one line naming what is missing; with a folder it goes on to the GPU check."""
    def run(**env):
        return subprocess.run(["bash", "benchmarks/gpu_curve.sh"], cwd=ROOT, env={**script_env(), **env},
                              capture_output=True, text=True, timeout=120)
    missing = run(CIFAR=str(tmp_path / "none"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert f"no CIFAR-10 JPEG folder at {tmp_path / 'none'}" in missing.stderr
    no_tar = run(CIFAR=str(tmp_path / "none"), CIFAR_TAR=str(tmp_path / "cifar.tar.gz"))
    assert no_tar.returncode == 2 and "cifar.tar.gz: no such file" in no_tar.stderr
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script would start the curve")
    (tmp_path / "cifar" / "train").mkdir(parents=True)
    found = run(CIFAR=str(tmp_path / "cifar"))
    assert found.returncode == 2 and "no CUDA GPU here" in found.stderr
