# Sourced by the GPU-machine scripts (device_demo.sh, device_check.sh), from the repo root: a package tree in
# $PP (the checkout's monomod/ lacks the passes package), runs under $R, and `run NAME ARGS...`, which runs
# `monomod convert vit_tiny $BASE_ARGS ARGS...` (at most $RUN_LIMIT seconds; 0 = no limit) and appends its
# report's results as one line of $OUT/results.jsonl (log lines to $OUT/log.txt).
set -u
OUT=${OUT:-/tmp/monomod-device}; mkdir -p "$OUT"; R=/tmp/monomod-runs; mkdir -p "$R"
PP=/tmp/monomod-pp; rm -rf "$PP"; mkdir -p "$PP"
cp -r monomod "$PP/monomod"; cp -r passes "$PP/monomod/passes"; cp -r recipes "$PP/monomod/recipes"
cp -r benchmarks "$PP/benchmarks"; cp -r experiments "$PP/experiments"; cd "$PP"
export PYTHONPATH=$PP PYTHONUNBUFFERED=1
M="python3 -m monomod.cli"
RUN_LIMIT=${RUN_LIMIT:-0}
run() {  # name, then convert arguments
  local name=$1; shift
  local start=$(date +%s)
  timeout "$RUN_LIMIT" $M convert vit_tiny $BASE_ARGS --out "$R/$name" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  python3 - "$R/$name" "$name" "$rc" "$(( $(date +%s) - start ))" "$*" >> "$OUT/results.jsonl" <<'PY'
import json, pathlib, sys
run, name, rc, seconds, args = sys.argv[1:]
path = pathlib.Path(run) / "report.json"
report = json.loads(path.read_text()) if path.is_file() else {}
keep = {k: report.get(k) for k in ("teacher", "meta", "assembled", "student", "baseline", "modules", "warnings", "jobs")}
print(json.dumps({"name": name, "rc": int(rc), "seconds": int(seconds), "args": args, **keep}))
PY
  echo "$name rc=$rc $(( $(date +%s) - start ))s" >> "$OUT/log.txt"
  [ $rc -eq 0 ] || tail -5 "$R/$name.log" >> "$OUT/log.txt"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$OUT/log.txt" 2>&1
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" >> "$OUT/log.txt" 2>&1
# The machine, into the results (never into code): GPU, CPU cores, torch and timm, and the threads per run.
python3 - "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" > "$OUT/machine.txt" <<'PY'
import os, sys, timm, torch
gpu = sys.argv[1] or "no GPU"
print(f"{gpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, timm {timm.__version__}")
PY
