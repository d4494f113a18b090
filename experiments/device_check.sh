#!/usr/bin/env bash
# One GPU-machine session for the evidence and speed issues, in two phases (usage, from the repo root:
# OUT=/tmp/out bash experiments/device_check.sh; then python -m experiments.device_check /tmp/out):
# 1. accuracy: `monomod convert vit_tiny --modules 4 --preset demo --seed 0` in fp32 and in bf16 (same seed), and the
#    one-seed ablations of the evidence study (teacher trained end to end, the teacher as meta model, the reference
#    KL normalisation, the feature loss), each against the fp32 run of its student on this machine; runs of the second
#    wave reuse the first wave's teacher side (--reuse). Every run on 1 torch thread, 10 at most side by side.
# 2. speed, alone on the GPU: `python -m benchmarks.run --only throughput` (fp32, bf16, bf16 + torch.compile).
# Writes $OUT/results.jsonl (one line per run), $OUT/throughput.json and .md (throughput-rows.jsonl as measured),
# and $OUT/log.txt. Two more seeds of the fp32/bf16 pair ran after it (their reports saved as $OUT/nac-P-sS.json):
#   for s in 1 2; do for p in fp32 bf16; do monomod convert vit_tiny --to nac --modules 4 --preset demo --seed $s \
#     --threads 1 --precision $p --out $R/nac-$p-s$s & done; done; wait
LIMIT=${LIMIT:-555}  # seconds for the whole script: accuracy runs stop by 400, throughput by LIMIT
export OMP_NUM_THREADS=1 BASE_ARGS="--modules 4 --preset demo --seed 0 --threads 1" RUN_LIMIT=240
SECONDS=0
source experiments/device_common.sh
run nac --to nac --precision fp32 & run nac-bf16 --to nac --precision bf16 &
run nac-e2e --to nac --precision fp32 --teacher-training end-to-end &
run nac-metateacher --to nac --precision fp32 --meta teacher & wait
echo "wave 1 done at ${SECONDS}s" >> "$OUT/log.txt"
RUN_LIMIT=$(( 400 - SECONDS > 30 ? 400 - SECONDS : 30 ))
run moe --to moe --precision fp32 --reuse "$R/nac" &
run moe-bf16 --to moe --precision bf16 --reuse "$R/nac-bf16" &
run nac-klref --to nac --precision fp32 --kl-norm reference --reuse "$R/nac" &
run moe-klref --to moe --precision fp32 --kl-norm reference --reuse "$R/nac" &
run moe-feature --to moe --precision fp32 --feature-loss 1.0 --reuse "$R/nac" &
run moe-e2e --to moe --precision fp32 --teacher-training end-to-end --reuse "$R/nac-e2e" &
run moe-metateacher --to moe --precision fp32 --meta teacher --reuse "$R/nac-metateacher" &
wait
echo "accuracy runs done at ${SECONDS}s" >> "$OUT/log.txt"
export OMP_NUM_THREADS=4
timeout $(( LIMIT - SECONDS )) python3 - "$OUT" <<'PY' >> "$OUT/log.txt" 2>&1
import json, sys, time
import torch
torch.set_num_threads(4)
from benchmarks import throughput
from benchmarks.run import machine
started = time.perf_counter()
rows = open(f"{sys.argv[1]}/throughput-rows.jsonl", "a")
result = throughput.run(quick=False, on_row=lambda row: (rows.write(json.dumps(row) + "\n"), rows.flush()))
result["meta"] = {"machine": machine(), "seconds": round(time.perf_counter() - started, 1), "date": time.strftime("%Y-%m-%d"),
                  "command": "OUT=DIR bash experiments/device_check.sh (its throughput phase)"}
open(f"{sys.argv[1]}/throughput.json", "w").write(json.dumps(result, indent=2))
open(f"{sys.argv[1]}/throughput.md", "w").write(throughput.markdown(result))
PY
echo "throughput rc=$? at ${SECONDS}s" >> "$OUT/log.txt"
