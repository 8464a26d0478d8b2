"""The lecture's claims, and each method's departures from its paper, each turned into a
small sweep and a table.

    python benchmarks/claims.py                              # all claims and departures, 3 seeds, built-in data
    python benchmarks/claims.py --claims moco_queue moco_momentum --epoch-scale 0.5 --seeds 2
    python benchmarks/claims.py --extra "--dataset folder --data-dir data/cifar10-jpg" --out runs/claims-cifar

How long each takes on 2 CPU cores: README, "Reproduce the results".

A departure's table sets the method's default (the paper's method, scaled down) beside
its opt-in variants (ours, or from later work), so each variant's measured effect is on
record. Every row is the method's own script with the flags shown (a subprocess, as a user
runs it), run with --seeds seeds (0, 1, ...) and evaluated with the common protocol;
a row shared by two claims runs once. A stopped sweep goes on where it stopped when
the same command is given again: finished runs are read from their eval.json, a run
stopped midway continues from its checkpoint (--resume). Each table gives mean ±
standard deviation over the seeds and ends with a
verdict on the lecture's claim, at this budget: holds, partly (on one of kNN and
linear), contradicted (the opposite holds) or not shown. A
difference counts only where it exceeds the spread (the better mean minus its
standard deviation above the other mean plus its own), so one seed settles nothing.
The inpainting and colorization claims also collect the runs' picture grids side
by side in <out>/. Output: <out>/claims.md and <out>/results.json.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from registry import provenance, run_script, save_result  # noqa: E402

# claim -> (what the lecture says, [(row label, method, flags)], verdict(results by label) -> str)


METRICS = (("knn_top1", "kNN"), ("linear_top1", "linear"))


class Row:
    """One row of a claim's table: the same command run with several seeds. mean(key) and
    std(key) (sample standard deviation; 0 with one seed) of any figure in eval.json, and
    of gain_<key>: each run's accuracy minus its own random init's."""

    def __init__(self, runs: list[dict]):
        self.runs = runs
        self.n = len(runs)

    def values(self, key: str) -> list[float]:
        if key.startswith("gain_"):
            key = key[len("gain_"):]
            return [r[key] - r["random_" + key] for r in self.runs]
        return [r[key] for r in self.runs]

    def mean(self, key: str) -> float:
        return statistics.fmean(self.values(key))

    def std(self, key: str) -> float:
        return statistics.stdev(self.values(key)) if self.n > 1 else 0.0

    def show(self, key: str, fmt: str = ".3f") -> str:
        return f"{self.mean(key):{fmt}}" + (f" ± {self.std(key):{fmt}}" if self.n > 1 else "")


def beats(a: Row, b: Row, key: str) -> bool:
    """a is clearly above b: the difference of the means exceeds the two spreads together
    (mean - std of the better above mean + std of the other). Needs at least two seeds:
    one run measures no spread, so it settles nothing."""
    return min(a.n, b.n) > 1 and a.mean(key) - a.std(key) > b.mean(key) + b.std(key)


def _best(rows: dict, key: str) -> str:
    """The best row, or 'none clearly' when it does not beat the runner-up beyond the spread."""
    ranked = sorted(rows, key=lambda label: rows[label].mean(key), reverse=True)
    if len(ranked) > 1 and not beats(rows[ranked[0]], rows[ranked[1]], key):
        return f"none clearly ({ranked[0]} and {ranked[1]} within their spread)"
    return ranked[0]


def _on_both(holds: dict, claim: str) -> str:
    """holds: metric name -> (holds, the opposite holds, detail), each beyond the spread of
    the seeds. The verdict over kNN and linear accuracy: holds (on both), partly (on one),
    contradicted (the opposite, and the claim on neither), or not shown."""
    yes = [name for name, (ok, _, _) in holds.items() if ok]
    no = [name for name, (_, opposite, _) in holds.items() if opposite]
    details = "; ".join(f"{name}: {detail}" for name, (_, _, detail) in holds.items())
    if len(yes) == len(holds):
        return f"holds: {claim} ({details})"
    if yes:
        against = f", the opposite for {' and '.join(no)}" if no else " only"
        return f"partly: {claim} holds for {' and '.join(yes)}{against} ({details})"
    if no:
        return f"contradicted: the opposite of '{claim}' holds for {' and '.join(no)} beyond the spread ({details})"
    return f"not shown: {claim} does not hold beyond the spread of the seeds ({details})"


def _rotation(r):
    holds = {}
    for key, name in METRICS:
        best = _best(r, key)
        better = [label for label in r if label != "4 angles" and beats(r[label], r["4 angles"], key)]
        holds[name] = (best == "4 angles", bool(better), f"best {best}")
    return _on_both(holds, "4 angles are best")


def _simclr(r):
    holds = {}
    for key, name in METRICS:
        alone = max((r["crop"], r["colour"]), key=lambda row: row.mean(key))
        holds[name] = (beats(r["crop + colour"], alone, key), beats(alone, r["crop + colour"], key),
                       f"{r['crop + colour'].show(key)} against {alone.show(key)} for the better one alone")
    return _on_both(holds, "crop + colour beats either alone")


def _queue(r):
    holds = {}
    for key, name in METRICS:
        rows = list(r.values())
        holds[name] = (all(beats(b, a, key) for a, b in zip(rows, rows[1:])),
                       any(beats(a, b, key) for a, b in zip(rows, rows[1:])), ", ".join(row.show(key) for row in rows))
    return _on_both(holds, "accuracy grows with the number of negatives")


def _momentum(r):
    holds = {}
    for key, name in METRICS:
        slow = max((r["m = 0.99"], r["m = 0.999"]), key=lambda row: row.mean(key))
        fast = max((r["m = 0"], r["m = 0.9"]), key=lambda row: row.mean(key))
        holds[name] = (beats(slow, fast, key), beats(fast, slow, key),
                       f"best slow {slow.show(key)}, best fast {fast.show(key)}")
    return _on_both(holds, "a slow key encoder (m = 0.99 or 0.999) beats a fast one (m = 0 or 0.9)")


def _negatives(r):
    holds = {}
    for key, name in METRICS:
        moco, bank, batch = r["MoCo: queue + momentum encoder"], r["memory bank"], r["end-to-end"]
        holds[name] = (beats(moco, bank, key), beats(bank, moco, key), f"MoCo {moco.show(key)}, memory bank "
                                                                       f"{bank.show(key)}, end-to-end {batch.show(key)}")
    return _on_both(holds, "MoCo's queue beats the memory bank's stale keys")


def _inpainting(r):
    adv, rec = r["L_rec + L_adv (0.999 / 0.001)"], r["L_rec only"]
    detail = (f"edge strength of the fill {adv.show('pretext_hole_sharpness')} against "
              f"{rec.show('pretext_hole_sharpness')}")
    if beats(adv, rec, "pretext_hole_sharpness"):
        return f"holds: the fill has stronger edges with the adversarial loss ({detail} of the original's)"
    if beats(rec, adv, "pretext_hole_sharpness"):
        return f"contradicted: the fill is sharper without the adversarial loss ({detail})"
    return f"not shown: the fill is not sharper with the adversarial loss beyond the spread ({detail})"


def _colour(r):
    c, g = r["classification (rebalanced)"], r["regression (L2)"]
    detail = (f"chroma {c.show('pretext_colourfulness', '.2f')} of the true, "
              f"regression {g.show('pretext_colourfulness', '.2f')}")
    if beats(c, g, "pretext_colourfulness"):
        return f"holds: classification gives more colourful output ({detail})"
    if beats(g, c, "pretext_colourfulness"):
        return f"contradicted: regression gives more colourful output ({detail})"
    return f"not shown: classification is not more colourful beyond the spread ({detail})"


def _split_brain(r):
    # Judged by the gain over each one's own random init: their random-init encoders differ
    # (L and ab through two half networks, against L alone). The absolute accuracies are
    # given beside it, since a reader compares those too.
    s, c = r["split-brain"], r["colorization"]
    return _on_both({name: (beats(s, c, "gain_" + key), beats(c, s, "gain_" + key),
                            f"gain {s.show('gain_' + key)} against {c.show('gain_' + key)}, absolute "
                            f"{s.show(key)} against {c.show(key)}") for key, name in METRICS},
                    "split-brain's features gain more than colorization's")


def _departure(r):
    """Each opt-in row against the default (the first row), by the gain over each one's own
    random init (a variant may change the random-init network too), or by J for videos."""
    rows = list(r.items())
    (_, base), others = rows[0], rows[1:]
    keys = (("J", "J"),) if "J" in base.runs[0] else tuple(("gain_" + key, name + " gain") for key, name in METRICS)
    parts = []
    for label, row in others:
        for key, name in keys:
            if beats(row, base, key):
                word = "above"
            elif beats(base, row, key):
                word = "below"
            else:
                word = "within the spread of"
            parts.append(f"{label}: {name} {row.show(key)}, {word} the default's {base.show(key)}")
    return "; ".join(parts)


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
    "moco_negatives": ("Contrastive learning needs many consistent negatives: a queue with a momentum encoder "
                       "(MoCo) beats a memory bank of old features, and end-to-end is limited by the batch "
                       "(He et al. Fig. 3).",
                       [("end-to-end", "moco", ["--negatives", "end-to-end"]),
                        ("memory bank", "moco", ["--negatives", "memory-bank"]),
                        ("MoCo: queue + momentum encoder", "moco", [])], _negatives),
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

# Departures: the default first, then what is ours or from later work (opt-in flags).
DEPARTURES = {
    "split_brain_halves": ("Split-brain: the paper's half-width halves (default) against ours: each half a whole "
                           "network, at the same wall time (15 epochs), with and without F2's turned hues.",
                           [("half-width halves (paper)", "split_brain", []),
                            ("whole-network halves", "split_brain", ["--halves", "full", "--epochs", "15"]),
                            ("whole-network halves, turned hues", "split_brain",
                             ["--halves", "full", "--turn-hues", "--epochs", "15"])], _departure),
    "patch_location_guards": ("Patch location: the released code's colour dropping and random downsampling "
                              "(default) against neither.",
                              [("colour dropping, downsampling (released code)", "patch_location", []),
                               ("no colour dropping", "patch_location", ["--chroma", "none"]),
                               ("no downsampling", "patch_location", ["--downsample", "0"])], _departure),
    "jigsaw_departures": ("Jigsaw: the default (the paper's Algorithm 1, 14 px tiles in 21 px cells) against ours "
                          "(the largest minimum Hamming distance first) and against the paper's tile proportion "
                          "(18 px tiles, gaps of 0 to 6 px).",
                          [("Algorithm 1, 14 px tiles", "jigsaw", []),
                           ("minimum distance first", "jigsaw", ["--perm-rule", "minimum"]),
                           ("18 px tiles (the paper's proportion)", "jigsaw", ["--tile", "18"])], _departure),
    "inpainting_holes": ("Inpainting: random regions with L2 over the whole output (default, the released "
                         "code's random-hole training) against the paper's eq. 1 (the hole only) and the other "
                         "holes.",
                         [("region, whole output (released code)", "inpainting", []),
                          ("region, the hole only (eq. 1)", "inpainting", ["--context-weight", "0"]),
                          ("random blocks", "inpainting", ["--mask", "blocks"]),
                          ("central square", "inpainting", ["--mask", "center"])], _departure),
    "colorization_optimizer": ("Colorization: the paper's Adam (beta2 0.99, weight decay 1e-3; default) against "
                               "PyTorch's defaults (beta2 0.999, no weight decay).",
                               [("paper's", "colorization", []),
                                ("PyTorch's defaults", "colorization", ["--beta2", "0.999", "--weight-decay", "0"])],
                               _departure),
    "simclr_departures": ("SimCLR: the defaults (the released code's head, smallest crop 0.5, temperature 0.2) "
                          "against the plain MLP of the paper's text, and against the paper's CIFAR-10 crop and "
                          "temperature (0.08, 0.5).",
                          [("defaults", "simclr", []), ("plain MLP head", "simclr", ["--no-proj-bn"]),
                           ("smallest crop 0.08, temperature 0.5", "simclr",
                            ["--min-crop", "0.08", "--temperature", "0.5"])], _departure),
    "moco_departures": ("MoCo: the defaults (lr 0.03 for batch 256 as the paper, the demo's augmentation, "
                        "smallest crop 0.5) against the demo's lr 0.06, the paper's v1 augmentation, and the "
                        "demo's smallest crop 0.08.",
                        [("defaults", "moco", []), ("lr 0.06", "moco", ["--lr", "0.06"]),
                         ("v1 augmentation", "moco", ["--augmentation", "v1"]),
                         ("smallest crop 0.08", "moco", ["--min-crop", "0.08"])], _departure),
    "video_pointer": ("Video colorization: the paper's pointer over all reference locations (default) against "
                      "later work's limits when tracking (top 10, within 4 cells).",
                      [("all locations (paper)", "video_colorization", []),
                       ("top-k 10, radius 4", "video_colorization", ["--topk", "10", "--radius", "4"])],
                      _departure),
}
SWEEPS = {**CLAIMS, **DEPARTURES}


def verdict_of(claim: str, results: dict) -> str:
    """The verdict line of a claim from its results (label -> {"runs": [eval.json, ...]})."""
    return SWEEPS[claim][2]({label: Row(r["runs"]) for label, r in results.items()})


def summary_row(claim: str, verdict: str, note: str = "") -> str:
    """One row of RESULTS.md's summary of the lecture's claims: the claim, what the lecture
    says, the verdict's word (holds, partly, contradicted, not shown) and the figures
    that decide it."""
    word, _, detail = verdict.partition(": ")
    says = SWEEPS[claim][0].split(": ", 1)[-1]
    return f"| {claim} | {says} | {word}{note} | {detail} |"


def _pretext(row: Row):
    """Every pretext_* figure of eval.json, named by the rest of its key."""
    for key in row.runs[0]:
        if key.startswith("pretext_"):
            yield f"{key[len('pretext_'):].replace('_', ' ')} {row.show(key, '.3g')}"


def render(record: dict) -> str:
    """The markdown tables, one per claim: mean ± standard deviation over the seeds, and the verdict."""
    text = []
    for claim, results in record.items():
        says, _, verdict = SWEEPS[claim]
        rows = {label: Row(r["runs"]) for label, r in results.items()}
        seeds = min(row.n for row in rows.values())
        video = "J" in next(iter(rows.values())).runs[0]
        figures = (("J", "J random init", "J first mask copied") if video else
                   ("kNN", "kNN random init", "linear", "linear random init"))
        keys = ("J", "J_random_init", "J_copy_first") if video else \
            ("knn_top1", "random_knn_top1", "linear_top1", "random_linear_top1")
        lines = [f"### {claim}", "", f"{'Departure' if claim in DEPARTURES else 'Lecture'}: {says}", "",
                 f"Mean ± standard deviation over {seeds} seed{'s' if seeds > 1 else ''} (`--seed` 0 to {seeds - 1}).",
                 "", "| run | command | pretext | " + " | ".join(figures) + " |", "|---" * (3 + len(figures)) + "|"]
        for label, row in rows.items():
            lines.append(f"| {label} | `{results[label]['command']}` | {', '.join(_pretext(row))} | "
                         + " | ".join(row.show(key) for key in keys) + " |")
        text += lines + ["", f"Measured: {verdict(rows)}.", ""]
    return "\n".join(text) + "\n"


def run_seed(method: str, argv: list[str], run: Path) -> dict:
    """One run of a row: read back if it finished in an earlier, stopped sweep; continued
    from its checkpoint if it stopped midway; otherwise run. Its command is kept beside it,
    so a folder that holds another sweep's run is refused rather than mixed in."""
    command = " ".join([f"{method}.py", *argv])
    said = run / "claims_command.txt"
    if said.is_file() and said.read_text() != command:
        common.fail(f"{run} holds a run of another sweep ({said.read_text()}); choose another --out")
    wall = run / "claims_wall_s.txt"  # the run's wall time, kept for the claim's provenance in a later sitting
    if (run / "eval.json").is_file():
        print(f"[claims] already run: reading {run / 'eval.json'}", flush=True)
        return {**json.loads((run / "eval.json").read_text()),
                **({"wall_s": float(wall.read_text())} if wall.is_file() else {})}
    resume = (run / "checkpoint.pt").is_file()
    run.mkdir(parents=True, exist_ok=True)
    said.write_text(command)
    log = run.parent / f"{run.name}.log"
    if resume:  # the run's own options come from its checkpoint; --max-steps belongs to each command
        limit = argv[argv.index("--max-steps"):argv.index("--max-steps") + 2] if "--max-steps" in argv else []
        result = run_script(method, ["--resume", str(run), *limit], run, log)
    else:
        result = run_script(method, [*argv, "--log-every", "30"], run, log)
    if result["status"] != "ok":
        common.fail(f"{command} {result['status']} (log: {log})")
    wall.write_text(f"{result['wall_s']:.1f}")
    return {k: v for k, v in result.items() if k not in ("status", "peak_rss_mb")}


def keep(a, claim: str, results: dict):
    """results/claim-<claim>.json: the claim's runs (every seed's eval.json), as this command
    alone would make them, and the code they measured. The wall time its provenance line
    gives is that of its own runs, whichever sitting ran them (a run shared with another
    claim counts in both)."""
    started = time.time() - sum(run.get("wall_s", 0.0) for r in results.values() for run in r["runs"])
    own = " ".join(f"{flag} {value}" for flag, value, default in
                   (("--epoch-scale", a.epoch_scale, 1.0), ("--seeds", a.seeds, 3)) if value != default)
    extra = f" --extra '{a.extra}'" if a.extra else ""
    command = f"python benchmarks/claims.py --claims {claim}{' ' + own if own else ''}{extra}"
    methods = sorted({method for _, method, _ in SWEEPS[claim][1]})
    code = [f"{m}.py" for m in methods] + ["common.py", "builtin_data.py", "benchmarks/claims.py"]
    data = {claim: {label: {"runs": r["runs"], "command": r["command"]} for label, r in results.items()}}
    save_result(Path(a.results) / f"claim-{claim}.json", "claim", command, code, data, started)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--claims", nargs="+", default=list(SWEEPS), choices=list(SWEEPS), metavar="CLAIM",
                   help=f"which claims and departures (default: all: {' '.join(SWEEPS)})")
    p.add_argument("--epoch-scale", type=float, default=1.0,
                   help="each method's default epochs times this (rounded up), for a quicker or longer sweep")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (0 to N-1): tables show mean ± standard "
                                                        "deviation, verdicts need a difference beyond that spread")
    p.add_argument("--extra", default="", help="more options for every run, e.g. '--dataset folder --data-dir DIR'")
    p.add_argument("--out", default="", help="folder for the runs and tables (default: runs/claims-<date>-<time>)")
    p.add_argument("--results", default="", help="also keep each claim's raw result in this folder as "
                                                 "claim-<name>.json (results/, which benchmarks/report.py renders)")
    p.add_argument("--render", action="store_true", help="train nothing: rewrite <out>/claims.md from "
                                                          "<out>/results.json (after a change to the verdicts)")
    a = p.parse_args(argv)
    out = Path(a.out or f"runs/claims-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    started = time.time()
    if a.render:  # the tables anew; the provenance line of the sweep that measured them stays
        record = json.loads((out / "results.json").read_text())
        made = [line for line in (out / "claims.md").read_text().splitlines() if line.startswith("Made by commit")] \
            if (out / "claims.md").is_file() else []
        (out / "claims.md").write_text(render(record) + "".join(f"\n{line}\n" for line in made[-1:]))
        print(render(record), flush=True)
        return record
    out.mkdir(parents=True, exist_ok=True)
    done: dict[tuple, dict] = {}  # (method, flags) -> the runs; a row shared by two claims runs once
    record = {}
    for claim in a.claims:
        _, rows, _ = SWEEPS[claim]
        results = {}
        for label, method, flags in rows:
            module = importlib.import_module(method)
            own = module.Args.epochs
            if "--epochs" in flags:  # a row's own epochs (a variant given the default's time), scaled as well
                i = flags.index("--epochs")
                own, flags = int(flags[i + 1]), flags[:i] + flags[i + 2:]
            argv_run = [*flags, "--epochs", str(math.ceil(own * a.epoch_scale)), *a.extra.split()]
            key = (method, tuple(argv_run))
            if key not in done:
                # named by its command: the same row finds its runs whichever claims a sweep runs with it
                folder = out / f"{method}-{hashlib.sha1(' '.join(argv_run).encode()).hexdigest()[:8]}"
                runs = []
                for seed in range(a.seeds):
                    print(f"[claims] {claim}: {label}: python {method}.py {' '.join(argv_run)} --seed {seed}",
                          flush=True)
                    runs.append(run_seed(method, [*argv_run, "--seed", str(seed)], folder / f"seed{seed}"))
                done[key] = {"runs": runs, "command": f"python {method}.py {' '.join(argv_run)}",
                             "folder": str(folder)}
            results[label] = done[key]
            grid = Path(done[key]["folder"]) / "seed0" / "grid.png"
            if grid.is_file():  # the pictures behind the inpainting and colorization claims (seed 0)
                shutil.copy(grid, out / f"{claim}-{label.split(' (')[0].replace(' ', '_').replace('+', 'and')}.png")
        record[claim] = results
        (out / "claims.md").write_text(render(record) + "\n" + provenance(started) + "\n")  # kept if stopped midway
        if a.results:
            keep(a, claim, results)
        (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(render({claim: results}), flush=True)
    return record


if __name__ == "__main__":
    common.cli(main)
