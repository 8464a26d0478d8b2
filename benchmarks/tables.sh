#!/usr/bin/env bash
# Every table of the docs, measured again where needed: each step keeps its raw result in
# results/<name>.json, and `python benchmarks/report.py` then writes them into RESULTS.md,
# README.md and docs/. A step whose result is there and not stale (the code it measured
# unchanged) is skipped; a stopped step goes on where it stopped (its runs are kept in
# runs/tables/). Each step's time and the total are printed. Run nothing else meanwhile:
# two trainings on two cores slow each other 5-10x.
#
#   bash benchmarks/tables.sh                                   # what needs no input
#   bash benchmarks/tables.sh --cifar data/cifar10-jpg --davis data/davis2016-sample
#
# Inputs, each given as an option (a step whose input is not given says so and is skipped):
#   --cifar DIR   CIFAR-10 as 32 px JPEGs in the ImageFolder layout: python benchmarks/cifar_jpegs.py
#                 --data-dir data --download --out data/cifar10-jpg (or extract a copy into data/)
#   --davis DIR   a DAVIS-layout folder with masks (JPEGImages/480p, Annotations/480p)
#   --moco-demo FILE    the MoCo CIFAR-10 demo's notebook: git clone https://github.com/facebookresearch/moco
#                       and git -C moco checkout f736491 (the last commit with colab/): moco/colab/moco_cifar10_demo.ipynb
#   --simclr-repo DIR   git clone https://github.com/p3i0t/SimCLR-CIFAR10 and git -C SimCLR-CIFAR10 checkout 2f449c2
# Each step's time when last measured: README, "Reproduce the results".
set -euo pipefail
cd "$(dirname "$0")/.."
cifar="" davis="" moco_demo="" simclr_repo="" curve_epochs=10
while [ $# -gt 0 ]; do
  case "$1" in
    --cifar) cifar=$2; shift 2 ;;
    --davis) davis=$2; shift 2 ;;
    --moco-demo) moco_demo=$2; shift 2 ;;
    --simclr-repo) simclr_repo=$2; shift 2 ;;
    --curve-epochs) curve_epochs=$2; shift 2 ;;
    *) echo "error: unknown option $1 (--cifar DIR, --davis DIR, --moco-demo FILE, --simclr-repo DIR, --curve-epochs N)" >&2
       exit 2 ;;
  esac
done
runs=runs/tables
mkdir -p "$runs" results
all=$(date +%s)

curve_resume() {  # curve_resume NAME DIR: --resume for a curve of this code stopped early; other code's run: start again
  if python benchmarks/report.py --fresh "$1"; then
    return  # finished and up to date: its step is skipped, its run kept
  elif python benchmarks/report.py --resumable "$1" && [ -f "$2/curve.json" ]; then
    echo --resume  # its run folder is needed: gone (another machine), the curve starts again below
  elif [ -e "$2" ]; then
    echo "[tables] $1: $2 holds a run of other code or an unfinished first epoch: starting it again" >&2
    rm -rf "$2"
  fi
}

step() {  # step NAME... -- COMMAND: run COMMAND unless every results/NAME.json is there and not stale
  local names=() start
  while [ "$1" != "--" ]; do names+=("$1"); shift; done
  shift
  if python benchmarks/report.py --fresh "${names[@]}"; then
    echo "[tables] ${names[*]}: up to date"
    return
  fi
  start=$(date +%s)
  echo "[tables] ${names[*]}: $*"
  "$@"
  echo "[tables] ${names[*]}: $(( $(date +%s) - start )) s"
}

for seed in 0 1 2; do
  step "builtin-s$seed" -- python benchmarks/compare.py --extra "--seed $seed" --out "$runs/builtin-s$seed" \
    --result "results/builtin-s$seed.json"
done
if python -c "import matplotlib" 2>/dev/null; then
  python benchmarks/plot.py "$runs/builtin-s0" "$runs/builtin-s1" "$runs/builtin-s2" --out docs
else
  echo "[tables] figures: matplotlib is not installed, docs/*.png are not redrawn (pip install matplotlib)"
fi
if [ -n "$cifar" ]; then
  step cifar10 -- python benchmarks/compare.py --dataset folder --data-dir "$cifar" --epochs 3 --out "$runs/cifar10" \
    --methods rotation patch_location jigsaw inpainting colorization split_brain simclr moco --result results/cifar10.json
  # seed 0 to --curve-epochs (the verdicts); seed 1 for the first epoch (the seed's spread there)
  step official-curve-cpu -- python benchmarks/official_curve.py --data-dir "$cifar" --epochs "$curve_epochs" \
    --out "$runs/official-curve" --result results/official-curve-cpu.json \
    $(curve_resume official-curve-cpu "$runs/official-curve")
  step official-curve-cpu-s1 -- python benchmarks/official_curve.py --data-dir "$cifar" --epochs 1 --seed 1 \
    --out "$runs/official-curve-s1" --result results/official-curve-cpu-s1.json \
    $(curve_resume official-curve-cpu-s1 "$runs/official-curve-s1")
else
  echo "[tables] cifar10, official-curve-cpu, official-curve-cpu-s1: skipped (no --cifar DIR)"
fi
if [ -n "$davis" ]; then
  step davis -- python benchmarks/compare.py --methods video_colorization --davis-dir "$davis" --image-size 96 \
    --epochs 30 --extra "--crop 64" --out "$runs/davis" --result results/davis.json
  step unseen-videos -- python benchmarks/unseen_videos.py --davis-dir "$davis" --out "$runs/unseen-videos" \
    --result results/unseen-videos.json
  step decode-memory -- python benchmarks/decode_memory.py --data-dir "$davis/JPEGImages/480p" \
    --result results/decode-memory.json
  for size in 224 64; do
    step "data-pipeline-$size" -- python benchmarks/data_pipeline.py --data-dir "$davis/JPEGImages/480p" --size "$size" \
      --workers 2 --passes 4 --result "results/data-pipeline-$size.json"
  done
else
  echo "[tables] davis, unseen-videos, decode-memory, data-pipeline-224, data-pipeline-64: skipped (no --davis DIR)"
fi
if [ -n "$cifar" ] && [ -n "$moco_demo" ]; then  # the demo's own code on the same images, the same seeds
  step demo-curve-cpu -- python benchmarks/official_curve.py --data-dir "$cifar" --epochs "$curve_epochs" \
    --demo-notebook "$moco_demo" --out "$runs/demo-curve" --result results/demo-curve-cpu.json \
    $([ -f "$runs/demo-curve/demo/state.pt" ] && echo --resume)
  step demo-curve-cpu-s1 -- python benchmarks/official_curve.py --data-dir "$cifar" --epochs 1 --seed 1 \
    --demo-notebook "$moco_demo" --out "$runs/demo-curve-s1" --result results/demo-curve-cpu-s1.json \
    $([ -f "$runs/demo-curve-s1/demo/state.pt" ] && echo --resume)
  if [ -f "$runs/official-curve-s1/moco/checkpoint.pt" ]; then  # the two monitors on one encoder: moco.py's, seed 1
    step demo-measures -- python benchmarks/official_curve.py --data-dir "$cifar" --demo-notebook "$moco_demo" \
      --checkpoint "$runs/official-curve-s1/moco/checkpoint.pt" --out "$runs/demo-measures" --result results/demo-measures.json
  else
    echo "[tables] demo-measures: skipped (no $runs/official-curve-s1/moco/checkpoint.pt: its step needs --cifar)"
  fi
else
  echo "[tables] demo-curve-cpu, demo-curve-cpu-s1, demo-measures: skipped (needs --cifar DIR and --moco-demo FILE)"
fi
if [ -n "$cifar" ] && [ -n "$moco_demo" ] && [ -n "$simclr_repo" ]; then
  step reference-speed -- python benchmarks/reference_speed.py --data-dir "$cifar" --repeats 1 --moco-demo "$moco_demo" \
    --simclr-repo "$simclr_repo" --out "$runs/reference-speed.md" --result results/reference-speed.json
else
  echo "[tables] reference-speed: skipped (needs --cifar DIR, --moco-demo FILE and --simclr-repo DIR)"
fi
claims=$(python -c "import sys; sys.path.insert(0, 'benchmarks'); import claims; print(' '.join(claims.SWEEPS))")
stale=()
for claim in $claims; do
  python benchmarks/report.py --fresh "claim-$claim" || stale+=("$claim")
done
if [ ${#stale[@]} -gt 0 ]; then
  start=$(date +%s)
  python benchmarks/claims.py --claims "${stale[@]}" --out "$runs/claims" --results results
  echo "[tables] claims (${stale[*]}): $(( $(date +%s) - start )) s"
else
  echo "[tables] claims: up to date"
fi
step efficiency -- python benchmarks/efficiency.py --profile --result results/efficiency.json
step efficiency-resnet18 -- python benchmarks/efficiency.py --backbone resnet18 --steps 8 --profile \
  --result results/efficiency-resnet18.json
python benchmarks/report.py
echo "[tables] all: $(( $(date +%s) - all )) s"
