#!/usr/bin/env bash
# Every table of RESULTS.md, one command after the other, at the commit checked out: the
# built-in data with three seeds (and the figures in docs/), CIFAR-10, the DAVIS sample, moco.py
# on the official MoCo demo's curve (one epoch), the lecture's claims and the departures, the
# efficiency table. About 6.5 hours on 2 CPU cores;
# run nothing else meanwhile (two trainings on two cores slow each other 5-10x). A stopped
# claims sweep goes on where it stopped when this is run again with the same folder.
#
#   bash benchmarks/tables.sh runs/tables /tmp/cifar10-jpg ../shared/data/davis2016-sample
#
# CIFAR-10 as a JPEG folder (train/ and test/ of class folders, 32 px); without it the
# CIFAR-10 table is left out, as is the DAVIS one without a DAVIS-layout folder.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/tables-$(date +%Y%m%d-%H%M%S)}
cifar=${2:-}
davis=${3:-}
mkdir -p "$out"

for seed in 0 1 2; do  # compare.py refuses a folder that holds its runs: a finished seed is skipped
  [ -f "$out/compare-s$seed/table.md" ] || python benchmarks/compare.py --out "$out/compare-s$seed" --extra "--seed $seed"
done
if python -c "import matplotlib" 2>/dev/null; then
  python benchmarks/plot.py "$out/compare-s0" "$out/compare-s1" "$out/compare-s2" --out docs
else
  echo "matplotlib is not installed: the figures in docs/ are not redrawn (pip install matplotlib)"
fi
if [ -n "$cifar" ] && [ ! -f "$out/compare-cifar/table.md" ]; then
  python benchmarks/compare.py --dataset folder --data-dir "$cifar" --epochs 3 --out "$out/compare-cifar" \
    --methods rotation patch_location jigsaw inpainting colorization split_brain simclr moco
fi
if [ -n "$davis" ] && [ ! -f "$out/compare-davis/table.md" ]; then
  python benchmarks/compare.py --methods video_colorization --davis-dir "$davis" --image-size 96 --epochs 30 \
    --extra "--crop 64" --out "$out/compare-davis"
fi
if [ -n "$cifar" ] && [ ! -f "$out/official-curve/curve.md" ]; then
  rm -rf "$out/official-curve"  # a curve stopped midway starts again
  python benchmarks/official_curve.py --data-dir "$cifar" --epochs 1 --out "$out/official-curve"
fi
python benchmarks/claims.py --out "$out/claims"
[ -f "$out/efficiency.md" ] || python benchmarks/efficiency.py --out "$out/efficiency.md"
echo "tables in $out: compare-s0..2/table.md, docs/compare_table.md, compare-cifar/table.md, compare-davis/table.md, official-curve/curve.md, claims/claims.md, efficiency.md"
