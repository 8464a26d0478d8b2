"""moco.py on the official MoCo CIFAR-10 demo's curve: kNN accuracy epoch by epoch, measured
as the demo measures it, beside the demo's own log.

    python benchmarks/official_curve.py --data-dir data/cifar10-jpg --epochs 1 --out runs/official-curve
    python benchmarks/official_curve.py --data-dir data/cifar10-jpg --epochs 30 --minutes 8 --device cuda --out runs/curve-gpu
    python benchmarks/official_curve.py --data-dir data/cifar10-jpg --epochs 10 --out runs/official-curve --resume
        # continues a stopped curve: the epochs measured are kept (curve.json, written as each ends),
        # moco.py goes on from its last checkpoint (--save-every minutes inside an epoch)

moco.py runs with the demo's settings (facebookresearch/moco, colab/moco_cifar10_demo.ipynb,
commit f736491, the last with colab/): ResNet-18 with the CIFAR stem, batch 512, SGD lr 0.06,
weight decay 5e-4, K 4096, m 0.99, t 0.1, 8 batch-norm splits, a linear 128-d head, cosine
schedule over 200 epochs, RandomResizedCrop(32) of 8% to all of the image, the demo's colour
jitter, at CIFAR-10's native 32 px. It stops after each epoch (--max-steps, a schedule of
200 epochs as the demo's) and is continued with --resume, as a user would; after each
epoch this script evaluates the checkpoint's query encoder f_q twice:
  - as the demo's monitor does: weighted kNN (k 200, t 0.1) on f_q's 128-d head output
    (its ModelBase ends with the fc layer), over all training and test images;
  - as this project's protocol does: the same kNN on the 512-d backbone features;
each beside the same encoder with random weights. One difference stays: the demo
normalises images with CIFAR-10's mean and std, moco.py with ImageNet's (--extra
"--normalize cifar10" switches moco.py to the demo's; the encoders measured then too).

With --demo-notebook (your copy of the demo's notebook) the demo's own code runs instead
of moco.py, on the same images, and is measured by its own kNN monitor, test(), at random
init and after each epoch: the demo's curve as it comes out on this machine and seed,
beside its log. Its cells are executed as they are, with reference_speed.py's stand-ins
(the JPEG folder in the place of torchvision's CIFAR10, `.cuda()` a no-op without a GPU,
--workers loader processes); the epochs are driven as its training loop does (its
optimizer line, then train() and test() per epoch of its 200-epoch schedule).

    python benchmarks/official_curve.py --data-dir data/cifar10-jpg --epochs 1 --out runs/demo-curve \
        --demo-notebook moco/colab/moco_cifar10_demo.ipynb
        # stopped? the same command with --resume goes on after its last epoch (its state is
        # kept after each: model and queue, optimizer, random state), as if never stopped

With --demo-notebook and --checkpoint (a moco.py checkpoint, such as <out>/moco/checkpoint.pt
of a curve) nothing trains: that checkpoint's f_q is measured by the demo's own test(), its
inputs taken back from the demo's normalisation to the one moco.py trained with. Beside
this script's own figure for the same f_q, it says whether the two monitors agree.

The demo's figures (DEMO_LOG) are copied from its notebook's output cells. Output:
<out>/curve.md (the table, with the wall time and a provenance line) and each epoch's
figures in <out>/curve.json; moco.py's run is <out>/moco/.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import moco  # noqa: E402

from registry import provenance, save_result  # noqa: E402

# kNN top-1 (%) after epochs of the demo's training log: its notebook's output cells,
# "Test Epoch: [e/200] Acc@1:...%" (facebookresearch/moco, colab/moco_cifar10_demo.ipynb,
# commit f736491): the first ten epochs, and a few later ones.
DEMO_LOG = {1: 31.98, 2: 33.52, 3: 34.71, 4: 36.98, 5: 37.95, 6: 39.87, 7: 41.86, 8: 44.18, 9: 46.34, 10: 48.03,
            50: 73.3, 100: 78.06, 150: 81.18, 200: 82.58}
DEMO = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "512", "--lr", "0.06", "--weight-decay",
        "5e-4", "--queue-size", "4096", "--momentum", "0.99", "--temperature", "0.1", "--bn-splits", "8",
        "--min-crop", "0.08", "--augmentation", "demo", "--epochs", "200", "--schedule", "cosine"]
# The code the curve measures: a change to any of these makes its table stale (benchmarks/report.py).
CODE = ["moco.py", "common.py", "benchmarks/official_curve.py", "benchmarks/registry.py"]
DEMO_CODE = ["benchmarks/official_curve.py", "benchmarks/reference_speed.py", "benchmarks/registry.py"]  # the demo's run
ON_THE_CURVE = 2.0  # points: within this of the demo's figure counts as on its curve
VERDICT_EPOCHS = (5, 10)  # where training, not the seed, decides: the demo gains 6 and 16 points by then


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="folder", help="folder (CIFAR-10 as JPEGs) or cifar10 (torchvision's)")
    p.add_argument("--data-dir", required=True, help="the JPEG folder, or where torchvision's CIFAR-10 is")
    p.add_argument("--epochs", type=int, default=1, help="epochs to run and evaluate (of the demo's 200)")
    p.add_argument("--minutes", type=float, default=0, help="stop after the epoch that ends past this many minutes "
                                                           "(0: run all --epochs); for a GPU lent for a while")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", default="", help="more options for moco.py after the demo's (the tests shrink it)")
    p.add_argument("--demo-notebook", default="", help="your copy of the demo's colab/moco_cifar10_demo.ipynb: run "
                                                         "its own code instead of moco.py, measured by its own test()")
    p.add_argument("--checkpoint", default="", help="with --demo-notebook: measure this moco.py checkpoint's f_q by "
                                                    "the demo's test(), training nothing")
    p.add_argument("--out", required=True, help="folder for moco.py's run and the table")
    p.add_argument("--resume", action="store_true", help="continue the curve in --out where it stopped: the epochs "
                                                        "measured are kept, moco.py goes on from its checkpoint "
                                                        "(with --demo-notebook: the demo's code from its last epoch)")
    p.add_argument("--result", default="", help="also keep the raw result here, results/<name>.json, which "
                                                "benchmarks/report.py renders (the curve's: rewritten after every epoch)")
    p.add_argument("--save-every", type=float, default=10.0, help="minutes between moco.py's checkpoints inside an "
                                                                  "epoch, so a stopped curve loses at most this")
    return p.parse_args(argv)


def encoder_from(state: dict | None, a) -> moco.Encoder:
    """The query encoder f_q as moco.py builds it, with the checkpoint's weights (None: random)."""
    args = common.parse_args(moco.Args, moco_argv(a, Path("unused")))
    backbone, width = common.build_backbone(args.backbone, args.image_size)
    f_q = moco.Encoder(moco.use_split_bn(backbone, args.bn_splits), width, args.dim, args.mlp, moco.normalizer(args))
    if state is not None:
        f_q.load_state_dict(state)
    return f_q


@torch.no_grad()
def knn_both(f_q: moco.Encoder, data, device) -> dict:
    """kNN top-1 (%) on the head output (the demo's) and on the backbone (ours), all images."""
    f_q = f_q.to(device).eval()
    feats = {"head": [], "backbone": []}
    labels = {}
    for split, dataset in (("train", data.train), ("test", data.test)):
        h_all, z_all, y_all = [], [], []
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=512):
            h = f_q.backbone(f_q.normalize(common.to_float(x, device)))
            h_all.append(h.float())
            z_all.append(f_q.head(h).float())
            y_all.append(y.to(device))
        feats["backbone"].append(torch.cat(h_all))
        feats["head"].append(torch.cat(z_all))
        labels[split] = torch.cat(y_all)
    return {kind: 100 * common.knn_accuracy(F.normalize(tr, dim=1), labels["train"], F.normalize(te, dim=1),
                                            labels["test"], k=200, temperature=0.1)
            for kind, (tr, te) in feats.items()}


def moco_argv(a, out: Path) -> list[str]:
    return [*DEMO, "--dataset", a.dataset, "--data-dir", a.data_dir, "--device", a.device, "--workers",
            str(a.workers), "--seed", str(a.seed), "--monitor-every", "0", "--no-eval", "--log-every", "30",
            "--save-every", str(a.save_every), *a.extra.split(), "--out", str(out)]


def table(rows: list[dict], random: dict, wall: float, started: float) -> str:
    """The markdown table: each epoch's figures beside the demo's log, and the verdict."""
    lines = ["| epoch | the demo's log: kNN on the head output | moco.py, the same | difference | "
             "moco.py: kNN on the backbone (our protocol) |", "|---|---|---|---|---|",
             f"| 0 (random init) | | {random['head']:.2f} | | {random['backbone']:.2f} |"]
    for r in rows:
        demo = DEMO_LOG.get(r["epoch"])
        diff = f"{r['head'] - demo:+.2f}" if demo is not None else ""
        lines.append(f"| {r['epoch']} | {demo if demo is not None else '(not logged)'} | {r['head']:.2f} | {diff} | "
                     f"{r['backbone']:.2f} |")
    lines += ["", f"The demo after 200 epochs: {DEMO_LOG[200]}.", "", verdict(rows), "",
              f"Training and evaluation: {wall / 60:.0f} min."]
    if started is not None:
        lines += ["", provenance(started)]
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict], who: str = "") -> str:
    """On or off the demo's curve at epochs 5 and 10 (VERDICT_EPOCHS): within ON_THE_CURVE
    points of its log or not. Before epoch 5 training has added less than the seed can move
    one epoch (RESULTS.md's first-epoch table with seed 1 measures that), so earlier epochs
    get no verdict."""
    by_epoch = {r["epoch"]: r for r in rows}
    said = []
    for epoch in VERDICT_EPOCHS:
        if epoch not in by_epoch:
            continue
        gap = by_epoch[epoch]["head"] - DEMO_LOG[epoch]
        where = "on the demo's curve" if abs(gap) <= ON_THE_CURVE else "off the demo's curve"
        said.append(f"at epoch {epoch} {where} ({by_epoch[epoch]['head']:.2f} against its log's {DEMO_LOG[epoch]}, "
                    f"{gap:+.2f}; the band: {ON_THE_CURVE:g} points)")
    if not said:
        reached = max(by_epoch, default=0)
        return (f"{who}No verdict yet: epoch {reached} reached; the verdicts are at epochs "
                f"{' and '.join(map(str, VERDICT_EPOCHS))}, where training, not the seed, decides.")
    text = "; ".join(said)
    return f"{who}{text[0].upper()}{text[1:]}."


def demo_table(rows: list[dict], random: float, wall: float, started: float | None) -> str:
    """The demo's own code, run here, beside its log: its test() after each epoch."""
    lines = ["| epoch | the demo's log: kNN on the head output | the demo's code run here, the same | difference | "
             "mean loss of the epoch (its train()) |", "|---|---|---|---|---|", f"| 0 (random init) | | {random:.2f} | | |"]
    for r in rows:
        demo = DEMO_LOG.get(r["epoch"])
        diff = f"{r['head'] - demo:+.2f}" if demo is not None else ""
        lines.append(f"| {r['epoch']} | {demo if demo is not None else '(not logged)'} | {r['head']:.2f} | {diff} | "
                     f"{r['loss']:.3f} |")
    lines += ["", verdict(rows, "The demo's own code, run here: "), "", f"Training and evaluation: {wall / 60:.0f} min."]
    if started is not None:
        lines += ["", provenance(started)]
    return "\n".join(lines) + "\n"


def demo_curve(a, out: Path, given: str) -> dict:
    """The demo's own code for --epochs epochs, measured by its own test() (see the docstring).
    After each epoch its state (the model with its queue, the optimizer, the random state,
    the figures, the time so far) goes to <out>/demo/state.pt; --resume goes on from there,
    as the uninterrupted run would (the random state restored: the same batches follow)."""
    import reference_speed
    notebook = Path(a.demo_notebook)
    if not notebook.is_file():
        common.fail(f"--demo-notebook not found: {notebook}")
    state_path = out / "demo" / "state.pt"
    if a.resume and not state_path.is_file():
        common.fail(f"--resume: {out} holds no demo run to continue (start it without --resume)")
    if not a.resume and state_path.is_file():
        common.fail(f"--out {out} holds a demo run already; continue it with --resume, or choose another --out")
    ns = reference_speed.moco_demo(notebook, Path(a.data_dir), a.seed, a.workers, out / "demo", test_split=True)
    # The first line of its training-loop cell, as it is: SGD over the model's parameters.
    exec(next(line for line in ns["training_loop"].splitlines() if line.startswith("optimizer =")), ns)
    args, model = ns["args"], ns["model"]

    def test(epoch):
        return ns["test"](model.encoder_q, ns["memory_loader"], ns["test_loader"], epoch, args)

    if a.resume:
        kept = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(kept["model"])
        ns["optimizer"].load_state_dict(kept["optimizer"])
        torch.set_rng_state(kept["rng"])
        random, rows = kept["random_init"], kept["epochs"]
        started = time.time() - kept["seconds"]  # the wall time of all sittings
        print(f"[curve] the demo's code, continuing after epoch {len(rows)}", flush=True)
    else:
        started = time.time()
        random, rows = test(0), []
        print(f"[curve] the demo's code, random init: {random:.2f}", flush=True)
    for epoch in range(len(rows) + 1, a.epochs + 1):  # as its training loop: train() then test(), epoch by epoch
        loss = ns["train"](model, ns["train_loader"], ns["optimizer"], epoch, args)
        rows.append({"epoch": epoch, "head": test(epoch), "loss": loss})
        print(f"[curve] the demo's code, epoch {epoch}: {rows[-1]['head']:.2f} (its log {DEMO_LOG.get(epoch)}), "
              f"loss {loss:.3f}", flush=True)
        (out / "curve.json").write_text(json.dumps({"random_init": random, "epochs": rows}, indent=2) + "\n")
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": ns["optimizer"].state_dict(), "rng": torch.get_rng_state(),
                    "random_init": random, "epochs": rows, "seconds": time.time() - started}, f"{state_path}.tmp")
        Path(f"{state_path}.tmp").replace(state_path)  # whole or not at all
        if a.minutes and time.time() - started > 60 * a.minutes:
            print(f"[curve] past --minutes {a.minutes:g} after epoch {epoch}: stopping here", flush=True)
            break
    wall = time.time() - started
    text = demo_table(rows, random, wall, started)
    (out / "curve.json").write_text(json.dumps({"random_init": random, "epochs": rows}, indent=2) + "\n")
    (out / "curve.md").write_text(text)
    print(text, flush=True)
    if a.result:
        save_result(a.result, "demo_curve", given, DEMO_CODE, {"random_init": random, "epochs": rows, "seconds": wall},
                    started)
    return {"random_init": random, "epochs": rows}


class FromDemoInput(torch.nn.Module):
    """The demo's input (normalised with its mean and std) back to pixels in [0, 1], then
    f_q as moco.py runs it (its own normalisation, backbone, head)."""

    def __init__(self, f_q: moco.Encoder, mean, std):
        super().__init__()
        self.f_q = f_q
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.f_q(x * self.std + self.mean)


def demo_measures(a, out: Path, given: str) -> dict:
    """A moco.py checkpoint's f_q through the demo's own test(), and through knn_both."""
    import reference_speed
    started = time.time()
    for path, what in ((Path(a.demo_notebook), "--demo-notebook"), (Path(a.checkpoint), "--checkpoint")):
        if not path.is_file():
            common.fail(f"{what} not found: {path}")
    ns = reference_speed.moco_demo(Path(a.demo_notebook), Path(a.data_dir), a.seed, a.workers, out / "demo",
                                   test_split=True)
    normalise = next(t for t in ns["test_transform"].transforms if type(t).__name__ == "Normalize")
    state = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
    f_q = encoder_from(state["f_q"], a)
    demo = ns["test"](FromDemoInput(f_q, normalise.mean, normalise.std).eval(), ns["memory_loader"],
                      ns["test_loader"], 0, ns["args"])
    device = common.pick_device(a.device)
    data = common.load_image_data(common.parse_args(moco.Args, moco_argv(a, out)))  # the images moco.py reads; --out unused
    ours = knn_both(f_q, data, device)
    data = {"checkpoint": a.checkpoint, "step": state["step"], "demo_test": demo, **ours}
    text = measures_table(data) + "\n" + provenance(started) + "\n"
    (out / "measures.md").write_text(text)
    print(text, flush=True)
    if a.result:
        save_result(a.result, "demo_measures", given, CODE + ["benchmarks/reference_speed.py"], data, started)
    return {"demo_test": demo, **ours}


def measures_table(data: dict) -> str:
    """One checkpoint's f_q through the demo's test() and through knn_both."""
    return "\n".join([
        f"f_q of {data['checkpoint']} (step {data['step']}), kNN on the head output:", "",
        "| monitor | kNN top-1 (%) |", "|---|---|", f"| the demo's test() | {data['demo_test']:.2f} |",
        f"| official_curve.py (knn_both) | {data['head']:.2f} |", "",
        f"Difference: {data['head'] - data['demo_test']:+.2f}."]) + "\n"


def main(argv=None):
    a = parse(argv)
    out = Path(a.out)
    # The command that makes the table from nothing: --resume only says where this sitting
    # starts (with it on a fresh machine the command would stop, finding no curve to continue).
    given = "python benchmarks/official_curve.py " + shlex.join(
        [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--resume"])
    if a.checkpoint and not a.demo_notebook:
        common.fail("--checkpoint is measured by the demo's test(): give --demo-notebook as well")
    if a.demo_notebook:
        out.mkdir(parents=True, exist_ok=True)
        return demo_measures(a, out, given) if a.checkpoint else demo_curve(a, out, given)
    run = out / "moco"
    kept = json.loads((out / "curve.json").read_text()) if a.resume and (out / "curve.json").is_file() else None
    if a.resume and kept is None:
        common.fail(f"--resume: {out} holds no curve.json to continue (start it without --resume)")
    if not a.resume and (run / "checkpoint.pt").exists():
        common.fail(f"--out {out} holds a curve's run already; continue it with --resume, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time() - (kept or {}).get("seconds", 0.0)  # the wall time of all sittings
    device = common.pick_device(a.device)
    data = common.load_image_data(common.parse_args(moco.Args, moco_argv(a, run)))
    steps_per_epoch = len(data.pretrain) // int(common.parse_args(moco.Args, moco_argv(a, run)).batch_size)
    if kept:
        random, rows = kept["random_init"], kept["epochs"]
        print(f"[curve] continuing after epoch {len(rows)}", flush=True)
    else:
        torch.manual_seed(a.seed)
        random, rows = knn_both(encoder_from(None, a), data, device), []
        print(f"[curve] random init: head {random['head']:.2f}, backbone {random['backbone']:.2f}", flush=True)
        (out / "curve.json").write_text(json.dumps({"random_init": random, "epochs": rows}, indent=2) + "\n")
    for epoch in range(len(rows) + 1, a.epochs + 1):
        # moco.py's own checkpoint says where it is: inside this epoch after a stop, or none yet
        step_argv = ["--resume", str(run)] if (run / "checkpoint.pt").exists() else moco_argv(a, run)
        command = [sys.executable, str(ROOT / "moco.py"), *step_argv, "--max-steps", str(epoch * steps_per_epoch)]
        print(f"[curve] epoch {epoch}: {' '.join(command[1:])}", flush=True)
        with open(out / "moco.log", "a") as log:
            done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            common.fail(f"moco.py stopped with exit code {done.returncode} (see {out / 'moco.log'})")
        state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
        rows.append({"epoch": epoch, "step": state["step"], **knn_both(encoder_from(state["f_q"], a), data, device)})
        print(f"[curve] epoch {epoch}: head {rows[-1]['head']:.2f} (demo {DEMO_LOG.get(epoch)}), backbone "
              f"{rows[-1]['backbone']:.2f}", flush=True)
        record = {"random_init": random, "epochs": rows, "seconds": time.time() - started, "command": given,
                  "provenance": provenance(started)}
        (out / "curve.json").write_text(json.dumps(record, indent=2) + "\n")  # each epoch kept as it ends
        if a.result:
            save_result(a.result, "official_curve", given, CODE, {k: record[k] for k in ("random_init", "epochs",
                                                                                   "seconds")}, started)
        if a.minutes and time.time() - started > 60 * a.minutes:
            print(f"[curve] past --minutes {a.minutes:g} after epoch {epoch}: stopping here", flush=True)
            break
    text = table(rows, random, time.time() - started, started)
    (out / "curve.md").write_text(text)
    if a.result:  # also when every epoch was measured before: the record from curve.json
        save_result(a.result, "official_curve", given, CODE,
                    {"random_init": random, "epochs": rows, "seconds": time.time() - started}, started)
    print(text, flush=True)
    return {"random_init": random, "epochs": rows}


if __name__ == "__main__":
    common.cli(main)
