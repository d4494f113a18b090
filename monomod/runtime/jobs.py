"""Running one job: its runner (``monomod.plan.JOB_KINDS``), with the threads, device and precision resolved on the
machine that runs it, then its done record. The context (``context``), the runners (``runners``) and evaluation
(``evaluation``) have their own modules; their names are re-exported here."""
from __future__ import annotations

import importlib
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from monomod.plan import JOB_KINDS, Job
from monomod.runtime.config import resolve_threads, used_here
from monomod.runtime.context import RunContext, assembly_mode
from monomod.runtime.distributed import barrier, is_writer, world_size
from monomod.runtime.evaluation import accuracies, asked_precision, measure_hybrids, ood_accuracies

Runner = Callable[[RunContext, Job], dict[str, Any]]


def runner(kind: str) -> Runner:
    """The function that runs a job of ``kind``, as its ``JobKind.runner`` names it."""
    module, _, name = JOB_KINDS[kind].runner.partition(":")
    return getattr(importlib.import_module(module), name)


RUNNERS: dict[str, Runner] = {kind: runner(kind) for kind in JOB_KINDS}


@contextmanager
def job_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads (``resolve_threads``: the plan's count where it asks for one,
    else this machine's share), then put the caller's back."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_job(ctx: RunContext, job: Job, threads: int | None = None) -> dict[str, Any]:
    """Run one job and record it as done (hash, wall time, result, and what it ``used``) with an atomic marker.

    ``threads``: what the executor allots this job on this machine, used where the plan asks for no count
    (``resolve_threads``); precision and device ``auto`` resolve here too, on the machine that runs the job.
    Under torchrun every rank trains (data parallel); jobs that do not train run on rank 0 alone; only rank 0
    writes, and all ranks meet at a barrier before the next job, so no rank reads a product before it exists."""
    started = time.perf_counter()
    kind = JOB_KINDS[job.kind]
    count = resolve_threads(ctx.settings.get("threads"), threads)
    if world_size() > 1 and not kind.trains and not is_writer():
        result: dict[str, Any] = {}
    else:
        with job_threads(count):
            result = RUNNERS[job.kind](ctx, job)
    seconds = time.perf_counter() - started
    record = {"name": job.name, "hash": job.hash, "seconds": round(seconds, 3), "result": result,
              "used": _used(ctx, job, count)}
    if world_size() > 1:
        record["world_size"] = world_size()
    if is_writer():
        record = ctx.dirs.write_done(job, record)
    barrier()
    return record


def _used(ctx: RunContext, job: Job, threads: int) -> dict[str, Any]:
    """Threads, device and precision the job computed with here (an evaluation measures in the fine-tune's), and
    for a training job the input path its batches took."""
    from monomod.runtime.device_data import resolve_input_path

    trains = next(iter(job.train_configs()), None)  # a fused job's members train alike but for the seed
    train = {"precision": asked_precision(ctx.plan)} if job.kind == "evaluate" else trains
    used = used_here(train, threads)
    if trains is not None:
        used["input_path"] = resolve_input_path(ctx.settings.get("input_path", "auto"),
                                                ctx.data_spec(distill=JOB_KINDS[job.kind].distill),
                                                device=used["device"])
    return used


__all__ = ["RUNNERS", "RunContext", "accuracies", "assembly_mode", "job_threads", "measure_hybrids",
           "ood_accuracies", "run_job", "runner"]
