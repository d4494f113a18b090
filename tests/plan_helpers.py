"""Shared plan helpers: the schedule pass alone, and tiny plans compiled once per session and copied per test."""
from __future__ import annotations

import copy
from pathlib import Path

from monomod.compiler import ConvertOptions, compile_options
from monomod.compiler.options import options_dict, validate
from monomod.compiler.stage import with_family_defaults
from monomod.passes.schedule import schedule
from monomod.plan import Plan, PartitionRecord
from monomod.runtime.execute import execute, prepare_run_dir

_COMPILED: dict[str, Plan] = {}  # ConvertOptions repr -> its plan, compiled once per session


def compile_plan(options, data):
    """Validate ``options`` and lay out their plan, with stand-in cuts (one module per block group)."""
    validate(options_dict(options))
    cuts = options.cuts or [f"blocks.{i}" for i in range(1, options.modules)]
    return schedule(with_family_defaults(options), data, PartitionRecord(cuts=tuple(cuts)))


def compiled(options: ConvertOptions) -> Plan:
    """``compile_options(options)``, compiled once per session: each caller gets its own deep copy to edit.
    (Compiling is deterministic in the options; a test that changes what compiling sees calls compile_options.)"""
    key = repr(options)
    if key not in _COMPILED:
        _COMPILED[key] = compile_options(options)
    return copy.deepcopy(_COMPILED[key])


def tiny_plan(student: str = "vit", modules: int = 2, meta: str = "trained", steps: int = 3, **kwargs) -> Plan:
    """A plan of a few steps per job; its teacher trains end to end unless ``teacher_training`` says otherwise, and
    its m2mKD jobs are separate unless ``m2mkd`` says otherwise (the tests of one m2mKD job run, edit or kill it)."""
    kwargs.setdefault("teacher_training", "end-to-end")
    kwargs.setdefault("m2mkd", "separate")
    options = ConvertOptions(teacher="vit_tiny", student=student, modules=modules, data="synthetic", img_size=32,
                             meta=meta, **kwargs)
    plan = compiled(options)
    for job in plan.jobs:  # a plan is data: shrink every budget to a few steps (a fused job's members' too)
        for config in (job.config, *job.config.get("members", ())):
            if "train" in config:
                config["train"].update(steps=steps, batch_size=16, warmup_steps=1)
    plan.rehash()
    return plan


def run_tiny(tmp_path: Path, **kwargs) -> Path:
    """Compile a tiny plan (``tiny_plan`` arguments) and run it for real under ``tmp_path/run``."""
    plan = tiny_plan(**kwargs)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    execute(plan, run_dir)
    return run_dir
