#!/usr/bin/env bash
# On a GPU machine: moco.py on the official MoCo CIFAR-10 demo's curve, for as many epochs as
# fit in about 8 minutes (benchmarks/official_curve.py; the table goes to $OUT/curve.md).
# Needs CIFAR-10 as JPEGs (the machine needs no internet): the folder $CIFAR (default
# data/cifar10-jpg), or a tarball of it, $CIFAR_TAR, unpacked into data/ first.
#
#   bash benchmarks/gpu_curve.sh
#   MINUTES=20 CIFAR_TAR=cifar10-jpg.tar.gz OUT=runs/curve-gpu RESULT=results/official-curve-gpu.json bash benchmarks/gpu_curve.sh
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
minutes=${MINUTES:-8}
out=${OUT:-runs/curve-gpu-$(date +%Y%m%d-%H%M%S)}
cifar=${CIFAR:-data/cifar10-jpg}
if [ ! -d "$cifar/train" ] && [ -n "${CIFAR_TAR:-}" ]; then
  [ -f "$CIFAR_TAR" ] || { echo "error: CIFAR_TAR=$CIFAR_TAR: no such file" >&2; exit 2; }
  mkdir -p data && tar xzf "$CIFAR_TAR" -C data && cifar=data/cifar10-jpg
fi
[ -d "$cifar/train" ] || {
  echo "error: no CIFAR-10 JPEG folder at $cifar (set CIFAR=... or CIFAR_TAR=...; make one with benchmarks/cifar_jpegs.py)" >&2
  exit 2
}
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "error: no CUDA GPU here (torch.cuda.is_available() is False); this check is for a GPU machine" >&2
  exit 2
}
python benchmarks/official_curve.py --data-dir "$cifar" --epochs 200 --minutes "$minutes" --device cuda \
  --workers 8 --out "$out" ${RESULT:+--result "$RESULT"}
