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


METRICS = (("knn_top1", "kNN"), ("linear_top1", "linear"))
# Differences smaller than this (accuracy, or a ratio) count as ties: one seed per row, and
# reruns of the same command on these short budgets move kNN accuracy by about this much.
MARGIN = 0.01


def _best(results: dict, key: str) -> str:
    """The best row, or 'none clearly' when the runner-up is within MARGIN."""
    ranked = sorted(results, key=lambda label: results[label][key], reverse=True)
    if len(ranked) > 1 and results[ranked[0]][key] - results[ranked[1]][key] < MARGIN:
        return f"none clearly ({ranked[0]} and {ranked[1]} within {MARGIN})"
    return ranked[0]


def _on_both(holds: dict, claim: str) -> str:
    """holds: metric name -> (bool, detail). The verdict over kNN and linear accuracy."""
    yes = [name for name, (ok, _) in holds.items() if ok]
    details = "; ".join(f"{name}: {detail}" for name, (_, detail) in holds.items())
    if len(yes) == len(holds):
        return f"agrees: {claim} ({details})"
    if yes:
        return f"partly: {claim} holds for {' and '.join(yes)} only ({details})"
    return f"disagrees: {claim} does not hold ({details})"


def _rotation(r):
    return _on_both({name: (_best(r, key) == "4 angles", f"best {_best(r, key)}") for key, name in METRICS},
                    "4 angles are best")


def _simclr(r):
    holds = {}
    for key, name in METRICS:
        both, alone = r["crop + colour"][key], max(r["crop"][key], r["colour"][key])
        holds[name] = (both > alone + MARGIN, f"{both:.3f} against {alone:.3f} for the better one alone")
    return _on_both(holds, "crop + colour beats either alone")


def _queue(r):
    holds = {}
    for key, name in METRICS:
        values = [v[key] for v in r.values()]
        holds[name] = (all(a + MARGIN < b for a, b in zip(values, values[1:])), ", ".join(f"{v:.3f}" for v in values))
    return _on_both(holds, "accuracy grows with the number of negatives")


def _momentum(r):
    holds = {}
    for key, name in METRICS:
        slow, fast = max(r["m = 0.99"][key], r["m = 0.999"][key]), max(r["m = 0"][key], r["m = 0.9"][key])
        holds[name] = (slow > fast + MARGIN, f"best slow {slow:.3f}, best fast {fast:.3f}")
    return _on_both(holds, "a slow key encoder (m = 0.99 or 0.999) beats a fast one (m = 0 or 0.9)")


def _inpainting(r):
    adv, rec = r["L_rec + L_adv (0.999 / 0.001)"]["hole_sharpness"], r["L_rec only"]["hole_sharpness"]
    if adv > rec + MARGIN:
        return f"agrees: the fill has stronger edges with the adversarial loss ({adv:.3f} against {rec:.3f} of the original's)"
    return f"disagrees: the fill is not measurably sharper with the adversarial loss ({adv:.3f} against {rec:.3f})"


def _colour(r):
    c, g = r["classification (rebalanced)"]["colourfulness"], r["regression (L2)"]["colourfulness"]
    if c > g + MARGIN:
        return f"agrees: classification gives more colourful output (chroma {c:.2f} of the true, regression {g:.2f})"
    return f"disagrees: regression is as colourful ({g:.2f} against {c:.2f})"


def _split_brain(r):
    # Gains over each one's own random init: their random-init encoders differ (L and ab
    # through two half networks, against L alone), so raw accuracies do not compare.
    s, c = r["split-brain"], r["colorization"]
    gains = {name: (s[key] - s["random_" + key], c[key] - c["random_" + key]) for key, name in METRICS}
    return _on_both({name: (g[0] > g[1] + MARGIN, f"gain {g[0]:+.3f} against {g[1]:+.3f}")
                     for name, g in gains.items()}, "split-brain's features gain more than colorization's")


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


def render(record: dict) -> str:
    """The markdown tables, one per claim, each with its verdict."""
    text = []
    for claim, results in record.items():
        says, _, verdict = CLAIMS[claim]
        lines = [f"### {claim}", "", f"Lecture: {says}", "",
                 "| run | command | pretext | kNN | kNN random init | linear | linear random init |",
                 "|---|---|---|---|---|---|---|"]
        for label, r in results.items():
            lines.append(f"| {label} | `{r['command']}` | {', '.join(_pretext(r))} | {r['knn_top1']:.3f} | "
                         f"{r['random_knn_top1']:.3f} | {r['linear_top1']:.3f} | {r['random_linear_top1']:.3f} |")
        text += lines + ["", f"Measured: {verdict(results)}.", ""]
    return "\n".join(text) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--claims", nargs="+", default=list(CLAIMS), choices=list(CLAIMS), metavar="CLAIM",
                   help=f"which claims (default: all: {' '.join(CLAIMS)})")
    p.add_argument("--epoch-scale", type=float, default=1.0,
                   help="each method's default epochs times this (rounded up), for a quicker or longer sweep")
    p.add_argument("--extra", default="", help="more options for every run, e.g. '--dataset folder --data-dir DIR'")
    p.add_argument("--out", default="", help="folder for the runs and tables (default: runs/claims-<date>-<time>)")
    p.add_argument("--render", action="store_true", help="train nothing: rewrite <out>/claims.md from "
                                                          "<out>/results.json (after a change to the verdicts)")
    a = p.parse_args(argv)
    out = Path(a.out or f"runs/claims-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    if a.render:
        record = json.loads((out / "results.json").read_text())
        (out / "claims.md").write_text(render(record))
        print(render(record), flush=True)
        return record
    if (out / "results.json").exists():  # its runs would refuse to be overwritten, one by one
        common.fail(f"--out {out} holds an earlier claims sweep; choose another --out (or --render it)")
    out.mkdir(parents=True, exist_ok=True)
    done: dict[tuple, dict] = {}  # (method, flags) -> results; a row shared by two claims runs once
    record = {}
    for claim in a.claims:
        _, rows, _ = CLAIMS[claim]
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
        record[claim] = results
        (out / "claims.md").write_text(render(record))  # kept, table by table, if stopped midway
        (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(render({claim: results}), flush=True)
    return record


if __name__ == "__main__":
    common.cli(main)
