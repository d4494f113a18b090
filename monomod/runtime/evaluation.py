"""Measuring models: the hybrid pairs of one module (incubate and m2mKD jobs) and the evaluate job (IID and OOD
top-1 of the teacher, meta model and students, then the run's report)."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from monomod.plan import Job, Plan
from monomod.runtime.config import resolve_device, resolve_precision
from monomod.runtime.context import RunContext
from monomod.runtime.train import correct_predictions, evaluate


@torch.inference_mode()
def measure_hybrids(ctx: RunContext, i: int, stages: dict[str, nn.Module], batch_size: int = 256,
                    precision: str = "fp32") -> dict[str, float]:
    """Val top-1 of ``meta[:i] -> stage -> meta[i+1:]`` for each named stage (``<name>_acc``), and, for two stages,
    the fraction of images on which their predictions agree (``agreement``): whether module i's pair worked.
    Measured in ``precision``, the one the job trained in."""
    from monomod.students.hybrid import hybrid

    meta = ctx.meta()
    device = next(iter(meta.parameters()), torch.empty(0)).device
    pairs = {name: hybrid(meta, i, stage.to(device)).eval() for name, stage in stages.items()}
    correct = {name: 0 for name in pairs}
    agree = seen = 0
    for x, y in ctx.loader("val", batch_size, shuffle=False, distill=True)(0):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            predictions = {name: pair(x).argmax(dim=-1) for name, pair in pairs.items()}
        for name, predicted in predictions.items():
            correct[name] += int((predicted == y).sum())
        if len(predictions) == 2:
            first, second = predictions.values()
            agree += int((first == second).sum())
        seen += len(y)
    scores = {f"{name}_acc": correct[name] / max(seen, 1) for name in pairs}
    if len(pairs) == 2:
        scores["agreement"] = agree / max(seen, 1)
    return scores


def run_evaluate(ctx: RunContext, job: Job) -> dict[str, Any]:
    from monomod.report import write_run_report

    started = time.perf_counter()
    batch = job.config.get("batch_size", 256)
    students: dict[str, nn.Module] = {}
    for name in ("assemble", "finetune"):
        student = ctx.assembled_student()
        student.load_state_dict(ctx.product(name))
        students["assembled" if name == "assemble" else "student"] = student
    baseline = ctx.new_student(ctx.settings["seed"])
    baseline.load_state_dict(ctx.product("baseline"))
    students["baseline"] = baseline
    context = {"teacher": ctx.teacher(), **({"meta": ctx.meta()} if ctx.settings["meta"] == "trained" else {})}
    same_data = ctx.settings.get("distill_data", ctx.settings["data"]) == ctx.settings["data"]
    precision = _eval_precision(ctx)
    results = accuracies(ctx, students, batch, distill=False, precision=precision)
    results.update(accuracies(ctx, context, batch, distill=not same_data, precision=precision))  # teacher and meta know the distill classes
    write_run_report(ctx.run_dir, ctx.plan, results, {job.name: round(time.perf_counter() - started, 3)},
                     partition=ctx.partition())
    return {name: r for name, r in results.items()}


def _eval_precision(ctx: RunContext) -> str:
    """The precision the students were trained in (the fine-tune job's, resolved on this machine): a model is
    measured as it runs."""
    return resolve_precision(asked_precision(ctx.plan), resolve_device("auto"))


def asked_precision(plan: Plan) -> str:
    """The precision the plan asks the students to be trained, and so measured, in (the fine-tune job's)."""
    return plan.job("finetune").config["train"].get("precision", "fp32")


def accuracies(ctx: RunContext, models: dict[str, nn.Module], batch: int, *, distill: bool,
               precision: str = "fp32") -> dict[str, dict]:
    """IID (val) and OOD top-1 of each model, on the task's data or the distillation data (which has no OOD)."""
    device = resolve_device("auto")
    bundle = ctx.distill_data if distill else ctx.data
    results: dict[str, dict[str, float | None]] = {}
    for name, model in models.items():
        model.to(device)
        iid = evaluate(model, ctx.loader("val", batch, shuffle=False, distill=distill)(0), device, precision)
        results[name] = {"iid_acc": iid, "ood_acc": None}
        if not distill and bundle.ood is not None:
            correct = correct_predictions(model, ctx.loader("ood", batch, shuffle=False)(0), device, precision)
            results[name].update(ood_accuracies(correct, getattr(bundle.ood, "tags", None)))
    return results


def ood_accuracies(correct: torch.Tensor, tags: list[str] | None) -> dict[str, Any]:
    """``ood_acc`` from per-sample correctness, and ``ood_by_corruption`` where the OOD set names each image's
    corruption (the digits splits): a gain on mild shifts can hide a loss on one hard shift."""
    out: dict[str, Any] = {"ood_acc": float(correct.float().mean()) if len(correct) else 0.0}
    if tags is not None:
        by_tag: dict[str, list[bool]] = {}
        for tag, ok in zip(tags, correct.tolist()):
            by_tag.setdefault(tag, []).append(ok)
        out["ood_by_corruption"] = {tag: sum(oks) / len(oks) for tag, oks in sorted(by_tag.items())}
    return out
