#!/usr/bin/env bash
# The demo matrix of the turn's method issues on one GPU machine: every variant of `monomod convert vit_tiny
# --modules 4 --preset demo` side by side, teacher-side jobs shared through --reuse. Writes $OUT/results.jsonl
# (one line per run: its report's results and per-module table) and $OUT/log.txt. Usage (from the repo root):
#   OUT=/tmp/out bash benchmarks/device_demo.sh
set -u
OUT=${OUT:-/tmp/monomod-device}; mkdir -p "$OUT"; R=/tmp/monomod-runs; mkdir -p "$R"
PP=/tmp/monomod-pp; rm -rf "$PP"; mkdir -p "$PP"
cp -r monomod "$PP/monomod"; cp -r passes "$PP/monomod/passes"; cp -r recipes "$PP/monomod/recipes"
cp -r benchmarks "$PP/benchmarks"; cd "$PP"  # not the checkout: its monomod/ lacks the passes package
export PYTHONPATH=$PP PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
M="python3 -m monomod.cli"
run() {  # name, then convert arguments
  local name=$1; shift
  local start=$(date +%s)
  $M convert vit_tiny --modules 4 --preset demo --out "$R/$name" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  python3 - "$R/$name" "$name" "$rc" "$(( $(date +%s) - start ))" "$*" >> "$OUT/results.jsonl" <<'PY'
import json, pathlib, sys
run, name, rc, seconds, args = sys.argv[1:]
path = pathlib.Path(run) / "report.json"
report = json.loads(path.read_text()) if path.is_file() else {}
keep = {k: report.get(k) for k in ("teacher", "meta", "assembled", "student", "baseline", "modules", "warnings")}
print(json.dumps({"name": name, "rc": int(rc), "seconds": int(seconds), "args": args, **keep}))
PY
  echo "$name rc=$rc $(( $(date +%s) - start ))s" >> "$OUT/log.txt"
  [ $rc -eq 0 ] || tail -5 "$R/$name.log" >> "$OUT/log.txt"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$OUT/log.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" >> "$OUT/log.txt" 2>&1
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
