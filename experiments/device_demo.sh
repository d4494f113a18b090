#!/usr/bin/env bash
# The demo matrix of the turn's method issues on one GPU machine: every variant of `monomod convert vit_tiny
# --modules 4 --preset demo` side by side, teacher-side jobs shared through --reuse. Writes $OUT/results.jsonl
# (one line per run: its report's results and per-module table) and $OUT/log.txt. Usage (from the repo root):
#   OUT=/tmp/out bash experiments/device_demo.sh
export OMP_NUM_THREADS=2 BASE_ARGS="--modules 4 --preset demo"
source experiments/device_common.sh
run nac --to nac & run nac-e2e --to nac --teacher-training end-to-end & wait
run moe --to moe --reuse "$R/nac" &
run moe-e2e --to moe --teacher-training end-to-end --reuse "$R/nac-e2e" &
run nac-simple --to nac --student-preset simple --reuse "$R/nac" &
run moe-vmoe-gate --to moe --set student_overrides.gate=vmoe --reuse "$R/nac" &
run nac-m2mkd-reg --to nac --set budgets.m2mkd.mixup=0.8 --set budgets.m2mkd.label_smoothing=0.1 --reuse "$R/nac" &
run moe-m2mkd-reg --to moe --set budgets.m2mkd.mixup=0.8 --set budgets.m2mkd.label_smoothing=0.1 --reuse "$R/nac" &
run nac-finetuned-targets --to nac --distill-targets finetuned --reuse "$R/nac" &
wait
echo "all demo runs done" >> "$OUT/log.txt"
# The data benchmark (loader images/s against timm's at 0/1/2 workers) on this machine's CPU cores.
timeout 150 python3 -m benchmarks.run --only data > "$R/data.log" 2>&1; echo "data benchmark rc=$?" >> "$OUT/log.txt"
cp benchmarks/results/data.json "$OUT/data.json" 2>/dev/null; tail -3 "$R/data.log" >> "$OUT/log.txt"
