"""One `paper`-preset m2mKD job on a GPU with real-size JPEGs, with loader workers off and on.

Run on the GPU machine: ``python -m experiments.device_loader OUT_DIR``. It writes an ImageFolder of 256x320 JPEGs
(crops of sklearn's sample photos), compiles ``vit_small -> vit, 4 modules, --preset paper`` on it (RandAugment,
random erasing, mixup/CutMix), runs the m2mKD job's inputs on a token budget, then times ``m2mkd:0`` with 0 and 8
loader workers while sampling the GPU's utilisation. Writes ``OUT_DIR/loader.json``.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.data import write_folder

STEPS, BATCH = int(os.environ.get("LOADER_STEPS", 40)), int(os.environ.get("LOADER_BATCH", 256))
PER_CLASS, WORKERS = int(os.environ.get("LOADER_PER_CLASS", 512)), int(os.environ.get("LOADER_WORKERS", 8))


def _utilisation(command: list[str]) -> tuple[list[int], float]:
    """Run ``command`` while nvidia-smi samples GPU utilisation every 200 ms; (samples in %, wall seconds)."""
    query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]
    probe = subprocess.Popen(query, stdout=subprocess.PIPE, text=True) if shutil.which("nvidia-smi") else None
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    if probe is None:
        return [], seconds
    probe.terminate()
    return [int(line) for line in probe.communicate()[0].split() if line.strip().isdigit()], seconds


def main(out: Path) -> int:
    from monomod.compiler import ConvertOptions
    from monomod.compiler import compile_options
    from monomod.runtime.execute import execute, prepare_run_dir

    root = Path("/tmp/monomod-loader")
    shutil.rmtree(root, ignore_errors=True)
    write_folder(root, per_class=PER_CLASS)
    write_folder(root / "v", per_class=32).joinpath("train").rename(root / "val")
    tiny = {"steps": 2, "batch_size": 64}
    options = ConvertOptions(teacher="vit_small", student="vit", modules=4, data=f"imagefolder:{root}", ood=None,
                             preset="paper", budgets={"meta": tiny, "incubate": tiny, "teacher": tiny,
                                                      "m2mkd": {"steps": STEPS, "batch_size": BATCH}})
    plan = compile_options(options)
    run_dir = prepare_run_dir(plan, root / "run")
    execute(plan, run_dir, only=["meta", "incubate:0"], loader_workers=WORKERS)
    rows = []
    for workers in (0, WORKERS):
        shutil.rmtree(run_dir / "jobs" / "m2mkd-0", ignore_errors=True)
        samples, seconds = _utilisation([sys.executable, "-m", "monomod.cli", "run", str(run_dir), "--job", "m2mkd:0",
                                         "--loader-workers", str(workers)])
        done = json.loads((run_dir / "jobs" / "m2mkd-0" / "done.json").read_text())
        rows.append({"loader_workers": workers, "images_per_second": round(done["result"]["samples_per_second"], 1),
                     "job_seconds": done["seconds"], "wall_seconds": round(seconds, 1),
                     "gpu_util_median": statistics.median(samples) if samples else None,
                     "gpu_util_mean": round(statistics.mean(samples), 1) if samples else None})
        print(rows[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loader.json").write_text(json.dumps({"steps": STEPS, "batch_size": BATCH, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
