"""Shared fixtures: small timm models (no downloads) and their traces, one real tiny run per student family, built
once per session; and a stub for the job runners."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import timm
import torch

import monomod

def pytest_configure(config) -> None:
    """Under pytest-xdist (``-n N``), each worker computes on its own core: it and the processes it starts (the
    process executor, torchrun, the CLI) see one core, so a run's ``auto`` threads resolve to 1 and two workers
    never oversubscribe the machine (two processes with default threads on 2 cores slow each other ~10x)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    if worker and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})
        torch.set_num_threads(1)


# (timm name, constructor kwargs, image size): one of each family the compiler must handle.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "num_classes": 10}, 32),
    "deit": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "num_classes": 10}, 32),
    "resnet": ("resnet18", {"num_classes": 10}, 64),
    "convnext": ("convnext_atto", {"num_classes": 10}, 64),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4, "num_classes": 10}, 64),
}


def make_model(family: str) -> tuple[torch.nn.Module, int]:
    name, kwargs, size = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval(), size


@pytest.fixture(scope="session")
def traced_models() -> dict[str, monomod.TracedModel]:
    out = {}
    for family in FAMILIES:
        model, size = make_model(family)
        out[family] = monomod.trace(model, torch.randn(1, 3, size, size), name=FAMILIES[family][0])
    return out


# One real end-to-end tiny run per student family (tiny_plan's arguments), as test_tiny_plan_end_to_end checks it.
# threads=1: a plan that asks for a thread count computes bitwise alike on every executor (test_executors)
# The NAC's run takes the CPU's default m2mKD layout (fused), the others the separate jobs.
FAMILY_RUNS = {"vit": {"modules": 2, "meta": "trained", "threads": 1},
               "nac": {"modules": 3, "meta": "teacher", "threads": 1, "m2mkd": "auto"},
               "moe": {"modules": 2, "meta": "trained", "threads": 1}}


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory):
    """``finished_runs(student)``: the RUN_DIR of that family's tiny plan run for real, built on first use and
    shared by every test: read it as is, or ``copy_run`` it first to change it."""
    from plan_helpers import run_tiny

    built: dict[str, Path] = {}

    def get(student: str) -> Path:
        if student not in built:
            built[student] = run_tiny(tmp_path_factory.mktemp(f"run-{student}"), student=student, **FAMILY_RUNS[student])
        return built[student]

    return get


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A private copy of a finished RUN_DIR (a run dir holds only relative paths, so the copy is finished too)."""
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


@pytest.fixture
def stub_runners(monkeypatch):
    """Every job kind's runner replaced by one that only writes the job's products (deterministic bytes per job
    hash) and returns a small result: for tests of the scheduler, caching and integrity, which need the plan and
    job machinery but no training. In-process (local executor) only: worker processes import the real runners."""
    from safetensors.torch import save_file

    from monomod.runtime import jobs

    ran: list[str] = []

    def stub(ctx, job):
        ran.append(job.name)
        for output in job.outputs:
            path = Path(ctx.run_dir) / output
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                seed = int(job.hash[:8], 16)
                save_file({"stub": torch.arange(1024, dtype=torch.float32) + seed}, str(path))  # 4 KiB
            else:
                path.write_text(f"{job.name} {job.hash}\n")
        return {"stub": True}

    for kind in list(jobs.RUNNERS):
        monkeypatch.setitem(jobs.RUNNERS, kind, stub)
    return ran
