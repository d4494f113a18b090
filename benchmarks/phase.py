"""The m2mKD phase at the hardware's speed: separate jobs against the fused job, as samples/s and fractions of the
measured matmul peaks, beside a plain timm training loop of the same teacher (the anchor).

On a GPU: ``vit_small`` (K=4) and ``vit_base`` (K=4 and K=8) into NAC students at 224 px, in bf16 autocast, on
in-memory synthetic data, on the CPU input path and on the device path (issue 26's 30 % goal: the vit_base K=8
phase in bf16). On a CPU, in fp32: the demo (``vit_tiny`` K=4, digits, 32 px) on both input paths, and
``vit_small`` K=4 at 224 px at batch 16 (vit_base would take hours there). The teacher side trains one step (the cost of a step does not depend on it); each m2mKD job (or the fused
job) then trains ``steps`` steps, and its steady samples/s leave out the first logging window.

Module-samples/s count one sample through one module's m2mKD (K of them per fused sample). FLOPs per sample follow
``benchmarks.throughput``: a separate job i costs ``meta[:i] + T_i + 3 meta[i+1:] + 3 S_i``; the fused job runs the
prefix once for all modules. ``python -m benchmarks.run --only phase``.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.throughput import matmul_peak
from monomod.compiler import ConvertOptions, compile_options
from monomod.rundir import RunDir
from monomod.runtime.execute import execute, prepare_run_dir

# name -> (convert options, batch, steps, log_every, precision, input paths)
GPU_SETTINGS = {
    "vit_small K=4, 224 px": (dict(teacher="vit_small", modules=4), 128, 40, 10, "bf16", ("cpu", "device")),
    "vit_base K=4, 224 px": (dict(teacher="vit_base", modules=4), 128, 40, 10, "bf16", ("cpu", "device")),
    "vit_base K=8, 224 px": (dict(teacher="vit_base", modules=8), 128, 40, 10, "bf16", ("cpu", "device")),
}
CPU_SETTINGS = {
    "demo (vit_tiny K=4, 32 px)": (dict(teacher="vit_tiny", modules=4, data="digits"), 64, 60, 10, "fp32",
                                   ("cpu", "device")),
    "vit_small K=4, 224 px": (dict(teacher="vit_small", modules=4, data="synthetic", img_size=224), 16, 12, 4, "fp32",
                              ("cpu",)),
}
GPU_DATA = dict(data="synthetic", img_size=224)


def run(quick: bool = False) -> dict[str, Any]:
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    peaks = {dtype: matmul_peak(dtype, quick, device) for dtype in ("fp32", "bf16")}
    settings = GPU_SETTINGS if gpu else CPU_SETTINGS
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (setting, (options, batch, steps, log_every, precision, paths)) in enumerate(settings.items()):
            options = {**(GPU_DATA if gpu else {}), **options}
            steps, log_every = (2 * max(1, log_every // 5), max(1, log_every // 5)) if quick else (steps, log_every)
            for path in paths:
                for mode in ("separate", "fused"):
                    row = _phase(Path(tmp) / f"{n}-{mode}-{path}", {**options, "input_path": path}, mode, batch,
                                 steps, log_every, precision)
                    rows.append({"setting": setting, "mode": mode, "input": path, "precision": precision,
                                 "batch": batch, **row,
                                 "fraction_of_peak": round(row["achieved_gflops"] * 1e9 / peaks[precision], 4)})
                    print(f"  {setting} {mode}, {path} input: {row['module_samples_per_s']} module-samples/s, "
                          f"{100 * rows[-1]['fraction_of_peak']:.1f} % of the {precision} peak", flush=True)
            rows.append({"setting": setting, "mode": "timm loop (anchor)", "input": "device tensors",
                         "precision": precision, "batch": batch,
                         **_timm_loop(options["teacher"], options.get("img_size", 32), batch, steps, precision,
                                      device)})
    return {"rows": rows, "peaks": peaks, "device": torch.cuda.get_device_name() if gpu else "cpu",
            "threads": torch.get_num_threads()}


def _phase(run_dir: Path, options: dict, mode: str, batch: int, steps: int, log_every: int,
           precision: str) -> dict[str, Any]:
    plan = compile_options(ConvertOptions(student="nac", teacher_training="end-to-end", m2mkd=mode, **options))
    for job in plan.jobs:
        for config in (job.config, *job.config.get("members", ())):
            if "train" in config:
                phase = job.kind in ("m2mkd", "m2mkd-fused")
                config["train"].update(steps=steps if phase else 1, batch_size=batch, warmup_steps=0,
                                       log_every=log_every if phase else 1, precision=precision)
    plan.rehash()
    quiet = Console(stderr=True, quiet=True)
    prepare_run_dir(plan, run_dir)
    execute(plan, run_dir, only=["teacher", "meta"], console=quiet)
    trained = [j for j in plan.jobs if j.kind == ("m2mkd-fused" if mode == "fused" else "m2mkd")]
    started = time.perf_counter()
    execute(plan, run_dir, only=[j.name for j in plan.jobs if j.kind in ("m2mkd", "m2mkd-fused")], console=quiet)
    wall = time.perf_counter() - started
    per_module = _module_flops(plan, run_dir)
    k = len(per_module)
    # seconds per phase sample (one sample through all k modules): the k separate jobs' add up; the fused job's
    # one sample is k module-samples, and its prefix runs once for all of them
    seconds = sum(_steady_seconds(run_dir, job, batch, log_every) for job in trained)
    prefix = max(f["prefix"] for f in per_module) if mode == "fused" else sum(f["prefix"] for f in per_module)
    flops = sum(f["own"] for f in per_module) + prefix
    rate = 1 / seconds
    module_rate = k * rate
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"modules": k, "steps": steps, "phase_wall_s": round(wall, 1),
            "module_samples_per_s": round(module_rate, 1), "gflop_per_sample": round(flops / 1e9, 3),
            "achieved_gflops": round(flops * rate / 1e9, 2)}


def _steady_seconds(run_dir: Path, job: Any, batch: int, log_every: int) -> float:
    """Seconds per sample of ``job`` in its steady windows (the first logging window left out)."""
    lines = [json.loads(line) for line in (run_dir / "jobs" / job.dir / "metrics.jsonl").read_text().splitlines()]
    steady = lines[1:] or lines
    return sum(log_every * batch / line["samples_per_second"] for line in steady) / (len(steady) * log_every * batch)


def _module_flops(plan: Any, run_dir: Path) -> list[dict[str, float]]:
    """Per module i: its frozen prefix ``meta[:i]`` and the rest of its m2mKD sample (teacher module, 3x the meta
    suffix, 3x the student stage)."""
    from monomod.runtime.jobs import RunContext
    from monomod.students.summary import stage_costs

    ctx = RunContext(run_dir=run_dir, plan=plan)
    teacher = [spec.flops for spec in ctx.partition().modules]
    meta = [c.flops for c in stage_costs(ctx.new_meta())]
    student = [c.flops for c in stage_costs(ctx.new_student(0))]
    return [{"prefix": float(sum(meta[:i])), "own": teacher[i] + 3.0 * sum(meta[i + 1:]) + 3.0 * student[i]}
            for i in range(len(teacher))]


def _timm_loop(teacher: str, img_size: int, batch: int, steps: int, precision: str, device: str) -> dict[str, Any]:
    """A plain timm training loop of the teacher (AdamW, cross-entropy, the same autocast) on device-resident
    batches: the samples/s and FLOP/s a whole-model step reaches on this machine."""
    from monomod.frontend import load_model
    from monomod.passes.trace import trace

    model = load_model(teacher, img_size=img_size, num_classes=10).to(device)
    flops = 3.0 * trace(model.eval(), torch.randn(1, 3, img_size, img_size, device=device)).flops
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for n in range(steps + 3):
        if n == 3:  # warm-up left out
            sync()
            started = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    rate = steps * batch / (time.perf_counter() - started)
    return {"steps": steps, "samples_per_s": round(rate, 1), "gflop_per_sample": round(flops / 1e9, 3),
            "achieved_gflops": round(flops * rate / 1e9, 2)}


def markdown(result: dict[str, Any]) -> str:
    peaks = result["peaks"]
    lines = [f"{result['device']}, {result['threads']} threads; measured `torch.mm` peaks: fp32 "
             f"{peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s. Module-samples/s: one "
             "sample through one module's m2mKD (a fused sample counts K); steady windows only.", "",
             "| setting | mode | input path | precision | batch | steps | module-samples/s | GFLOP/sample | GFLOP/s "
             "| of peak |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        rate = r.get("module_samples_per_s", r.get("samples_per_s"))
        fraction = r.get("fraction_of_peak", r["achieved_gflops"] * 1e9 / peaks[r["precision"]])
        lines.append(f"| {r['setting']} | {r['mode']} | {r.get('input', '-')} | {r['precision']} | {r['batch']} "
                     f"| {r['steps']} | {rate} | "
                     f"{r['gflop_per_sample']} | {r['achieved_gflops']} | {100 * fraction:.1f} % |")
    return "\n".join(lines) + "\n"
