"""The lecture's claims, each turned into a small sweep and a table.

    python benchmarks/claims.py                              # all claims, built-in data, default budgets (~50 min, 2 CPU cores)
    python benchmarks/claims.py --claims moco_queue moco_momentum --epoch-scale 0.5
    python benchmarks/claims.py --extra "--dataset folder --data-dir /tmp/cifar10-jpg" --out runs/claims-cifar

Every row is one run of the method's own main() with the flags shown, evaluated
with the common protocol; a row shared by two claims runs once. Each table ends
with a verdict: whether our measurement agrees with the lecture, at this budget.
The inpainting and colorization claims also collect the runs' picture grids side
by side in <out>/. Output: <out>/claims.md and <out>/results.json.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

# claim -> (what the lecture says, [(row label, method, flags)], verdict(results by label) -> str)


def _best(results: dict, key: str = "knn_top1") -> str:
    return max(results, key=lambda label: results[label][key])


def _rotation(r):
    best = _best(r)
    return "agrees: 4 angles give the best kNN accuracy" if best == "4 angles" else \
        f"disagrees: {best} give the best kNN accuracy, not 4"


def _simclr(r):
    both = r["crop + colour"]["knn_top1"]
    alone = max(r["crop"]["knn_top1"], r["colour"]["knn_top1"])
    if both > alone:
        return f"agrees: crop + colour beats either alone (kNN {both:.3f} against {alone:.3f})"
    return f"disagrees: crop + colour ({both:.3f}) does not beat the best single augmentation ({alone:.3f})"


def _queue(r):
    knn = [r[label]["knn_top1"] for label in r]
    if all(a < b for a, b in zip(knn, knn[1:])):
        return "agrees: kNN accuracy grows with the number of negatives"
    return "disagrees: kNN accuracy does not grow steadily with the number of negatives (" + \
        ", ".join(f"{label}: {v['knn_top1']:.3f}" for label, v in r.items()) + ")"


def _momentum(r):
    best = _best(r)
    slow = r["m = 0.99"]["knn_top1"], r["m = 0.999"]["knn_top1"]
    if best in ("m = 0.99", "m = 0.999") and max(slow) > r["m = 0"]["knn_top1"]:
        return f"agrees: a slow key encoder ({best}) is best; m = 0 is worse"
    return f"disagrees: {best} is best at this budget"


def _inpainting(r):
    adv, rec = r["L_rec + L_adv (0.999 / 0.001)"]["hole_sharpness"], r["L_rec only"]["hole_sharpness"]
    if adv > rec:
        return f"agrees: the fill has stronger edges with the adversarial loss ({adv:.3f} against {rec:.3f} of the original's)"
    return f"disagrees: the fill is not sharper with the adversarial loss ({adv:.3f} against {rec:.3f})"


def _colour(r):
    c, g = r["classification (rebalanced)"]["colourfulness"], r["regression (L2)"]["colourfulness"]
    if c > g:
        return f"agrees: classification gives more colourful output (chroma {c:.2f} of the true, regression {g:.2f})"
    return f"disagrees: regression is as colourful ({g:.2f} against {c:.2f})"


def _split_brain(r):
    s, c = r["split-brain"], r["colorization"]
    if s["linear_top1"] > c["linear_top1"] and s["knn_top1"] > c["knn_top1"]:
        return "agrees: split-brain's features beat colorization's (kNN and linear)"
    return (f"disagrees: split-brain kNN {s['knn_top1']:.3f} / linear {s['linear_top1']:.3f} against colorization "
            f"{c['knn_top1']:.3f} / {c['linear_top1']:.3f}")


CLAIMS = {
    "rotation_angles": ("Rotation: four angles (0, 90, 180, 270) work better than 2 or 8 (Gidaris et al. Table 2).",
                        [("2 angles", "rotation", ["--angles", "2"]), ("4 angles", "rotation", ["--angles", "4"]),
                         ("8 angles", "rotation", ["--angles", "8"])], _rotation),
    "simclr_augment": ("SimCLR: random crop composed with colour distortion is what matters (Chen et al. Fig. 5).",
                       [("crop", "simclr", ["--augment", "crop"]), ("colour", "simclr", ["--augment", "color"]),
                        ("crop + colour", "simclr", ["--augment", "crop,color"]),
                        ("all (+ blur at >= 96 px)", "simclr", ["--augment", "all"])], _simclr),
    "moco_queue": ("MoCo: more negatives (a longer queue) give a better contrastive bound (He et al. Fig. 3).",
                   [("K = 256", "moco", ["--queue-size", "256"]), ("K = 1024", "moco", ["--queue-size", "1024"]),
                    ("K = 4096", "moco", ["--queue-size", "4096"])], _queue),
    "moco_momentum": ("MoCo: a slowly moving key encoder (m near 1) keeps the queue consistent; m = 0 fails "
                      "(He et al. Table 1).",
                      [("m = 0", "moco", ["--momentum", "0"]), ("m = 0.9", "moco", ["--momentum", "0.9"]),
                       ("m = 0.99", "moco", ["--momentum", "0.99"]), ("m = 0.999", "moco", ["--momentum", "0.999"])],
                      _momentum),
    "inpainting_adversarial": ("Inpainting: the adversarial loss makes the fill sharper (Pathak et al. Fig. 5).",
                               [("L_rec + L_adv (0.999 / 0.001)", "inpainting", []),
                                ("L_rec only", "inpainting", ["--adv-weight", "0"])], _inpainting),
    "colorization_loss": ("Colorization: classification over ab bins with rebalancing gives vivid colours where "
                          "L2 regression gives greyish ones (Zhang et al. sec. 3.1).",
                          [("classification (rebalanced)", "colorization", []),
                           ("regression (L2)", "colorization", ["--loss", "regression"])], _colour),
    "split_brain_vs_colorization": ("Split-brain autoencoders learn better features than plain colorization "
                                    "(Zhang et al. 2017, Table 2).",
                                    [("split-brain", "split_brain", []), ("colorization", "colorization", [])],
                                    _split_brain),
}


def _pretext(r: dict) -> str:
    for key, name, fmt in (("pretext_top1", "accuracy", ".3f"), ("pretext_hole_mse", "hole MSE", ".4f"),
                           ("hole_sharpness", "edge strength", ".3f"), ("pretext_ab_error", "ab error", ".2f"),
                           ("colourfulness", "colourfulness", ".2f"), ("pretext_L_error", "L error", ".2f")):
        if key in r:
            yield f"{name} {r[key]:{fmt}}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--claims", nargs="+", default=list(CLAIMS), choices=list(CLAIMS), metavar="CLAIM",
                   help=f"which claims (default: all: {' '.join(CLAIMS)})")
    p.add_argument("--epoch-scale", type=float, default=1.0,
                   help="each method's default epochs times this (rounded up), for a quicker or longer sweep")
    p.add_argument("--extra", default="", help="more options for every run, e.g. '--dataset folder --data-dir DIR'")
    p.add_argument("--out", default="", help="folder for the runs and tables (default: runs/claims-<date>-<time>)")
    a = p.parse_args(argv)
    out = Path(a.out or f"runs/claims-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    done: dict[tuple, dict] = {}  # (method, flags) -> results; a row shared by two claims runs once
    text, record = [], {}
    for claim in a.claims:
        says, rows, verdict = CLAIMS[claim]
        results = {}
        for label, method, flags in rows:
            module = importlib.import_module(method)
            epochs = math.ceil(module.Args.epochs * a.epoch_scale)
            argv_run = [*flags, "--epochs", str(epochs), *a.extra.split()]
            key = (method, tuple(argv_run))
            if key not in done:
                folder = out / f"{method}-{len(done):02d}"
                print(f"[claims] {claim}: {label}: python {method}.py {' '.join(argv_run)}", flush=True)
                done[key] = {**module.main([*argv_run, "--out", str(folder), "--log-every", "30"]),
                             "command": f"python {method}.py {' '.join(argv_run)}", "folder": str(folder)}
            results[label] = done[key]
            grid = Path(done[key]["folder"]) / "grid.png"
            if grid.is_file():  # the pictures behind the inpainting and colorization claims
                shutil.copy(grid, out / f"{claim}-{label.split(' (')[0].replace(' ', '_').replace('+', 'and')}.png")
        lines = [f"### {claim}", "", f"Lecture: {says}", "",
                 "| run | command | pretext | kNN | kNN random init | linear | linear random init |",
                 "|---|---|---|---|---|---|---|"]
        for label, r in results.items():
            lines.append(f"| {label} | `{r['command']}` | {', '.join(_pretext(r))} | {r['knn_top1']:.3f} | "
                         f"{r['random_knn_top1']:.3f} | {r['linear_top1']:.3f} | {r['random_linear_top1']:.3f} |")
        lines += ["", f"Measured: {verdict(results)}.", ""]
        text += lines
        record[claim] = results
        print("\n".join(lines), flush=True)
        (out / "claims.md").write_text("\n".join(text) + "\n")
        (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


if __name__ == "__main__":
    main()
