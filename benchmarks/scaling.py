"""Wall time of the K m2mKD jobs of the demo plan on the local executor and on 1 and 2 process-pool workers.

The demo plan (``vit_tiny`` -> NAC, K=4, digits) is compiled into a scratch RUN_DIR, the jobs the m2mKD jobs read
from (meta, incubate, teacher) are trained once, then the four m2mKD jobs run from the same starting point. The
plan's ``threads`` (every job's torch threads, whichever executor) is set per row: all cores for one job at a time,
cores / 2 for two side by side. Rows with the same threads give bitwise the same weights (checked here).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file

from monomod.compiler import ConvertOptions
from monomod.compiler import compile_options
from monomod.runtime.execute import execute, prepare_run_dir
from monomod.runtime.executors import cpu_count


def run(quick: bool = False) -> dict[str, Any]:
    plan = compile_options(ConvertOptions(teacher="vit_tiny", student="nac", modules=4))
    if quick:  # a sanity pass: a few steps per job
        for job in plan.jobs:
            if "train" in job.config:
                job.config["train"]["steps"] = 20
        plan.rehash()
    quiet = Console(stderr=True, quiet=True)
    m2mkd = [j.name for j in plan.jobs if j.kind == "m2mkd"]
    before = [j.name for j in plan.jobs if j.kind in ("meta", "incubate", "teacher")]
    cores = cpu_count()
    configs = (("local", None, cores), ("process", 1, cores), ("local", None, max(1, cores // 2)),
               ("process", 2, max(1, cores // 2)))
    rows, products = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_run_dir(plan, Path(tmp) / "base")
        execute(plan, base, only=before, console=quiet)
        for executor, workers, threads in configs:
            run_dir = Path(tmp) / f"{executor}-{workers}-{threads}"
            shutil.copytree(base, run_dir)
            plan.settings["threads"] = threads  # not in job hashes: the finished jobs stay finished
            plan.save(run_dir)
            started = time.perf_counter()
            execute(plan, run_dir, only=m2mkd, executor=executor, workers=workers, console=quiet)
            seconds = time.perf_counter() - started
            same = _same_products(run_dir, products.setdefault(threads, run_dir), m2mkd)
            rows.append({"executor": executor, "workers": workers, "threads": threads, "seconds": round(seconds, 1),
                         "bitwise_equal_to_first_with_these_threads": same})
            print(f"  {executor} workers={workers} threads={threads}: {seconds:.1f} s", flush=True)
        one = next(r["seconds"] for r in rows if r["workers"] == 1)
        local = rows[0]["seconds"]
        for r in rows:
            r["speedup_vs_1_worker"] = round(one / r["seconds"], 2)
            r["speedup_vs_local"] = round(local / r["seconds"], 2)
    return {"rows": rows, "jobs": m2mkd, "steps_per_job": plan.job("m2mkd:0").config["train"]["steps"],
            "cores": cores}


def _same_products(run_dir: Path, reference: Path, names: list[str]) -> bool:
    for name in names:
        folder = name.replace(":", "-")
        a, b = (load_file(str(d / "jobs" / folder / "model.safetensors")) for d in (run_dir, reference))
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{len(result['jobs'])} m2mKD jobs of {result['steps_per_job']} steps each on {result['cores']} cores; "
             "threads = the plan's torch threads per job. Pool workers start once and are reused.", "",
             "| executor | workers | threads | wall time (s) | speed-up vs 1 worker | speed-up vs local | "
             "bitwise equal to the first row with these threads |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['executor']} | {r['workers'] or '-'} | {r['threads']} | {r['seconds']} | "
                     f"{r['speedup_vs_1_worker']} | {r['speedup_vs_local']} | "
                     f"{'yes' if r['bitwise_equal_to_first_with_these_threads'] else 'no'} |")
    by = {(r["executor"], r["workers"], r["threads"]): r["seconds"] for r in result["rows"]}
    cores, half = result["cores"], max(1, result["cores"] // 2)
    one_job = by[("local", None, half)] / by[("local", None, cores)]
    lines += ["", f"2 workers against 1 worker: {by[('process', 1, cores)] / by[('process', 2, half)]:.2f}x (goal "
              f"1.6x); against the same jobs at {half} thread(s) one at a time: "
              f"{by[('local', None, half)] / by[('process', 2, half)]:.2f}x. One job runs {one_job:.2f}x faster on "
              f"{cores} threads than on {half}, so 2 workers x {half} thread(s) can beat 1 x {cores} by "
              f"{2 / one_job:.2f}x at most."]
    return "\n".join(lines) + "\n"
