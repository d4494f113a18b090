"""The NAC in bf16 against fp32 on a CPU (issue 23), at a reduced budget: the first module's m2mKD and inference, not
the whole demo (on a CPU without native bf16, bf16 is emulated and about ten times slower than fp32; this machine's
has AVX512-BF16, see the results' machine line).

Settings, fixed before the first run:

- Training: the NAC's first module (``m2mkd:0``, tokenizer + read-in, the module whose signal bf16 used to lose)
  distilled for the demo's 250 steps in fp32 and under bf16 autocast, seeds 0, 1, 2, in the evidence
  round's meta model and teacher (``experiments/evidence_nac.py``, teacher seed 0); its student hybrid is measured in
  the precision it trained in.
- Inference: the evidence round's fine-tuned NAC students (fp32-trained, seeds 0-2) evaluated in fp32 and under
  bf16 autocast.

``python -m experiments.precision_nac`` after the evidence round's seeds (a seed whose fine-tune is missing is left
out of the inference table; run again once it is there: finished jobs are kept); one job at a time on 1 thread.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

from experiments import evidence as ev
from experiments.evidence_nac import NAME
from monomod.api import load_run
from monomod.compiler import ConvertOptions, compile_options
from monomod.rundir import RunDir
from monomod.runtime.execute import execute, prepare_run_dir, reuse_finished
from monomod.runtime.jobs import RunContext, accuracies

HERE = Path(__file__).parent
STEPS = 250
PRECISIONS = ("fp32", "bf16")


def distil_first_module(seed: int, precision: str, root: Path) -> dict[str, Any]:
    """``m2mkd:0`` alone in ``precision``, with the evidence round's (fp32) teacher side reused: only this job's
    precision is changed, so the meta model and teacher module are the same in both precisions."""
    plan = compile_options(ConvertOptions(
        teacher="vit_tiny", student="nac", modules=4, preset="demo", teacher_seed=0, seed=seed, threads=1,
        budgets={"m2mkd": {"steps": STEPS}}))
    plan.job("m2mkd:0").config["train"]["precision"] = precision
    plan.rehash()
    run_dir = prepare_run_dir(plan, root / f"m2mkd0-{precision}-s{seed}", force=True)
    reuse_finished(plan, run_dir, [HERE / "runs" / NAME / "teacher"])
    execute(plan, run_dir, only=["m2mkd:0"], console=ev.Study().quiet)
    record = RunDir(run_dir).done(plan.job("m2mkd:0"))
    return {"seed": seed, "precision": precision, "seconds": record["seconds"],
            **{k: record["result"][k] for k in ("teacher_hybrid_acc", "student_hybrid_acc")}}


def inference(seed: int) -> dict[str, Any]:
    """IID / OOD of the evidence round's fine-tuned student of ``seed`` evaluated in fp32 and in bf16."""
    run_dir = HERE / "runs" / NAME / f"nac-m2mkd-s{seed}"
    ctx = RunContext(run_dir=run_dir, plan=load_run(run_dir).plan)
    model = ctx.assembled_student()
    model.load_state_dict(ctx.product("finetune"))
    out = {"seed": seed}
    for precision in PRECISIONS:
        result = accuracies(ctx, {"student": model}, 256, distill=False, precision=precision)["student"]
        out[precision] = {"iid": result["iid_acc"], "ood": result["ood_acc"]}
    return out


def train_student(seed: int, precision: str, root: Path) -> dict[str, Any]:
    """The whole NAC student in ``precision``: its four m2mKD jobs and the fine-tune under that autocast, on the
    evidence round's fp32 teacher side, measured in the precision it trained in. fp32 reuses the round's own runs."""
    plan = compile_options(ConvertOptions(teacher="vit_tiny", student="nac", modules=4, preset="demo",
                                          teacher_seed=0, seed=seed, threads=2))
    if precision != "fp32":
        for job in plan.jobs:
            if job.kind in ("m2mkd", "finetune"):
                job.config["train"]["precision"] = precision
        plan.rehash()
    runs = HERE / "runs" / NAME
    run_dir = prepare_run_dir(plan, root / f"student-{precision}-s{seed}", force=True)
    reuse_finished(plan, run_dir, [runs / "teacher", runs / f"nac-bridged-s{seed}", runs / f"nac-m2mkd-s{seed}"])
    execute(plan, run_dir, only=["finetune", "assemble", *(f"m2mkd:{i}" for i in range(4))], console=ev.Study().quiet)
    ctx = RunContext(run_dir=run_dir, plan=load_run(run_dir).plan)
    model = ctx.assembled_student()
    model.load_state_dict(ctx.product("finetune"))
    result = accuracies(ctx, {"student": model}, 256, distill=False, precision=precision)["student"]
    hybrids = [RunDir(run_dir).done(plan.job(f"m2mkd:{i}"))["result"]["student_hybrid_acc"] for i in range(4)]
    return {"seed": seed, "precision": precision, "iid": result["iid_acc"], "ood": result["ood_acc"], "hybrids": hybrids}


def run(quick: bool = False) -> dict[str, Any]:
    root = HERE / "runs" / "precision-nac"
    seeds = ev.SEEDS[:1] if quick else ev.SEEDS
    training = [distil_first_module(seed, precision, root) for seed in seeds for precision in PRECISIONS]
    runs = HERE / "runs" / NAME
    finished = [seed for seed in seeds if (runs / f"nac-m2mkd-s{seed}" / "jobs" / "finetune" / "done.json").is_file()]
    students = [train_student(seed, precision, root) for seed in seeds for precision in PRECISIONS]
    return {"steps": STEPS, "training": training, "inference": [inference(seed) for seed in finished],
            "students": students}


def _diff(pairs: list[tuple[float, float]]) -> str:
    gaps = [100 * (b - a) for a, b in pairs]
    spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    return f"{statistics.fmean(gaps):+.1f} ± {spread:.1f}"


def _by_seed(rows: list[dict[str, Any]]) -> tuple[dict[tuple[int, str], dict[str, Any]], list[int]]:
    """Rows keyed by (seed, precision), and the seeds in order."""
    return {(r["seed"], r["precision"]): r for r in rows}, sorted({r["seed"] for r in rows})


def markdown(result: dict[str, Any]) -> str:
    by, seeds = _by_seed(result["training"])
    lines = [f"NAC module 0 (tokenizer + read-in) distilled for {result['steps']} steps in each precision (student "
             "hybrid measured in that precision), and the evidence round's fp32-trained fine-tuned students "
             "evaluated in each. Points, bf16 minus fp32, mean ± std over seeds.", "",
             "| seed | module 0 student hybrid fp32 | bf16 | teacher hybrid | m2mkd:0 s fp32 / bf16 |",
             "|---:|---:|---:|---:|---:|"]
    for seed in seeds:
        f, b = by[(seed, "fp32")], by[(seed, "bf16")]
        lines.append(f"| {seed} | {100 * f['student_hybrid_acc']:.1f} | {100 * b['student_hybrid_acc']:.1f} | "
                     f"{100 * f['teacher_hybrid_acc']:.1f} | {f['seconds']:.0f} / {b['seconds']:.0f} |")
    pairs = [(by[(s, "fp32")]["student_hybrid_acc"], by[(s, "bf16")]["student_hybrid_acc"]) for s in seeds]
    lines += ["", f"Module 0 student hybrid, bf16 minus fp32: {_diff(pairs)} points.", "",
              "| seed | student IID fp32 | bf16 | OOD fp32 | bf16 |", "|---:|---:|---:|---:|---:|"]
    for r in result["inference"]:
        lines.append(f"| {r['seed']} | {100 * r['fp32']['iid']:.1f} | {100 * r['bf16']['iid']:.1f} | "
                     f"{100 * r['fp32']['ood']:.1f} | {100 * r['bf16']['ood']:.1f} |")
    iid = [(r["fp32"]["iid"], r["bf16"]["iid"]) for r in result["inference"]]
    lines += ["", f"Fine-tuned student IID, bf16 minus fp32 inference: {_diff(iid)} points.", ""]
    return "\n".join(lines + _students_markdown(result.get("students", [])))


def _students_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The whole student trained in each precision (demo budgets), measured in the precision it trained in."""
    if not rows:
        return []
    by, seeds = _by_seed(rows)
    lines = ["The whole NAC student trained in each precision (its four m2mKD jobs and the fine-tune under that "
             "autocast, the demo's budgets, bridged assembly), measured in the precision it trained in.", "",
             "| seed | IID fp32 | IID bf16 | OOD fp32 | OOD bf16 | module 0 hybrid fp32 | bf16 |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for seed in seeds:
        f, b = by[(seed, "fp32")], by[(seed, "bf16")]
        lines.append(f"| {seed} | {100 * f['iid']:.1f} | {100 * b['iid']:.1f} | {100 * f['ood']:.1f} | "
                     f"{100 * b['ood']:.1f} | {100 * f['hybrids'][0]:.1f} | {100 * b['hybrids'][0]:.1f} |")
    pair = lambda key: [(by[(s, "fp32")][key], by[(s, "bf16")][key]) for s in seeds]  # noqa: E731
    module0 = [(by[(s, "fp32")]["hybrids"][0], by[(s, "bf16")]["hybrids"][0]) for s in seeds]
    return lines + ["", f"Student, bf16 minus fp32: IID {_diff(pair('iid'))}, OOD {_diff(pair('ood'))}, module 0 "
                    f"hybrid {_diff(module0)} points.", ""]


def main() -> int:
    from benchmarks.run import write_result

    started = time.perf_counter()
    write_result("precision_nac", run(), started, quick=False, package="experiments", command="python -m experiments.precision_nac")
    return 0


if __name__ == "__main__":
    sys.exit(main())
