"""The short SimCLR sweep behind simclr.py's CPU defaults (README, "simclr.py").

    python benchmarks/simclr_sweep.py            # ~10 min on 2 CPU cores
    python benchmarks/simclr_sweep.py --steps 50 --out runs/sweep-quick

Each row: --steps steps of batch 256 on the built-in shapes, small backbone, then the
common protocol. Runs simclr.main itself, so it measures the committed code. Each run
is kept in <out>/<crop>-<temperature>-<head BN>/.
"""
import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import simclr  # noqa: E402

ROWS = [
    ("0.08", "0.5", False), ("0.25", "0.5", False), ("0.5", "0.5", False), ("0.3", "0.2", False),
    ("0.5", "0.2", False), ("0.5", "0.1", False), ("0.5", "0.5", True), ("0.5", "0.2", True),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="optimiser steps of each run")
    p.add_argument("--out", default="", help="folder for the runs (default: runs/simclr-sweep-<date>-<time>)")
    a = p.parse_args(argv)
    out = Path(a.out or f"runs/simclr-sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    print("| smallest crop | temperature | head BN | pair top-1 | kNN | linear | random kNN | random linear |")
    print("|---|---|---|---|---|---|---|---|")
    for crop, t, bn in ROWS:
        r = simclr.main(["--max-steps", str(a.steps), "--min-crop", crop, "--temperature", t,
                         "--proj-bn" if bn else "--no-proj-bn", "--log-every", "1000",
                         "--out", str(out / f"{crop}-{t}-{int(bn)}")])
        print(f"| {crop} | {t} | {'yes' if bn else 'no'} | {r['pretext_top1']:.3f} | {r['knn_top1']:.3f} | "
              f"{r['linear_top1']:.3f} | {r['random_knn_top1']:.3f} | {r['random_linear_top1']:.3f} |", flush=True)


if __name__ == "__main__":
    common.cli(main)
