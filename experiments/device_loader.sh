#!/usr/bin/env bash
# experiments/device_loader.py on the GPU machine, from an assembled copy of the package (the checkout's monomod/
# lacks the passes package, which pip's package-dir mapping provides on an install).
set -u
OUT=${OUT:-/tmp/monomod-device}; PP=/tmp/monomod-pp; rm -rf "$PP"; mkdir -p "$PP" "$OUT"
cp -r monomod "$PP/monomod"; cp -r passes "$PP/monomod/passes"; cp -r recipes "$PP/monomod/recipes"
cp -r benchmarks "$PP/benchmarks"; cp -r experiments "$PP/experiments"; cd "$PP"
PYTHONPATH=$PP PYTHONUNBUFFERED=1 python3 -m experiments.device_loader "$OUT" 2>&1 | tail -40 | tee "$OUT/loader.log"
