"""moco.py beside the official MoCo CIFAR-10 demo: images per second on the same images.

    git clone https://github.com/facebookresearch/moco /tmp/moco    # the demo: colab/moco_cifar10_demo.ipynb
    python benchmarks/reference_speed.py --moco-demo /tmp/moco/colab/moco_cifar10_demo.ipynb \\
        --data-dir /tmp/cifar10-jpg --out runs/reference-speed.md

Both train the same thing for --steps steps: a ResNet-18 with the CIFAR stem, a linear
128-d head, batch 128, queue K = 4096, 8 batch-norm splits, momentum 0.99, temperature
0.1, SGD at lr 0.06, crops down to 8% of the image (the demo's settings, with its batch
of 512 lowered to 128 as the issue that asked for this comparison). --data-dir is an
ImageFolder-style folder with train/<class>/*.jpg (CIFAR-10 as JPEGs, see
../shared/data/README.md). Each side runs in a fresh process, one after the other, with
the same threads and --workers, --repeats times, alternating.

The demo's code is read from your copy of the notebook when this runs and executed as
it is: the cells that define its arguments, data, SplitBatchNorm, ModelBase, ModelMoCo
and train(), and the cell with its training loop. Nothing of it is in this repository.
Only its surroundings are replaced, each because the demo could not run here otherwise:
torchvision's CIFAR10 (which downloads) reads the same JPEG folder; `.cuda()` is a no-op
on a machine without a GPU; tqdm becomes a plain loop; the loader gets --workers (the
demo has 16); the kNN monitor after each epoch is skipped (moco.py runs with
--monitor-every 0 too); training stops after --steps batches.

Timing: the time of a step is the time from one batch being asked for to the next
(data wait + the whole step); images/s is taken over the steps after the first WARM.
The mean loss of the last 10 steps is printed beside it: the same loss on the same
data should fall alike, a check that both do the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from registry import ROOT  # noqa: E402

WARM = 5  # steps before the timed ones: allocations, caches and the loader's first batches
SETTINGS = {"batch_size": 128, "queue_size": 4096, "bn_splits": 8, "momentum": 0.99, "temperature": 0.1,
            "lr": 0.06, "dim": 128}


class StopTraining(Exception):
    """Raised by the timed loader after --steps batches: ends the demo's training loop."""


class TimedLoader:
    """Yields the first `steps` batches of `loader`, noting when each one is handed over
    and when the loop asks for the one after the last; then stops the training loop.
    Step i's time: from batch i handed over to batch i + 1 handed over (its data wait
    included, as in moco.py's log)."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps, self.batch_size = loader, steps, loader.batch_size
        self.times: list[float] = []

    def __len__(self):
        return self.steps

    def __iter__(self):
        batches = iter(self.loader)
        for _ in range(self.steps):
            batch = next(batches, None)
            if batch is None:  # a small folder: the next pass over it
                batches = iter(self.loader)
                batch = next(batches)
            self.times.append(time.perf_counter())
            yield batch
        self.times.append(time.perf_counter())
        raise StopTraining


class _Bar:
    """tqdm's place: the plain iterable, and set_description does nothing."""

    def __init__(self, iterable, **_):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_description(self, *_):
        pass


def folder_cifar10(data_dir: Path):
    """A stand-in for torchvision's CIFAR10 that reads an image folder instead of
    downloading: .data (N, H, W, 3) uint8, .targets, .classes, as the demo uses them."""
    import numpy as np
    from PIL import Image

    decoded = {}

    class FolderCIFAR10(torch.utils.data.Dataset):
        def __init__(self, root=None, train=True, transform=None, download=False, **_):
            split = data_dir / ("train" if train else "test")
            self.classes = sorted(p.name for p in split.iterdir() if p.is_dir())
            files = [(f, c) for c, name in enumerate(self.classes) for f in sorted((split / name).iterdir())]
            # Decoded once (the demo builds the training set twice); the test split is built
            # by the demo but never read here (the kNN monitor is skipped).
            if train and "train" not in decoded:
                decoded["train"] = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
            self.data = decoded["train"] if train else np.zeros((len(files), 1, 1, 3), np.uint8)
            self.targets = [c for _, c in files]
            self.transform = transform

        def __len__(self):
            return len(self.data)

    return FolderCIFAR10


def run_moco_demo(notebook: Path, data_dir: Path, steps: int, workers: int, seed: int, out: Path) -> dict:
    """The demo's own cells, with the stand-ins above; returns step times and losses."""
    cells = ["".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]

    def cell(marker):
        found = [c for c in cells if marker in c]
        if len(found) != 1:
            raise SystemExit(f"reference_speed: {notebook} does not look like the MoCo CIFAR-10 demo "
                             f"({len(found)} cells contain {marker!r})")
        return found[0]

    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.manual_seed(seed)
    # The names the demo's first cell imports (that cell also runs `!nvidia-smi`, not Python).
    import argparse as _argparse
    import math
    from datetime import datetime
    from functools import partial

    import torch.nn as nn
    import torch.nn.functional as F
    from PIL import Image
    from torch.utils.data import DataLoader
    from torchvision import transforms
    from torchvision.models import resnet
    ns = {"argparse": _argparse, "datetime": datetime, "partial": partial, "Image": Image, "DataLoader": DataLoader,
          "transforms": transforms, "CIFAR10": folder_cifar10(data_dir), "resnet": resnet, "tqdm": _Bar,
          "json": json, "math": math, "os": os, "torch": torch, "nn": nn, "F": F, "__name__": "moco_demo"}
    exec(cell("parser = argparse.ArgumentParser"), ns)
    args = ns["args"]
    args.batch_size, args.moco_k, args.bn_splits = SETTINGS["batch_size"], SETTINGS["queue_size"], SETTINGS["bn_splits"]
    args.moco_m, args.moco_t, args.lr, args.moco_dim = (SETTINGS["momentum"], SETTINGS["temperature"], SETTINGS["lr"],
                                                        SETTINGS["dim"])
    args.results_dir = str(out)
    exec(cell("class CIFAR10Pair"), ns)
    ns["train_loader"] = TimedLoader(DataLoader(ns["train_data"], batch_size=args.batch_size, shuffle=True,
                                                num_workers=workers, drop_last=True), steps)
    for marker in ("class SplitBatchNorm", "class ModelMoCo", "def train(", "def knn_predict"):
        exec(cell(marker), ns)
    ns["test"] = lambda *a, **k: float("nan")  # the kNN monitor: not timed (moco.py: --monitor-every 0)
    losses = []
    ns["model"].register_forward_hook(lambda module, inputs, loss: losses.append(loss.item()))
    try:
        exec(cell("# training loop"), ns)
    except StopTraining:
        pass
    times = ns["train_loader"].times
    return {"step_s": [b - a for a, b in zip(times, times[1:])], "losses": losses, "batch": args.batch_size}


def run_moco_py(data_dir: Path, steps: int, workers: int, seed: int, out: Path) -> dict:
    """moco.py by its command line, logging every step; returns step times and losses."""
    s = SETTINGS
    command = [sys.executable, str(ROOT / "moco.py"), "--dataset", "folder", "--data-dir", str(data_dir),
               "--backbone", "resnet18", "--batch-size", str(s["batch_size"]), "--queue-size", str(s["queue_size"]),
               "--bn-splits", str(s["bn_splits"]), "--momentum", str(s["momentum"]),
               "--temperature", str(s["temperature"]), "--lr", str(s["lr"]), "--dim", str(s["dim"]),
               "--min-crop", "0.08", "--workers", str(workers), "--seed", str(seed), "--max-steps", str(steps),
               "--no-eval", "--monitor-every", "0", "--log-every", "0", "--save-every", "0", "--out", str(out / "run")]
    with open(out / "moco.log", "w") as f:
        if subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"reference_speed: moco.py failed, see {out / 'moco.log'}")
    records = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]  # training steps (the kNN monitor writes other records)
    # elapsed_s is noted at run.log, after the step (and its data wait): step i's time is
    # the gap between records i - 1 and i (the first step's start is not logged).
    ends = [r["elapsed_s"] for r in records]
    return {"step_s": [None] + [b - a for a, b in zip(ends, ends[1:])], "losses": [r["loss"] for r in records],
            "batch": s["batch_size"]}


def summary(result: dict) -> dict:
    """images/s over the steps after WARM, and the mean loss of the last 10 steps."""
    timed = result["step_s"][WARM:]
    seconds = sum(timed)
    return {"images_per_s": result["batch"] * len(timed) / seconds, "ms_per_step": 1000 * seconds / len(timed),
            "loss_last10": statistics.mean(result["losses"][-10:])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moco-demo", required=True, help="your copy of colab/moco_cifar10_demo.ipynb")
    p.add_argument("--data-dir", required=True, help="image folder with train/<class>/*.jpg (CIFAR-10 as JPEGs)")
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    p.add_argument("--workers", type=int, default=2, help="data loader processes, both sides")
    p.add_argument("--out", default="runs/reference-speed.md")
    p.add_argument("--side", choices=("demo",), help=argparse.SUPPRESS)  # internal: one side in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    notebook, data_dir = Path(a.moco_demo), Path(a.data_dir)
    for path, what in ((notebook, "--moco-demo"), (data_dir / "train", "--data-dir .../train")):
        if not path.exists():
            raise SystemExit(f"reference_speed: {what} not found: {path}")
    if a.steps <= WARM + 10:
        raise SystemExit(f"reference_speed: --steps must be above {WARM + 10} (warm-up steps + the loss window)")
    if a.side == "demo":
        result = run_moco_demo(notebook, data_dir, a.steps, a.workers, a.seed, Path(a.result).parent)
        Path(a.result).write_text(json.dumps(result))
        return

    rows = []
    for repeat in range(a.repeats):
        for side in ("moco.py", "demo"):
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                if side == "demo":
                    command = [sys.executable, __file__, "--side", "demo", "--moco-demo", str(notebook),
                               "--data-dir", str(data_dir), "--steps", str(a.steps), "--workers", str(a.workers),
                               "--seed", str(repeat), "--result", str(tmp / "result.json")]
                    with open(tmp / "demo.log", "w") as log:  # the demo prints its arguments and model
                        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode:
                            lines = (tmp / "demo.log").read_text().strip().splitlines()
                            raise SystemExit(f"reference_speed: the demo failed: {lines[-1] if lines else ''}")
                    result = json.loads((tmp / "result.json").read_text())
                else:
                    result = run_moco_py(data_dir, a.steps, a.workers, repeat, tmp)
            rows.append({"side": side, "repeat": repeat, **summary(result)})
            print(f"{side:8s} repeat {repeat}: {rows[-1]['images_per_s']:.1f} images/s, "
                  f"{rows[-1]['ms_per_step']:.0f} ms/step, loss (last 10 steps) {rows[-1]['loss_last10']:.3f}",
                  flush=True)
    write_table(rows, a, Path(a.out))


def write_table(rows: list[dict], a, out: Path):
    def median(side, key):
        return statistics.median(r[key] for r in rows if r["side"] == side)

    ratio = median("moco.py", "images_per_s") / median("demo", "images_per_s")
    lines = [f"MoCo on {a.data_dir}, ResNet-18 (CIFAR stem), batch {SETTINGS['batch_size']}, "
             f"K {SETTINGS['queue_size']}, {SETTINGS['bn_splits']} BN splits, {a.steps} steps "
             f"(the first {WARM} not timed), --workers {a.workers}, device "
             f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} threads; "
             f"{a.repeats} runs a side, alternating.", "",
             "| code | images/s (median) | ms/step | loss, last 10 steps | runs (images/s) |", "|---|---|---|---|---|"]
    for side in ("moco.py", "demo"):
        runs = ", ".join(f"{r['images_per_s']:.1f}" for r in rows if r["side"] == side)
        lines.append(f"| {side} | {median(side, 'images_per_s'):.1f} | {median(side, 'ms_per_step'):.0f} | "
                     f"{median(side, 'loss_last10'):.3f} | {runs} |")
    lines += ["", f"moco.py / demo, images/s: {ratio:.2f}x"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
