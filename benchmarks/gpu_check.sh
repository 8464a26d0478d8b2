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
# Runs go to $OUT (default runs/gpu-check-<date>-<time>); the table to $OUT/table.md.
set -euo pipefail
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
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
for m in $methods; do
  for compile in no-compile compile; do
    echo "[gpu_check] $m --$compile" >&2
    python "$m.py" --backbone "$backbone" --device "$device" --max-steps "$steps" --no-eval --log-every 0 \
      --"$compile" --out "$out/$m-$compile" > "$out/$m-$compile.log" 2>&1 || echo "[gpu_check] $m --$compile failed (see $out/$m-$compile.log)" >&2
  done
done
python - "$out" "$steps" "$backbone" $methods <<'EOF' | tee "$out/table.md"
import json, statistics, sys
from pathlib import Path
import torch
out, steps, backbone, methods = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"{gpu}, torch {torch.__version__}, backbone {backbone}, built-in data at each method's size, "
      f"{steps} steps, each method's default batch, channels_last{', bf16 autocast' if gpu != 'no GPU' else ''}.\n")
print("| method | compile | images/s warm | images/s whole run | peak GPU memory | loss: first tenth -> last tenth |")
print("|---|---|---|---|---|---|")
for m in methods:
    for c in ("no-compile", "compile"):
        run = out / f"{m}-{c}"
        if not (run / "eval.json").is_file():
            print(f"| {m} | {c == 'compile'} | failed: see {run}.log |  |  |  |")
            continue
        result = json.loads((run / "eval.json").read_text())
        lines = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
        lines = [l for l in lines if "images_per_s" in l]
        key = next(k for k in lines[-1] if k.startswith("loss"))
        tenth = max(1, len(lines) // 10)
        first = sum(l[key] for l in lines[:tenth]) / tenth
        last = sum(l[key] for l in lines[-tenth:]) / tenth
        warm = statistics.median(l["images_per_s"] for l in lines[len(lines) // 2:])
        print(f"| {m} | {c == 'compile'} | {warm:.0f} | {result['train_images_per_s']:.0f} | " + (
              f"{result['peak_gpu_memory_mb']:.0f} MB | " if "peak_gpu_memory_mb" in result else "- | ") + \
              f"{key} {first:.3f} -> {last:.3f} |")
EOF
