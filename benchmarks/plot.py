"""Two figures for the lecture's question, from the run folders benchmarks/compare.py wrote.

    python benchmarks/compare.py --out runs/compare-s0
    python benchmarks/compare.py --out runs/compare-s1 --extra "--seed 1"
    python benchmarks/compare.py --out runs/compare-s2 --extra "--seed 2"
    python benchmarks/plot.py runs/compare-s0 runs/compare-s1 runs/compare-s2 --out docs

gain.png: each image method's kNN and linear accuracy minus its own random-init
encoder's, the mean over the compare folders given (one per seed) with their standard
deviation as error bars. curves.png: each method's kNN monitor (log.jsonl) against the
share of its training done, the random-init encoder's kNN at 0, all on one axis (the
mean over the folders). Also the pictures the runs drew, from the first folder:
neighbours_<method>.png, <method>_grid.png (inpainting, colorization, split-brain) and
video_colorization_strip.png. Prints the accuracies as a markdown table, mean ± standard
deviation over the folders, with each method's median wall time (the docs' copy of that
table is report.py's, from the results/ the compare runs kept). Needs matplotlib (pip install matplotlib), which nothing else in
the project does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from registry import IMAGE_METHODS as METHODS  # noqa: E402


def load(folders: list[Path]) -> dict:
    """method -> list (one per folder) of {"eval": eval.json, "curve": [(share of training, kNN)]}."""
    found = {}
    for folder in folders:
        walls = {r["method"]: r.get("wall_s") for r in json.loads((folder / "results.json").read_text())} \
            if (folder / "results.json").is_file() else {}
        for method in METHODS:
            run = folder / method
            if not (run / "eval.json").is_file():
                continue
            result = json.loads((run / "eval.json").read_text())
            if "knn_top1" not in result:
                continue
            epochs = json.loads((run / "config.json").read_text())["epochs"]
            records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            curve = [(r["epoch"] / epochs, r["knn_top1"]) for r in records if "knn_top1" in r and "event" not in r]
            found.setdefault(method, []).append({"eval": result, "curve": curve, "wall_s": walls.get(method)})
    return found


def found_in(results: list[list[dict]]) -> dict:
    """As load(), from compare results' rows (results/<name>.json's data["rows"], one list
    per seed): each run's eval.json figures, its kNN learning curve and wall time."""
    found = {}
    for rows in results:
        for r in rows:
            if r["method"] in METHODS and r.get("status") == "ok" and "knn_top1" in r:
                found.setdefault(r["method"], []).append({"eval": r, "curve": [tuple(p) for p in r.get("knn_curve", [])],
                                                          "wall_s": r.get("wall_s")})
    return found


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(found: dict) -> str:
    """Markdown: each method's accuracies as mean ± standard deviation over the folders."""
    seeds = min(len(r) for r in found.values())
    lines = [f"Mean ± standard deviation over {seeds} compare run{'s' if seeds > 1 else ''} (seeds).", "",
             "| method | wall time (median) | kNN | kNN random init | linear | linear random init | gain kNN / linear |",
             "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        if method not in found:
            continue
        runs = [r["eval"] for r in found[method]]

        def show(values, sign=""):
            mean, std = _spread(values)
            return f"{mean:{sign}.3f}" + (f" ± {std:.3f}" if len(values) > 1 else "")
        cells = [show([r[k] for r in runs]) for k in ("knn_top1", "random_knn_top1", "linear_top1",
                                                        "random_linear_top1")]
        gains = [show([r[k] - r["random_" + k] for r in runs], "+") for k in ("knn_top1", "linear_top1")]
        walls = [r["wall_s"] for r in found[method] if r["wall_s"] is not None]
        wall = f"{statistics.median(walls):.0f} s" if walls else "-"
        lines.append(f"| {method} | {wall} | " + " | ".join(cells) + f" | {gains[0]} / {gains[1]} |")
    return "\n".join(lines) + "\n"


def plot_gain(found: dict, path: Path, plt):
    methods = [m for m in METHODS if m in found]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.38
    for offset, (key, name) in zip((-width / 2, width / 2), (("knn_top1", "kNN"), ("linear_top1", "linear"))):
        stats = [_spread([r["eval"][key] - r["eval"]["random_" + key] for r in found[m]]) for m in methods]
        ax.bar([i + offset for i in range(len(methods))], [s[0] for s in stats], width, yerr=[s[1] for s in stats],
               capsize=3, label=f"{name} gain over random init")
    seeds = min(len(found[m]) for m in methods)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(methods)), [m.replace("_", "\n") for m in methods])
    ax.set_ylabel("top-1 accuracy gain")
    ax.set_title(f"What each method learned: gain over its own random init ({seeds} seed{'s' if seeds > 1 else ''})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_curves(found: dict, path: Path, plt):
    """The monitor's points (fixed subsets of the splits; at 0 the untrained encoder) joined
    by a line; hollow, at 0 the random-init encoder's and at 1 the trained encoder's kNN
    from the final evaluation (all of both splits, so a little higher)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method in METHODS:
        if method not in found:
            continue
        runs = found[method]
        points = [dict(r["curve"]) for r in runs]
        xs = sorted(set.intersection(*(set(p) for p in points)))  # the epochs every run monitored
        ys = [statistics.fmean(p[x] for p in points) for x in xs]
        start = statistics.fmean(r["eval"]["random_knn_top1"] for r in runs)
        end = statistics.fmean(r["eval"]["knn_top1"] for r in runs)
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=method)
        ax.plot([0.0, 1.0], [start, end], linestyle="none", marker="o", markersize=7, markerfacecolor="none",
                color=line.get_color())
    ax.set_xlabel("share of training done")
    ax.set_ylabel("kNN top-1")
    ax.set_title("Learning curves: the kNN monitor during training (hollow: the final evaluation)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def video_table(folders: list[Path]) -> str:
    """Video colorization's J over the compare folders, mean ± standard deviation."""
    runs, walls = [], []
    for folder in folders:
        path = folder / "video_colorization" / "eval.json"
        if path.is_file() and json.loads(path.read_text()).get("J") is not None:
            runs.append(json.loads(path.read_text()))
            results = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else []
            walls += [r["wall_s"] for r in results if r["method"] == "video_colorization" and "wall_s" in r]
    return video_rows(runs, walls)


def video_rows(runs: list[dict], walls: list[float]) -> str:
    """The video table of video colorization's eval.json figures (one per seed) and wall times."""
    if not runs:
        return ""

    def show(key):
        mean, std = _spread([r[key] for r in runs])
        return f"{mean:.3f}" + (f" ± {std:.3f}" if len(runs) > 1 else "")
    wall = f"{statistics.median(walls):.0f} s" if walls else "-"
    return ("\n| method | wall time (median) | colour accuracy | J | J random init | J first mask copied |\n"
            "|---|---|---|---|---|---|\n"
            f"| video_colorization ({runs[0]['videos']} videos, {runs[0]['objects']} objects) | {wall} | "
            f"{show('pretext_top1')} | {show('J')} | {show('J_random_init')} | {show('J_copy_first')} |\n")


def made_by(folders: list[Path]) -> list[tuple[str, str]]:
    """(folder, the provenance line under its table.md) of each compare folder."""
    lines = []
    for folder in folders:
        table_md = folder / "table.md"
        made = [line for line in table_md.read_text().splitlines() if line.startswith("Made by commit")] \
            if table_md.is_file() else []
        lines.append((folder.name, made[-1] if made else "no provenance line (table.md missing)"))
    return lines


def copy_pictures(folder: Path, out: Path, small: int = 400) -> list[str]:
    """The pictures of one compare folder's runs, renamed by method, into `out`; those
    narrower than `small` px (the grids of 32 px images) enlarged 3x, pixel for pixel."""
    from PIL import Image
    copied = []
    for method in (*METHODS, "video_colorization"):
        for name, target in (("neighbours.png", f"neighbours_{method}.png"), ("grid.png", f"{method}_grid.png"),
                             ("strip.png", f"{method}_strip.png")):
            if (folder / method / name).is_file():
                with Image.open(folder / method / name) as im:
                    if im.width < small:
                        im = im.resize((3 * im.width, 3 * im.height), Image.NEAREST)
                    im.save(out / target)
                copied.append(target)
    return copied


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="compare.py output folders (one per seed)")
    p.add_argument("--out", type=Path, default=Path("docs"), help="where gain.png and curves.png go")
    a = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        common.fail("benchmarks/plot.py needs matplotlib, which the project does not: pip install matplotlib")
    found = load(a.folders)
    if not found:
        common.fail(f"no image method's eval.json under {', '.join(map(str, a.folders))} (compare.py's --out folders)")
    a.out.mkdir(parents=True, exist_ok=True)
    plot_gain(found, a.out / "gain.png", plt)
    plot_curves(found, a.out / "curves.png", plt)
    copied = copy_pictures(a.folders[0], a.out)
    # printed only: the docs' table over the seeds is report.py's (seeds view), from results/
    print(table(found) + video_table(a.folders) + "".join(f"\n{folder}: {made}\n" for folder, made in made_by(a.folders)))
    print(f"copied from {a.folders[0]}: {', '.join(copied) or 'no pictures'}")
    print(f"wrote {a.out / 'gain.png'} and {a.out / 'curves.png'} from {len(a.folders)} compare folder(s): "
          f"{', '.join(f'{m} x{len(r)}' for m, r in found.items())}")
    return found


if __name__ == "__main__":
    common.cli(main)
