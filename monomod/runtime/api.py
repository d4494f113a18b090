"""The user-facing entry points of a run: compile options into a plan, and read a finished run back."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monomod.errors import MonomodError
from monomod.plan import Plan
from monomod.runtime.jobs import RunContext, is_done

def compile_options(options: Any, *, dry_run: bool = False, data_info: dict[str, int] | None = None,
                    notes: list[str] | None = None) -> Plan:
    """Resolve what the options leave open (image size, data facts, student patch size) and compile the plan.

    ``dry_run=True`` tolerates missing ``imagefolder:`` folders: the data facts (``num_classes``, ``train_size``)
    then come from ``data_info`` (recipes declare them) and a line saying so is appended to ``notes``.
    """
    from monomod.frontend import load_model
    from monomod.passes.plan import PRESET_BUDGETS, DataInfo, compile_plan, validate_options
    from monomod.runtime import checks
    from monomod.runtime.execute import check_train_configs

    checks.check_scalars(options)
    validate_options(options)
    probe = load_model(options.teacher, device="meta", img_size=options.img_size or PRESET_BUDGETS[options.preset]["img_size"],
                       in_chans=options.in_chans)
    cfg = getattr(probe, "pretrained_cfg", None) or {}
    img_size = options.img_size or PRESET_BUDGETS[options.preset]["img_size"] or int(cfg.get("input_size", (3, 224, 224))[-1])
    in_chans = options.in_chans or int(cfg.get("input_size", (3,))[0])
    checks.check_teacher_takes(probe, options.teacher, options.modules, img_size, in_chans)  # bounds K first
    if options.weights:
        checks.check_weights(probe, options.weights)
    checks.check_image_folders(options.data)
    if options.distill_data:
        checks.check_image_folders(options.distill_data)
    notes = notes if notes is not None else []
    facts = _data_facts(options.data, options.ood, img_size, in_chans, dry_run, data_info, notes)
    distill = None
    if options.distill_data and options.distill_data != options.data:
        distill = _data_facts(options.distill_data, None, img_size, in_chans, dry_run, None, notes)
    overrides = dict(options.student_overrides)
    patch = getattr(getattr(probe, "patch_embed", None), "patch_size", None)
    if options.student in ("moe", "vit") and patch and "patch_size" not in overrides:
        overrides["patch_size"] = int(patch[0] if isinstance(patch, (tuple, list)) else patch)  # token grids line up
    options = replace(options, img_size=img_size, in_chans=in_chans, student_overrides=overrides)
    checks.check_student_builds(options, facts[0], distill[0] if distill else facts[0])
    if options.upcycle:
        _check_upcycling(options, probe, facts[0])
    plan = compile_plan(options, DataInfo(num_classes=facts[0], in_chans=in_chans, train_size=facts[1],
                                          distill_num_classes=distill[0] if distill else None,
                                          distill_train_size=distill[1] if distill else None))
    set_checkpointing(plan, options.checkpoint_every, options.checkpoint_minutes)
    check_train_configs(plan)
    return plan


def set_checkpointing(plan: Plan, every: int | None, minutes: float | None) -> bool:
    """Write how often each training job checkpoints into its config (None: leave as is). These keys stay out of
    job hashes (``monomod.plan.UNHASHED_TRAIN_KEYS``), so changing them never re-runs a finished job. Returns
    whether anything changed."""
    from monomod.runtime.checks import check_checkpointing

    check_checkpointing(0 if every is None else every, minutes)
    changed = False
    for job in plan.jobs:
        train = job.config.get("train")
        if not isinstance(train, dict):
            continue
        for key, value in (("checkpoint_every", every), ("checkpoint_minutes", minutes)):
            if value is not None and train.get(key) != value:
                train[key], changed = value, True
    plan.rehash()
    return changed


def _check_upcycling(options: Any, teacher: nn.Module, num_classes: int) -> None:
    """Fail before any training when --upcycle would copy nothing: experts must have the teacher MLPs' shapes."""
    from monomod.students import build_student
    from monomod.students.moe import upcycle_experts

    with torch.device("meta"):
        student = build_student("moe", modules=options.modules, num_classes=num_classes, img_size=options.img_size,
                                in_chans=options.in_chans, preset=options.student_preset, **options.student_overrides)
    try:
        copied = upcycle_experts(student, teacher)
    except ValueError as e:
        raise MonomodError(f"--upcycle: {e}", "drop --upcycle for this teacher") from None
    if not copied:
        width = getattr(teacher, "embed_dim", "?")
        raise MonomodError(f"--upcycle found no teacher MLP with the experts' shapes (student width "
                           f"{student.stages[0].interface.width_out}, teacher width {width})",
                           f"match the teacher: --set student_overrides.embed_dim={width} (and its mlp_ratio)")


def _data_facts(data: str, ood: str | None, img_size: int, in_chans: int, dry_run: bool,
                data_info: dict[str, int] | None, notes: list[str]) -> tuple[int, int]:
    """(num_classes, train_size) of the data set, read from the data unless a dry run lacks the folders."""
    from monomod.data import load_data

    def missing(spec: str | None) -> str | None:
        if isinstance(spec, str) and spec.startswith("imagefolder:") and not Path(spec.split(":", 1)[1]).exists():
            return spec.split(":", 1)[1]
        return None

    if dry_run and missing(data):
        if not data_info or not {"num_classes", "train_size"} <= set(data_info):
            raise MonomodError(f"data directory {missing(data)} does not exist",
                               "create it, or give data_info (num_classes, train_size) to dry-run without it")
        notes.append(f"data folder {missing(data)} is missing: data loading skipped; the plan uses the "
                     f"declared {data_info['num_classes']} classes and {data_info['train_size']} training images")
        return int(data_info["num_classes"]), int(data_info["train_size"])
    if dry_run and missing(ood):
        notes.append(f"OOD folder {missing(ood)} is missing: skipped for this dry run (the real run needs it)")
        ood = None
    bundle = load_data(data, img_size=img_size, in_chans=in_chans, ood=ood)
    return bundle.num_classes, len(bundle.train)


def convert(teacher: str, *, to: str, modules: int, out: str | Path, force: bool = False,
            reuse: list[str | Path] | None = None, **options: Any) -> "Run":
    """Compile and execute a whole m2mKD conversion, like ``monomod convert``; returns the finished Run.

    ``options`` are the fields of ``monomod.passes.plan.ConvertOptions`` (data, preset, meta, alpha,
    checkpoint_every, checkpoint_minutes, ...); ``reuse`` lists earlier RUN_DIRs whose finished jobs with the same
    hash are copied instead of run again. ``teacher`` is the caller's own choice, so a factory runs without asking.
    """
    from monomod.passes.plan import ConvertOptions
    from monomod.runtime.execute import check_reuse_sources, execute, prepare_run_dir, reuse_finished
    from monomod.runtime.lock import run_dir_lock

    check_reuse_sources(list(reuse or []))
    converted = ConvertOptions(teacher=teacher, student=to, modules=modules, **options)
    plan = compile_options(converted)
    with run_dir_lock(out):
        run_dir = prepare_run_dir(plan, out, force=force)
        if reuse:
            reuse_finished(plan, run_dir, list(reuse))
        execute(plan, run_dir, loader_workers=converted.loader_workers)
    return load_run(run_dir)


def run(run_dir: str | Path, *, trust_code: bool = False, checkpoint_every: int | None = None,
        checkpoint_minutes: float | None = None, **execute_options: Any) -> "Run":
    """Execute (or resume) RUN_DIR's plan, like ``monomod run``. A teacher the plan file names as Python code
    (``pkg.module:factory``) runs only with ``trust_code=True``."""
    from monomod.frontend import check_trusted
    from monomod.runtime.execute import execute
    from monomod.runtime.lock import run_dir_lock

    path = Path(run_dir)
    plan = Plan.load(path)
    check_trusted(plan.settings, str(path / "plan.yaml"), trust_code)
    with run_dir_lock(path):
        if set_checkpointing(plan, checkpoint_every, checkpoint_minutes):
            plan.save(path)  # workers read the plan from RUN_DIR; the hashes stay the same
        execute(plan, path, **execute_options)
    return Run(path=path, plan=plan, trust_code=trust_code)


class DeployedStudent(nn.Module):
    """A trained student that takes raw images in [0, 1], shaped ``(B, *input_size)``, and normalises them itself."""

    def __init__(self, student: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], input_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.student = student
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student((images - self.mean) / self.std)


@dataclass
class Run:
    """A RUN_DIR: its plan, which jobs are finished, and the report once there is one."""

    path: Path
    plan: Plan
    trust_code: bool = False  # whether a teacher the plan names as code may be built (see frontend.check_trusted)

    @property
    def report(self) -> dict[str, Any] | None:
        path = self.path / "report.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def status(self) -> dict[str, bool]:
        return {job.name: is_done(self.path, job) for job in self.plan.jobs}

    def student(self, which: str = "finetune") -> DeployedStudent:
        """The fine-tuned student (``which="assemble"`` for the distilled one before fine-tuning, ``"baseline"``)."""
        from monomod.frontend import check_trusted
        from monomod.runtime.jobs import done_problem

        if which != "baseline" and self.plan.job("assemble").config.get("keep_stitches"):
            check_trusted(self.plan.settings, str(self.path / "plan.yaml"), self.trust_code)  # stitches trace it
        problem = done_problem(self.path, self.plan.job(which))
        if problem is not None:
            raise MonomodError(f"job {which!r} of {str(self.path)!r}: {problem}", f"run it first: monomod run {self.path}")
        ctx = RunContext(run_dir=self.path, plan=self.plan)
        model = ctx.new_student(self.plan.settings["seed"]) if which == "baseline" else ctx.assembled_student()
        model.load_state_dict(ctx.product(which))
        s = self.plan.settings
        data = ctx.data
        return DeployedStudent(model, data.mean, data.std, (s["in_chans"], s["img_size"], s["img_size"])).eval()


def load_run(run_dir: str | Path, *, trust_code: bool = False) -> Run:
    path = Path(run_dir)
    return Run(path=path, plan=Plan.load(path), trust_code=trust_code)


def load_student(run_dir: str | Path, *, trust_code: bool = False) -> DeployedStudent:
    """The run's fine-tuned student, ready for raw [0, 1] images of shape ``(B, *student.input_size)``."""
    return load_run(run_dir, trust_code=trust_code).student()
