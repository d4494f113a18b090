"""Wall time of the K m2mKD jobs of the demo plan with 1 and with 2 process-pool workers.

The demo plan (``vit_tiny`` -> NAC, K=4, digits) is compiled into a scratch RUN_DIR, its teacher and meta model
are trained once, then the four m2mKD jobs run from the same starting point with ``--executor process`` and 1 or
2 workers (threads per worker = cores // workers), and with the in-process ``local`` executor for reference.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from monomod.compiler import ConvertOptions
from monomod.compiler import compile_options
from monomod.runtime.execute import execute, prepare_run_dir


def run(quick: bool = False) -> dict[str, Any]:
    plan = compile_options(ConvertOptions(teacher="vit_tiny", student="nac", modules=4))
    if quick:  # a sanity pass: a few steps per job
        for job in plan.jobs:
            if "train" in job.config:
                job.config["train"]["steps"] = 20
        plan.rehash()
    quiet = Console(stderr=True, quiet=True)
    m2mkd = [j.name for j in plan.jobs if j.kind == "m2mkd"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_run_dir(plan, Path(tmp) / "base")
        execute(plan, base, only=["teacher", "meta"], console=quiet)
        for executor, workers in (("local", None), ("process", 1), ("process", 2)):
            run_dir = Path(tmp) / f"{executor}-{workers}"
            shutil.copytree(base, run_dir)
            started = time.perf_counter()
            execute(plan, run_dir, only=m2mkd, executor=executor, workers=workers, console=quiet)
            seconds = time.perf_counter() - started
            rows.append({"executor": executor, "workers": workers, "seconds": round(seconds, 1)})
            print(f"  {executor} workers={workers}: {seconds:.1f} s", flush=True)
    one = next(r["seconds"] for r in rows if r["workers"] == 1)
    for r in rows:
        r["speedup_vs_1_worker"] = round(one / r["seconds"], 2)
    return {"rows": rows, "jobs": m2mkd, "steps_per_job": plan.job("m2mkd:0").config["train"]["steps"]}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{len(result['jobs'])} m2mKD jobs of {result['steps_per_job']} steps each.", "",
             "| executor | workers | wall time (s) | speed-up vs 1 worker |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['executor']} | {r['workers'] or '-'} | {r['seconds']} | {r['speedup_vs_1_worker']} |")
    return "\n".join(lines) + "\n"
