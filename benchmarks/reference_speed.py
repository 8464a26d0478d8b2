"""moco.py and simclr.py beside the reference code they follow: images/s on the same images.

    git clone https://github.com/facebookresearch/moco && git -C moco checkout f736491   # colab/moco_cifar10_demo.ipynb
    git clone https://github.com/p3i0t/SimCLR-CIFAR10 && git -C SimCLR-CIFAR10 checkout 2f449c2   # simclr.py, models.py
    python benchmarks/reference_speed.py --data-dir data/cifar10-jpg --out runs/reference-speed.md \
        --moco-demo moco/colab/moco_cifar10_demo.ipynb --simclr-repo SimCLR-CIFAR10

(Give one of --moco-demo / --simclr-repo to run only that pair.) --data-dir is an
ImageFolder-style folder with train/<class>/*.jpg (CIFAR-10 as JPEGs: benchmarks/cifar_jpegs.py).

Each pair trains the same network for --steps steps on the same images: a ResNet-18
with the CIFAR stem, batch 128, crops down to 8% of the image.
  moco.py vs the official MoCo CIFAR-10 demo (facebookresearch/moco, colab/): linear
    128-d head, queue K = 4096, 8 batch-norm splits, momentum 0.99, temperature 0.1, SGD
    at lr 0.06 (the demo's settings, its batch of 512 lowered to 128).
  simclr.py vs p3i0t/SimCLR-CIFAR10 (a compact, much-used SimCLR for CIFAR-10):
    temperature 0.5, colour strength 0.5, SGD at lr 0.15 (0.3 x 128 / 256 for both);
    each keeps its own head and weight decay, which cost next to nothing.
Each side runs in a fresh process, one after the other, --repeats times, alternating,
with the same threads, once for each number of loader processes in --workers (0, 1 and
2 by default): each side's best setting differs (moco.py's in-memory data needs no loader
process, the reference code decodes and augments image by image in them, competing with
training for the same cores), so the ratio compares each side's best with the other's.

The reference code is read from your copy when this runs and executed as it is;
nothing of it is in this repository. Only its surroundings are replaced, each because
it could not run here otherwise: torchvision's CIFAR10 (which downloads) reads the same
JPEG folder; on a machine without a GPU `.cuda()` is a no-op (and SimCLR-CIFAR10's
`assert torch.cuda.is_available()` passes); tqdm is a plain loop; hydra's decorator
passes the arguments through; the loader gets --workers; the demo's kNN monitor after
each epoch is skipped (ours run with --monitor-every 0 too); training stops after
--steps batches.

Timing: a step's time runs from its batch being handed over to the next batch being
handed over (its data wait included, as in our run log); images/s is taken over the
steps after the first WARM. The mean loss of the last 10 steps is printed beside it:
the same loss on the same data should fall alike, a check that both do the same work.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from registry import ROOT, provenance, save_result  # noqa: E402

WARM = 5  # steps before the timed ones: allocations, caches and the loader's first batches
BATCH = 128
MOCO = {"queue_size": 4096, "bn_splits": 8, "momentum": 0.99, "temperature": 0.1, "lr": 0.06, "dim": 128}
SIMCLR = {"temperature": 0.5, "lr": 0.15, "color_strength": 0.5}


class StopTraining(Exception):
    """Raised by the timed loader after --steps batches: ends the reference's training loop."""


class TimedLoader:
    """Yields the first `steps` batches of `loader`, noting when each one is handed over
    and when the loop asks for the one after the last; then stops the training loop.
    Step i's time: from batch i handed over to batch i + 1 handed over (its data wait
    included, as in moco.py's log)."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps, self.batch_size = loader, steps, loader.batch_size
        self.times: list[float] = []

    def __len__(self):  # the whole loader's: the reference's schedule is as in a real run
        return len(self.loader)

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


def folder_cifar10(data_dir: Path, test_split: bool = False):
    """A stand-in for torchvision's CIFAR10 that reads an image folder instead of
    downloading: .data (N, H, W, 3) uint8, .targets, .classes, as the demo uses them.
    The test split is decoded only with `test_split` (the speed runs never read it)."""
    import numpy as np
    from PIL import Image

    decoded = {}

    class FolderCIFAR10(torch.utils.data.Dataset):
        def __init__(self, root=None, train=True, transform=None, download=False, **_):
            split = "train" if train else "test"
            folder = data_dir / split
            self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
            files = [(f, c) for c, name in enumerate(self.classes) for f in sorted((folder / name).iterdir())]
            # Each split decoded once (the demo builds the training set twice).
            if (train or test_split) and split not in decoded:
                decoded[split] = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
            self.data = decoded.get(split, np.zeros((len(files), 1, 1, 3), np.uint8))
            self.targets = [c for _, c in files]
            self.transform = transform

        def __len__(self):
            return len(self.data)

        def __getitem__(self, index):  # as torchvision's CIFAR10 (the demo's CIFAR10Pair has its own)
            image = Image.fromarray(self.data[index])
            return (self.transform(image) if self.transform else image), self.targets[index]

    return FolderCIFAR10


def without_gpu():
    """On a machine without a GPU, `.cuda()` leaves tensors and modules where they are."""
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self
        return True
    return False


def moco_demo(notebook: Path, data_dir: Path, seed: int, workers: int, out: Path, settings: dict | None = None,
              test_split: bool = False) -> dict:
    """The demo's own cells, from its arguments to its kNN monitor, executed as they are in
    one namespace with the stand-ins above; `settings` change its arguments before its data
    and model are built. Its three loaders get `workers` processes (its 16 would crowd a
    small machine). Returns the namespace: args, model, train_loader, memory_loader,
    test_loader, train, test, and the rest."""
    cells = ["".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]

    def cell(marker):
        found = [c for c in cells if marker in c]
        if len(found) != 1:
            raise SystemExit(f"{notebook} does not look like the MoCo CIFAR-10 demo "
                             f"({len(found)} cells contain {marker!r})")
        return found[0]

    without_gpu()
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
          "transforms": transforms, "CIFAR10": folder_cifar10(data_dir, test_split), "resnet": resnet, "tqdm": _Bar,
          "json": json, "math": math, "os": os, "torch": torch, "nn": nn, "F": F, "__name__": "moco_demo"}
    exec(cell("parser = argparse.ArgumentParser"), ns)
    for key, value in (settings or {}).items():
        setattr(ns["args"], key, value)
    ns["args"].results_dir = str(out)
    exec(cell("class CIFAR10Pair"), ns)
    for name, shuffle in (("train_loader", True), ("memory_loader", False), ("test_loader", False)):
        ns[name] = DataLoader(ns[name].dataset, batch_size=ns["args"].batch_size, shuffle=shuffle,
                              num_workers=workers, drop_last=shuffle)
    for marker in ("class SplitBatchNorm", "class ModelMoCo", "def train(", "def knn_predict"):
        exec(cell(marker), ns)
    ns["training_loop"] = cell("# training loop")
    return ns


def run_moco_demo(notebook: Path, data_dir: Path, steps: int, workers: int, seed: int, out: Path) -> dict:
    """The demo's training loop, timed; returns step times and losses."""
    ns = moco_demo(notebook, data_dir, seed, workers, out,
                   {"batch_size": BATCH, "moco_k": MOCO["queue_size"], "bn_splits": MOCO["bn_splits"],
                    "moco_m": MOCO["momentum"], "moco_t": MOCO["temperature"], "lr": MOCO["lr"],
                    "moco_dim": MOCO["dim"]})
    ns["train_loader"] = TimedLoader(ns["train_loader"], steps)
    ns["test"] = lambda *a, **k: float("nan")  # the kNN monitor: not timed (moco.py: --monitor-every 0)
    losses = []
    ns["model"].register_forward_hook(lambda module, inputs, loss: losses.append(loss.item()))
    try:
        exec(ns["training_loop"], ns)
    except StopTraining:
        pass
    times = ns["train_loader"].times
    return {"step_s": [b - a for a, b in zip(times, times[1:])], "losses": losses, "batch": BATCH}


def stand_in(name: str) -> types.ModuleType:
    """An empty module in the place of `name` for the reference's imports (with a spec,
    as importlib.util.find_spec, which torch uses, expects one)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = module
    return module


def run_simclr_reference(repo: Path, data_dir: Path, steps: int, workers: int, seed: int, out: Path) -> dict:
    """p3i0t/SimCLR-CIFAR10's train() from its simclr.py (with its models.py), as it is,
    with the stand-ins above; returns step times and losses."""
    if without_gpu():
        torch.cuda.is_available = lambda: True  # its first line asserts a GPU; .cuda() is a no-op now
    hydra, omegaconf, tqdm = (stand_in(name) for name in ("hydra", "omegaconf", "tqdm"))
    hydra.main = lambda *a, **k: (lambda f: f)  # the config comes from this script instead
    hydra.utils = types.SimpleNamespace(to_absolute_path=lambda path: path)
    omegaconf.DictConfig = types.SimpleNamespace
    tqdm.tqdm = _Bar
    import torchvision.datasets
    torchvision.datasets.CIFAR10 = folder_cifar10(data_dir)
    sys.path.insert(0, str(repo))  # its `from models import SimCLR`
    spec = importlib.util.spec_from_file_location("reference_simclr", repo / "simclr.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    loaders = []

    def timed_loader(*a, **k):
        loaders.append(TimedLoader(torch.utils.data.DataLoader(*a, **k), steps))
        return loaders[-1]

    losses = []

    def nt_xent(*a, **k):
        loss = loss_fn(*a, **k)
        losses.append(loss.item())
        return loss

    loss_fn, reference.nt_xent, reference.DataLoader = reference.nt_xent, nt_xent, timed_loader
    # Its simclr_config.yml, with this comparison's batch, lr, temperature and --workers.
    args = types.SimpleNamespace(dataset="cifar10", data_dir=str(data_dir), backbone="resnet18", projection_dim=128,
                                 seed=42, batch_size=BATCH, workers=workers, epochs=1000, log_interval=50,
                                 optimizer="sgd", learning_rate=SIMCLR["lr"], momentum=0.9, weight_decay=1e-6,
                                 temperature=SIMCLR["temperature"])
    torch.manual_seed(seed)
    os.chdir(out)  # where it would save a checkpoint (not reached in --steps steps)
    try:
        reference.train(args)
    except StopTraining:
        pass
    times = loaders[0].times
    return {"step_s": [b - a for a, b in zip(times, times[1:])], "losses": losses, "batch": BATCH}


def run_ours(method: str, argv: list[str], steps: int, workers: int, seed: int, out: Path) -> dict:
    """moco.py or simclr.py by its command line, logging every step; step times and losses."""
    command = [sys.executable, str(ROOT / f"{method}.py"), "--dataset", "folder", "--backbone", "resnet18",
               "--batch-size", str(BATCH), "--min-crop", "0.08", *argv, "--workers", str(workers), "--seed", str(seed),
               "--max-steps", str(steps), "--no-eval", "--monitor-every", "0", "--log-every", "0", "--save-every", "0",
               "--out", str(out / "run")]
    with open(out / "ours.log", "w") as f:
        if subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
            lines = (out / "ours.log").read_text().strip().splitlines()
            raise SystemExit(f"reference_speed: {method}.py failed: {lines[-1] if lines else ''}")
    records = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]  # training steps (the kNN monitor writes other records)
    # elapsed_s is noted at run.log, after the step (and its data wait): step i's time is
    # the gap between records i - 1 and i (the first step's start is not logged).
    ends = [r["elapsed_s"] for r in records]
    return {"step_s": [None] + [b - a for a, b in zip(ends, ends[1:])], "losses": [r["loss"] for r in records],
            "batch": BATCH}


def summary(result: dict) -> dict:
    """images/s over the steps after WARM, and the mean loss of the last 10 steps."""
    timed = result["step_s"][WARM:]
    seconds = sum(timed)
    return {"images_per_s": result["batch"] * len(timed) / seconds, "ms_per_step": 1000 * seconds / len(timed),
            "loss_last10": statistics.mean(result["losses"][-10:])}


PAIRS = {  # ours: its script and options; the reference: the option naming your copy, its runner, its name
    "moco": {"ours": "moco", "options": [f"--{k.replace('_', '-')}={v}" for k, v in MOCO.items()],
             "option": "moco_demo", "run": run_moco_demo, "name": "MoCo CIFAR-10 demo"},
    "simclr": {"ours": "simclr", "options": [f"--{k.replace('_', '-')}={v}" for k, v in SIMCLR.items()],
               "option": "simclr_repo", "run": run_simclr_reference, "name": "SimCLR-CIFAR10"},
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moco-demo", help="your copy of facebookresearch/moco's colab/moco_cifar10_demo.ipynb")
    p.add_argument("--simclr-repo", help="your clone of p3i0t/SimCLR-CIFAR10 (simclr.py, models.py)")
    p.add_argument("--data-dir", required=True, help="image folder with train/<class>/*.jpg (CIFAR-10 as JPEGs)")
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="data loader processes: each setting for both sides; the ratio takes each side's best")
    p.add_argument("--out", default="runs/reference-speed.md")
    p.add_argument("--reference", choices=tuple(PAIRS), help=argparse.SUPPRESS)  # internal: run one reference here
    p.add_argument("--result", help="also keep the raw figures here (results/<name>.json, for benchmarks/report.py)")
    p.add_argument("--reference-result", help=argparse.SUPPRESS)  # internal: where a reference run writes its figures
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    data_dir = Path(a.data_dir).resolve()
    pairs = [name for name, pair in PAIRS.items() if getattr(a, pair["option"])]
    if not pairs:
        raise SystemExit("reference_speed: give --moco-demo, --simclr-repo or both (see --help)")
    for path, what in [(Path(getattr(a, PAIRS[n]["option"])), "--" + PAIRS[n]["option"].replace("_", "-"))
                       for n in pairs] + \
            [(data_dir / "train", "--data-dir .../train")]:
        if not path.exists():
            raise SystemExit(f"reference_speed: {what} not found: {path}")
    if a.steps <= WARM + 10:
        raise SystemExit(f"reference_speed: --steps must be above {WARM + 10} (warm-up steps + the loss window)")
    if a.reference:
        pair = PAIRS[a.reference]
        result = pair["run"](Path(getattr(a, pair["option"])).resolve(), data_dir, a.steps, a.workers[0], a.seed,
                             Path(a.reference_result).parent)
        Path(a.reference_result).write_text(json.dumps(result))
        return

    rows, started = [], time.time()
    for name in pairs:
        pair = PAIRS[name]
        method, reference = pair["ours"], pair["name"]
        for workers in a.workers:
            for repeat in range(a.repeats):
                for side in (f"{method}.py", reference):
                    with tempfile.TemporaryDirectory() as tmp:
                        tmp = Path(tmp)
                        if side == reference:
                            result = run_reference(name, Path(getattr(a, pair["option"])).resolve(), data_dir, a,
                                                   repeat, workers, tmp)
                        else:
                            result = run_ours(method, ["--data-dir", str(data_dir), *pair["options"]], a.steps,
                                              workers, repeat, tmp)
                    rows.append({"pair": name, "side": side, "workers": workers, "repeat": repeat, **summary(result)})
                    print(f"{side:20s} --workers {workers} repeat {repeat}: {rows[-1]['images_per_s']:.1f} images/s, "
                          f"{rows[-1]['ms_per_step']:.0f} ms/step, loss (last 10 steps) "
                          f"{rows[-1]['loss_last10']:.3f}", flush=True)
    data = {"data_dir": a.data_dir, "steps": a.steps, "repeats": a.repeats, "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "rows": rows}
    text = table(data) + "\n" + provenance(started) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)
    if a.result:
        given = "python benchmarks/reference_speed.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        code = sorted({PAIRS[n]["ours"] + ".py" for n in pairs}) + ["common.py", "benchmarks/reference_speed.py"]
        save_result(a.result, "reference_speed", given, code, data, started)
    return text


def run_reference(name: str, path: Path, data_dir: Path, a, repeat: int, workers: int, tmp: Path) -> dict:
    """One reference run in a fresh process (its stand-ins stay there); its output in a log."""
    option = "--" + PAIRS[name]["option"].replace("_", "-")
    command = [sys.executable, __file__, "--reference", name, option, str(path), "--data-dir", str(data_dir),
               "--steps", str(a.steps), "--workers", str(workers), "--seed", str(repeat),
               "--reference-result", str(tmp / "result.json")]
    with open(tmp / "reference.log", "w") as log:  # the demo prints its arguments and model
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode:
            lines = (tmp / "reference.log").read_text().strip().splitlines()
            raise SystemExit(f"reference_speed: {PAIRS[name]['name']} failed: {lines[-1] if lines else 'no output'}")
    return json.loads((tmp / "result.json").read_text())


def table(data: dict) -> str:
    """Every side at every --workers setting (medians over the repeats), then each pair's
    ratio of the best setting of ours to the best setting of the reference."""
    rows = data["rows"]

    def median(side, workers, key):
        return statistics.median(r[key] for r in rows if r["side"] == side and r["workers"] == workers)

    lines = [f"On {data['data_dir']}: ResNet-18 (CIFAR stem), batch {BATCH}, {data['steps']} steps (the first {WARM} "
             f"not timed), device {data['device']}, {data['threads']} threads; {data['repeats']} run(s) a side and "
             f"setting, alternating.", "",
             "| code | --workers | images/s (median) | ms/step | loss, last 10 steps | runs (images/s) |",
             "|---|---|---|---|---|---|"]
    ratios = []
    for name in dict.fromkeys(r["pair"] for r in rows):
        sides = (PAIRS[name]["ours"] + ".py", PAIRS[name]["name"])
        best = {}
        for side in sides:
            for workers in dict.fromkeys(r["workers"] for r in rows if r["side"] == side):
                runs = ", ".join(f"{r['images_per_s']:.1f}" for r in rows if r["side"] == side and r["workers"] == workers)
                speed = median(side, workers, "images_per_s")
                lines.append(f"| {side} | {workers} | {speed:.1f} | {median(side, workers, 'ms_per_step'):.0f} | "
                             f"{median(side, workers, 'loss_last10'):.3f} | {runs} |")
                if speed > best.get(side, (0, None))[0]:
                    best[side] = (speed, workers)
        (ours, w_ours), (theirs, w_theirs) = best[sides[0]], best[sides[1]]
        ratios.append(f"{sides[0]} at its best ({ours:.1f} images/s, --workers {w_ours}) against {sides[1]} at its "
                      f"best ({theirs:.1f}, --workers {w_theirs}): {ours / theirs:.2f}x.")
    return "\n".join(lines + ["", *ratios]) + "\n"


if __name__ == "__main__":
    main()
