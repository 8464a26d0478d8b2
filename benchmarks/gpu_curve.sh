#!/usr/bin/env bash
# On a GPU machine: moco.py on the official MoCo CIFAR-10 demo's curve, for as many epochs as
# fit in about 8 minutes (benchmarks/official_curve.py; the table goes to $OUT/curve.md).
# Needs CIFAR-10 as JPEGs: $CIFAR if given, else ../shared/data/cifar10-jpg.tar.gz unpacked
# into data/ (the machine needs no internet).
#
#   bash benchmarks/gpu_curve.sh
#   MINUTES=20 CIFAR=data/cifar10-jpg OUT=runs/curve-gpu RESULT=results/official-curve-gpu.json bash benchmarks/gpu_curve.sh
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
minutes=${MINUTES:-8}
out=${OUT:-runs/curve-gpu-$(date +%Y%m%d-%H%M%S)}
cifar=${CIFAR:-}
if [ -z "$cifar" ]; then
  tarball=../shared/data/cifar10-jpg.tar.gz
  [ -f "$tarball" ] || { echo "error: no CIFAR=... folder and no $tarball" >&2; exit 2; }
  mkdir -p data
  [ -d data/cifar10-jpg/train ] || tar xzf "$tarball" -C data
  cifar=data/cifar10-jpg
fi
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "error: no CUDA GPU here (torch.cuda.is_available() is False); this check is for a GPU machine" >&2
  exit 2
}
python benchmarks/official_curve.py --data-dir "$cifar" --epochs 200 --minutes "$minutes" --device cuda \
  --workers 8 --out "$out" ${RESULT:+--result "$RESULT"}
