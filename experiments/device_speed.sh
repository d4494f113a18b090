#!/usr/bin/env bash
# Issue 26's GPU figures in one prepared run, from the repo root of a GPU machine (about 8 minutes on an H100):
#   OUT=/tmp/out bash experiments/device_speed.sh        (QUICK=1 for a sanity pass of the same steps)
# 1. python -m benchmarks.run --only phase: the m2mKD phase of vit_small K=4 and vit_base K=4 and K=8 at 224 px in
#    bf16, separate against fused, CPU input path against device path, beside a plain timm loop (the 30 % goal);
# 2. python -m benchmarks.throughput --input: the digits and an ImageFolder of JPEGs at 224 px, CPU path against the
#    device path (nvJPEG) and the cached path, beside timm's create_loader with its prefetcher (the 3,000 img/s goal);
# 3. python -m benchmarks.run --only augment: the batched augmentation against kornia (when installed) and
#    torchvision v2.
# Each step has its own time limit; the results (JSON and Markdown) and the logs land in $OUT.
set -u
QUICK=${QUICK:-0}
FLAG=$([ "$QUICK" = 1 ] && echo "--quick" || echo "")
source experiments/device_common.sh
rm -f benchmarks/results/phase.* benchmarks/results/augment.* benchmarks/results/throughput_input.* \
      benchmarks/results/quick/phase.* benchmarks/results/quick/augment.*  # only what this run measures comes back
step() {  # seconds, name, command...
  local limit=$1 name=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - start ))s" >> "$OUT/log.txt"
}
step 330 phase python3 -m benchmarks.run --only phase $FLAG
step 120 throughput_input python3 -m benchmarks.throughput --input
step 60 augment python3 -m benchmarks.run --only augment $FLAG
mkdir -p "$OUT/results"
cp benchmarks/results/${FLAG:+quick/}phase.* benchmarks/results/${FLAG:+quick/}augment.* \
   benchmarks/results/throughput_input.* "$OUT/results/" 2>> "$OUT/log.txt"
