"""Tracking on videos the network never trained on, beside copying the first mask.

    python benchmarks/unseen_videos.py --davis-dir data/davis2016-sample

video_colorization.py learns from the frames of its training videos, without masks; the
masks only score the tracking (J, region similarity). Scored on the videos it trained on,
the pointer may have learned those videos' own appearance. Here, with --seeds each:
  - seen:           trained on every video of --davis-dir, tracked on the same videos;
  - left out:       for each video, trained on the others, tracked on that one alone;
  - built-in:       trained on the built-in synthetic videos, tracked on every video of --davis-dir.
Beside each: the same pointer with a random network, and the first mask copied unchanged
to every frame (what tracking must beat when objects move little). The DAVIS runs use the
DAVIS table's settings (--image-size 96, --epochs 30, --crop 64); the built-in videos their
defaults at 96 px. Writes <out>/table.md and <out>/results.json (every run's eval.json
figures); finished runs are kept and skipped when the same command runs again.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from registry import provenance, run_script, save_result  # noqa: E402

DAVIS = ["--image-size", "96", "--epochs", "30", "--crop", "64"]
BUILT_IN = ["--image-size", "96"]
# The code its table measures: a change to any of these makes the table stale (benchmarks/report.py).
CODE = ["video_colorization.py", "common.py", "builtin_data.py", "benchmarks/unseen_videos.py", "benchmarks/registry.py"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--davis-dir", required=True, help="a DAVIS-layout folder with masks (JPEGImages/480p, Annotations/480p)")
    p.add_argument("--out", default="runs/unseen-videos", help="folder for the runs, table.md and results.json")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 for every run")
    p.add_argument("--result", default="", help="also write the raw result here (results/<name>.json, which "
                                                "benchmarks/report.py renders into the docs)")
    return p.parse_args(argv)


def videos_of(root: Path) -> list[str]:
    folder = root / "JPEGImages" / "480p"
    if not folder.is_dir():
        common.fail(f"--davis-dir {root} is not a DAVIS folder (no JPEGImages/480p/)")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def subset(root: Path, videos: list[str], where: Path) -> Path:
    """A DAVIS folder of some of root's videos, as links: train on some, track on others."""
    for kind in ("JPEGImages", "Annotations"):
        (where / kind / "480p").mkdir(parents=True, exist_ok=True)
        for v in videos:
            link = where / kind / "480p" / v
            if not link.exists():
                link.symlink_to((root / kind / "480p" / v).resolve(), target_is_directory=True)
    return where


def runs(root: Path, out: Path, seeds: int) -> list[tuple[str, str, list[str]]]:
    """(setting, tracked videos, argv) of every run."""
    videos = videos_of(root)
    plan = []
    for seed in range(seeds):
        s = ["--seed", str(seed)]
        plan.append(("seen", ", ".join(videos), ["--dataset", "davis", "--data-dir", str(root), *DAVIS, *s]))
        for v in videos:
            train = subset(root, [w for w in videos if w != v], out / "folders" / f"without-{v}")
            held = subset(root, [v], out / "folders" / f"only-{v}")
            plan.append(("left out", v, ["--dataset", "davis", "--data-dir", str(train), "--eval-dir", str(held),
                                         *DAVIS, *s]))
        plan.append(("built-in", ", ".join(videos), ["--eval-dir", str(root), *BUILT_IN, *s]))
    return plan


def table(rows: list[dict], started: float | None) -> str:
    """Per setting: J of the trained network, of the random one, of the copied first mask, each
    the mean ± standard deviation over seeds of the J over the objects tracked; left out: per
    video (each a different network), and their mean."""
    lines = ["| trained on | tracked on | J | J random init | J first mask copied | J - copied |",
             "|---|---|---|---|---|---|"]

    def cell(values):
        return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["setting"], r["tracked"]), []).append(r)
    trained_on = {"seen": "the same videos", "left out": "the other videos", "built-in": "the built-in videos"}
    for setting in ("seen", "left out", "built-in"):
        for (s, tracked), group in groups.items():
            if s != setting:
                continue
            J, rand, copy = ([g[k] for g in group] for k in ("J", "J_random_init", "J_copy_first"))
            lines.append(f"| {trained_on[setting]} | {tracked} | {cell(J)} | {cell(rand)} | {cell(copy)} | "
                         f"{statistics.mean(J) - statistics.mean(copy):+.3f} |")
    failed = [r for r in rows if r["status"] != "ok"]
    lines += [f"| {r['setting']} | {r['tracked']} | {r['status']} |  |  |  |" for r in failed]
    seeds = sorted({r["seed"] for r in rows})
    lines += ["", f"Mean ± standard deviation over seeds {', '.join(map(str, seeds))} (`--seed`); "
                  f"DAVIS runs: `{' '.join(DAVIS)}`, built-in: `{' '.join(BUILT_IN)}`, each method default besides."]
    if started is not None:
        lines += ["", provenance(started)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    a = parse(argv)
    given = "python benchmarks/unseen_videos.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    root, out = Path(a.davis_dir), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started, rows = time.time(), []
    for i, (setting, tracked, run_argv) in enumerate(runs(root, out, a.seeds)):
        run = out / f"run{i:02d}"
        if (run / "eval.json").is_file():  # finished earlier: kept
            row = {**json.loads((run / "eval.json").read_text()), "status": "ok"}
        else:  # a run stopped midway goes on from its checkpoint
            go = ["--resume", str(run)] if (run / "checkpoint.pt").is_file() else run_argv
            row = run_script("video_colorization", go, run, out / f"run{i:02d}.log")
        rows.append({**row, "setting": setting, "tracked": tracked, "seed": int(run_argv[run_argv.index("--seed") + 1]),
                     "command": "python video_colorization.py " + " ".join(run_argv)})
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(f"[unseen] {setting} / {tracked} / seed {rows[-1]['seed']}: J {row.get('J')} "
              f"(copied {row.get('J_copy_first')}), {row['status']}", flush=True)
    text = table(rows, started)
    (out / "table.md").write_text(text)
    print(text, flush=True)
    if a.result:
        save_result(a.result, "unseen_videos", given, CODE, rows, started)
    return rows


if __name__ == "__main__":
    common.cli(main)
