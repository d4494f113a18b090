"""The boundary loss (issue 23): does ``--boundary-loss`` make distilled stages chain, and what does it cost or buy
after the fine-tune?

Settings, fixed before running: the demo preset, vit_tiny teacher by Deep Incubation with teacher seed 0, shared
under ``--reuse`` with the evidence round (``experiments/evidence_nac.py``), ``--assemble bridged``; student seeds
0, 1, 2; weights 0 and 10 (10 chosen over 1 by the chained stages' top-1 on the *training* split, seed 0); per run
the m2mKD jobs, the assembly and the fine-tune. Measured: val top-1 of the assembled student before fine-tuning and
after. The NAC's rows come from ``evidence_nac``'s bridged runs (weight 0) and this study's ``nac`` lane (weight 10).

``python -m experiments.boundary [moe|vit|nac ...]`` (2 threads, one run at a time; finished jobs are reused).
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
from monomod.runtime.jobs import RunContext
from monomod.runtime.train import evaluate

HERE = Path(__file__).parent
WEIGHTS = (0, 10)
FAMILIES = ("moe", "vit", "nac")


def one_run(study: ev.Study, student: str, weight: float, seed: int) -> dict[str, Any]:
    """m2mKD, bridged assembly and fine-tune of one student; val top-1 before and after the fine-tune."""
    started = time.perf_counter()
    run_dir = study.convert(f"{student}-boundary{weight}-s{seed}", only=["finetune"], student=student, seed=seed,
                            boundary_loss=weight, assemble="bridged", threads=2)
    ctx = RunContext(run_dir=run_dir, plan=load_run(run_dir).plan)
    row = {"student": student, "boundary_loss": weight, "seed": seed}
    for product in ("assemble", "finetune"):
        model = ctx.assembled_student()
        model.load_state_dict(ctx.product(product))
        row[product] = evaluate(model.eval(), ctx.loader("val", 256, shuffle=False)(0))
    return {**row, "seconds": round(time.perf_counter() - started, 1)}


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (student, weight)."""
    out = []
    for student in FAMILIES:
        for weight in WEIGHTS:
            mine = [r for r in rows if r["student"] == student and r["boundary_loss"] == weight]
            if not mine:
                continue
            stat = {k: (statistics.mean(r[k] for r in mine) * 100, statistics.stdev(r[k] * 100 for r in mine)
                        if len(mine) > 1 else 0.0) for k in ("assemble", "finetune")}
            out.append({"student": student, "boundary_loss": weight, "seeds": len(mine), **stat})
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["Val top-1, mean ± std over seeds." + (f" {result['note']}." if result.get("note") else ""), "",
             "| student | boundary loss | seeds | assembled, before fine-tune (IID %) | fine-tuned (IID %) |",
             "|---|---:|---:|---:|---:|"]
    for s in summary(result["rows"]):
        a, f = s["assemble"], s["finetune"]
        lines.append(f"| {s['student']} | {s['boundary_loss']} | {s['seeds']} | {a[0]:.1f} ± {a[1]:.1f} | "
                     f"{f[0]:.1f} ± {f[1]:.1f} |")
    chains = result.get("chains")
    if chains:  # val top-1 of chains of meta (M) and stitched student (S) stages in their m2mKD form, seed 0
        columns = list(chains)
        lines += ["", "Chains of meta (M) and distilled student (S) stages in their m2mKD form, seed 0, val top-1 %:",
                  "", "| chain | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for chain in chains[columns[0]]:
            cells = [f"{100 * chains[c][chain]:.1f}" if chain in chains[c] else "" for c in columns]
            lines.append(f"| {' '.join(chain)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(families: list[str]) -> None:
    from benchmarks.run import write_result

    started = time.perf_counter()
    study = ev.Study(name=NAME)
    rows = [one_run(study, student, weight, seed) for student in families for seed in ev.SEEDS for weight in WEIGHTS]
    write_result("boundary", {"rows": rows, "summary": summary(rows)}, started, quick=False, package="experiments",
                 command="python -m experiments.boundary " + " ".join(families))


if __name__ == "__main__":
    main(sys.argv[1:] or list(FAMILIES))
