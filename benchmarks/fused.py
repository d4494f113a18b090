"""The demo's m2mKD phase, fused against separate (``--m2mkd fused|separate``), over seeds.

The demo plan (``vit_tiny`` -> NAC, K=4, digits, demo budgets) is compiled once per seed and mode with one teacher
seed (0), so every run reuses one teacher side (meta, incubate, teacher; trained once, or read from ``--base``, a
RUN_DIR that finished them with the same hashes). Per seed the two modes run back to back, their order alternating
from seed to seed, at the demo's threads (``--threads``: every core by default; ``--threads 1`` for a machine
shared with other work): the wall time of the m2mKD phase alone (the separate plan's K m2mKD jobs;
the fused plan's fused job and its K publishing jobs), the phase's samples/s (K x steps x batch / wall), and
each module's hybrid accuracies as the m2mKD jobs record them.

``python -m benchmarks.fused --base RUN_DIR --seeds 0,1,2 [--threads N]`` (or ``python -m benchmarks.run --only fused``).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from monomod.compiler import ConvertOptions, compile_options
from monomod.rundir import RunDir
from monomod.runtime.config import cpu_count
from monomod.runtime.execute import execute, prepare_run_dir, reuse_finished

TEACHER_SIDE = ("meta", "incubate", "teacher")
M2MKD_SIDE = ("m2mkd", "m2mkd-fused")
MODES = ("separate", "fused")


def demo_plan(seed: int, mode: str, steps: int | None = None, teacher_steps: int | None = None,
              threads: int | None = None):
    """The demo plan of ``seed`` (teacher seed 0) in ``mode`` at ``threads`` (None: the demo's, every core);
    ``steps`` shortens the m2mKD jobs (warm-up a tenth, as the demo's), ``teacher_steps`` every other job."""
    plan = compile_options(ConvertOptions(teacher="vit_tiny", student="nac", modules=4, seed=seed, teacher_seed=0,
                                          m2mkd=mode, threads=threads))
    for job in plan.jobs:
        budget = steps if job.kind in M2MKD_SIDE else teacher_steps
        for config in [job.config, *job.config.get("members", [])] if budget else []:
            if "train" in config:
                config["train"].update(steps=budget, warmup_steps=budget // 10)
    plan.rehash()
    return plan


def run(quick: bool = False, base: str | None = None, seeds: tuple[int, ...] = (0, 1, 2),
        steps: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """``steps``: the m2mKD jobs' budget (default: the demo's 250)."""
    steps, teacher_steps = (20, 20) if quick else (steps, None)
    seeds = seeds[:1] if quick else seeds
    quiet = Console(stderr=True, quiet=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if base is None:
            plan = demo_plan(seeds[0], "separate", steps, teacher_steps, threads)
            base = str(prepare_run_dir(plan, Path(tmp) / "base"))
            execute(plan, base, only=[j.name for j in plan.jobs if j.kind in TEACHER_SIDE], console=quiet)
        for n, seed in enumerate(seeds):
            for mode in (MODES if n % 2 == 0 else MODES[::-1]):  # interleaved: the order alternates per seed
                rows.append(_phase(seed, mode, (steps, teacher_steps, threads), base, Path(tmp) / f"{mode}-{seed}", quiet))
                print(f"  seed {seed} {mode}: {rows[-1]['seconds']} s", flush=True)
                shutil.rmtree(Path(tmp) / f"{mode}-{seed}")
    return {"rows": rows, "summary": _summary(rows), "threads": threads or cpu_count(), "m2mkd_steps": steps or 250}


def _phase(seed: int, mode: str, budget: tuple[int | None, int | None, int | None], base: str, run_dir: Path,
           console: Console) -> dict[str, Any]:
    """One m2mKD phase: the teacher side copied from ``base``, the m2mKD side timed."""
    plan = demo_plan(seed, mode, *budget)
    prepare_run_dir(plan, run_dir)
    reused = reuse_finished(plan, run_dir, [base])
    missing = [j.name for j in plan.jobs if j.kind in TEACHER_SIDE and j.name not in reused]
    if missing:
        raise SystemExit(f"{base} has not finished {', '.join(missing)} with these hashes")
    phase = [j.name for j in plan.jobs if j.kind in M2MKD_SIDE]
    started = time.perf_counter()
    execute(plan, run_dir, only=phase, console=console)
    seconds = time.perf_counter() - started
    train = plan.job("m2mkd:0").config["train"]
    modules = sorted((j for j in plan.jobs if j.kind == "m2mkd"), key=lambda j: j.config["module"])
    results = [RunDir(run_dir).done(job)["result"] for job in modules]
    return {"seed": seed, "mode": mode, "seconds": round(seconds, 1),
            "samples_per_second": round(len(modules) * train["steps"] * train["batch_size"] / seconds, 1),
            "student_hybrid_acc": [round(r["student_hybrid_acc"], 4) for r in results],
            "teacher_hybrid_acc": [round(r["teacher_hybrid_acc"], 4) for r in results]}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["seed"], r["mode"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    ratios = [by[(s, "separate")]["seconds"] / by[(s, "fused")]["seconds"] for s in seeds]
    gaps = [[f - s for f, s in zip(by[(seed, "fused")]["student_hybrid_acc"], by[(seed, "separate")]["student_hybrid_acc"])]
            for seed in seeds]
    return {"speedups": [round(r, 3) for r in ratios], "median_speedup": round(statistics.median(ratios), 3),
            "mean_student_hybrid_acc": {mode: [round(statistics.mean(by[(s, mode)]["student_hybrid_acc"][i] for s in seeds), 4)
                                               for i in range(len(rows[0]["student_hybrid_acc"]))] for mode in MODES},
            "fused_minus_separate_per_module": [round(statistics.mean(g[i] for g in gaps), 4) for i in range(len(gaps[0]))]}


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [f"The demo's m2mKD phase (vit_tiny -> NAC, K=4, digits, {result.get('m2mkd_steps', 250)} steps per m2mKD "
             f"job, {result['threads']} torch thread(s)), per seed both "
             "modes back to back (order alternating), teacher side reused. Hybrid accuracies: val top-1 of "
             "`meta[:i] -> S_i -> meta[i+1:]` per module i.", "",
             "| seed | mode | wall (s) | samples/s | student hybrid acc, modules 0..3 (%) |", "|---:|---|---:|---:|---|"]
    for r in result["rows"]:
        accs = " / ".join(f"{100 * a:.1f}" for a in r["student_hybrid_acc"])
        lines.append(f"| {r['seed']} | {r['mode']} | {r['seconds']} | {r['samples_per_second']} | {accs} |")
    lines += ["", f"Speed-up of fused over separate per seed: {', '.join(f'{x:.2f}x' for x in s['speedups'])}; "
              f"median **{s['median_speedup']:.2f}x**."]
    for mode in MODES:
        lines.append(f"Mean student hybrid accuracy over seeds, {mode}: "
                     + " / ".join(f"{100 * a:.1f}" for a in s["mean_student_hybrid_acc"][mode]) + " %.")
    lines.append("Fused minus separate, mean over seeds, per module: "
                 + " / ".join(f"{100 * g:+.1f}" for g in s["fused_minus_separate_per_module"]) + " points.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import write_result

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="a RUN_DIR whose meta, incubate and teacher jobs finished (teacher seed 0)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, help="the m2mKD jobs' budget (default: the demo's 250)")
    parser.add_argument("--threads", type=int, help="torch threads per job (default: the demo's, every core)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    result = run(quick=args.quick, base=args.base, seeds=seeds, steps=args.steps, threads=args.threads)
    command = "python -m benchmarks.fused" + (f" --seeds {args.seeds}" if args.seeds != "0,1,2" else "") + (
        f" --steps {args.steps}" if args.steps else "") + (f" --threads {args.threads}" if args.threads else "") + (
        " --quick" if args.quick else "")
    write_result("fused", result, started, quick=args.quick, command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
