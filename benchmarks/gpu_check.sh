#!/usr/bin/env bash
# GPU check: every method for a few hundred steps with ResNet-18 on 32 px data (the
# built-in shapes and videos: nothing to download), with and without --compile (bf16
# autocast and channels_last as always on CUDA). One markdown table: images/s once
# warm (the median over the steps of the second half of the run), images/s over
# the whole run (compilation included), peak GPU memory, and the loss trend (the mean
# loss of the first and of the last tenth of the steps).
#
#   bash benchmarks/gpu_check.sh                          # 300 steps each, on cuda
#   STEPS=100 DEVICE=cuda:1 METHODS="rotation moco" bash benchmarks/gpu_check.sh
#   DEVICE=cpu BACKBONE=small METHODS=rotation STEPS=150 bash benchmarks/gpu_check.sh   # the CPU figure
#
# Runs go to $OUT (default runs/gpu-check-<date>-<time>); the table to $OUT/table.md
# (benchmarks/gpu_table.py); RESULT=results/gpu-check.json also keeps its raw figures there.
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
steps=${STEPS:-300}
device=${DEVICE:-cuda}
backbone=${BACKBONE:-resnet18}
methods=${METHODS:-"rotation patch_location jigsaw inpainting colorization split_brain video_colorization simclr moco"}
out=${OUT:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
if [ "$device" != cpu ]; then  # DEVICE=cpu: a dry run of the script itself
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "error: no CUDA GPU here (torch.cuda.is_available() is False); this check is for a GPU machine" >&2
    exit 2
  }
fi
mkdir -p "$out"
started=$(date +%s)
given=""  # the command as given, for the result: its settings, then the script
for v in STEPS DEVICE BACKBONE METHODS; do
  if [ -n "${!v:-}" ]; then given+="$v=\"${!v}\" "; fi
done
command="${given}bash benchmarks/gpu_check.sh"
for m in $methods; do
  for compile in no-compile compile; do
    echo "[gpu_check] $m --$compile" >&2
    python "$m.py" --backbone "$backbone" --device "$device" --max-steps "$steps" --no-eval --log-every 0 \
      --"$compile" --out "$out/$m-$compile" > "$out/$m-$compile.log" 2>&1 || echo "[gpu_check] $m --$compile failed (see $out/$m-$compile.log)" >&2
  done
done
python benchmarks/gpu_table.py "$out" --steps "$steps" --backbone "$backbone" --methods $methods --started "$started" \
  --command "$command" ${RESULT:+--result "$RESULT"}
