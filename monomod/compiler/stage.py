"""The compile stage: options -> load teacher (meta device) -> trace -> partition -> student -> schedule -> Plan.

The only place that runs passes for a conversion. Everything a conversion can be refused for is refused here, in
a dry run too, before any job runs. The partition found here (or given with ``--cuts``) is recorded in the plan,
so the jobs replay exactly these cuts.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monomod.compiler import checks
from monomod.compiler.options import options_dict, validate
from monomod.errors import MonomodError, shorten
from monomod.ir import Partition, TracedModel
from monomod.plan import PartitionRecord, Plan


def compile_options(options: Any, *, dry_run: bool = False, data_info: dict[str, int] | None = None,
                    notes: list[str] | None = None) -> Plan:
    """Validate ``options`` (a ``ConvertOptions``), resolve what they leave open (image size, data facts, student
    patch size), cut the teacher and lay out the plan.

    ``dry_run=True`` tolerates missing ``imagefolder:`` folders: the data facts (``num_classes``, ``train_size``)
    then come from ``data_info`` (recipes declare them) and a line saying so is appended to ``notes``.
    """
    from monomod.frontend import load_model
    from monomod.passes.schedule import PRESET_BUDGETS, DataInfo, schedule
    from monomod.students import student_revision
    from monomod.runtime.execute import check_train_configs
    from monomod.runtime.executors import cpu_count
    from monomod.runtime.config import resolve_precision
    from monomod.runtime.device_data import resolve_input_path
    from monomod.runtime.fused import resolve_m2mkd

    validate(options_dict(options))
    options = replace(options, threads=options.threads or cpu_count(), precision=resolve_precision(options.precision),
                      m2mkd=resolve_m2mkd(options.m2mkd), input_path=resolve_input_path(options.input_path, options.data, options.distill_data))
    probe = load_model(options.teacher, device="meta", img_size=options.img_size or PRESET_BUDGETS[options.preset]["img_size"],
                       in_chans=options.in_chans)
    cfg = getattr(probe, "pretrained_cfg", None) or {}
    img_size = options.img_size or PRESET_BUDGETS[options.preset]["img_size"] or int(cfg.get("input_size", (3, 224, 224))[-1])
    in_chans = options.in_chans or int(cfg.get("input_size", (3,))[0])
    traced = checks.check_teacher_takes(probe, options.teacher, options.modules, img_size, in_chans)  # bounds K first
    notes = notes if notes is not None else []
    memory = _teacher_memory(options, traced, img_size, in_chans)
    _check_memory(memory, dry_run, notes)  # before the data is read: a 100000-pixel synthetic set is never drawn
    if options.cuts:  # a bad --cuts fails here, before the data is read
        record_partition(traced, options.modules, cuts=options.cuts, cost=options.cost, tolerance=options.tolerance)
    if options.weights:
        checks.check_weights(probe, options.weights)
    facts, distill = _all_data_facts(options, img_size, in_chans, dry_run, data_info, notes)
    record, teacher_cut = _partition_for_jobs(options, img_size, in_chans, distill[0] if distill else facts[0])
    overrides = dict(options.student_overrides)
    patch = getattr(getattr(probe, "patch_embed", None), "patch_size", None)
    if options.student in ("moe", "vit") and patch and "patch_size" not in overrides:
        overrides["patch_size"] = int(patch[0] if isinstance(patch, (tuple, list)) else patch)  # token grids line up
    options = replace(options, img_size=img_size, in_chans=in_chans, student_overrides=overrides)
    student = checks.check_student_builds(options, facts[0], teacher_cut)
    if student is not None:
        params = sum(p.numel() for p in student.parameters())
        _check_memory({**memory, "student parameters": 16 * params}, dry_run, notes)
    if options.upcycle:
        _check_upcycling(options, probe, facts[0])
    plan = schedule(options, DataInfo(num_classes=facts[0], in_chans=in_chans, train_size=facts[1],
                                      distill_num_classes=distill[0] if distill else None,
                                      distill_train_size=distill[1] if distill else None), record,
                    student_revision=student_revision(options.student))
    set_checkpointing(plan, options.checkpoint_every, options.checkpoint_minutes)
    check_train_configs(plan)
    return plan


_MEMORY_FIXES = {
    "teacher parameters": "lower --in-chans or --img-size (the teacher's size follows them), or pick a smaller teacher",
    "activations": "lower --img-size or the batch size (e.g. --set budgets.m2mkd.batch_size=16, for each job kind)",
    "data": "lower --img-size or --in-chans: the in-memory data set is drawn at that size",
    "student parameters": "lower the student's size: student_overrides (embed_dim, depth, ...), --in-chans, "
                          "--img-size or --student-preset",
}
_ANY_MACHINE = 1 << 40  # 1 TiB on one device: refused even in a dry run, which may plan for a bigger machine


def _teacher_memory(options: Any, traced: TracedModel, img_size: int, in_chans: int) -> dict[str, int]:
    """The teacher's terms of the memory estimate (with the in-memory data), at the plan's largest training
    batch."""
    from monomod.data import in_memory_bytes
    from monomod.passes.schedule import PRESET_BUDGETS

    batch = max([PRESET_BUDGETS[options.preset]["batch_size"]]
                + [b["batch_size"] for b in (options.budgets or {}).values() if "batch_size" in b])
    params, per_sample = checks.traced_bytes(traced)
    terms = checks.training_bytes(params, per_sample, batch)
    data = max(in_memory_bytes(spec, img_size, in_chans)
               for spec in (options.data, options.distill_data))
    return {"teacher parameters": terms["parameters"], "activations": terms["activations"], "data": data}


def _check_memory(terms: dict[str, int], dry_run: bool, notes: list[str]) -> None:
    """``checks.check_memory`` against this machine; a dry run (which may plan for a larger machine) only notes
    the shortfall, unless no single device could hold it."""
    try:
        checks.check_memory(terms, _MEMORY_FIXES)
    except MonomodError as e:
        if not dry_run:
            raise
        checks.check_memory(terms, _MEMORY_FIXES, limit=max(checks.memory_limit(), _ANY_MACHINE),
                            where="any single device")
        notes.append(f"{e.problem}: a run on this machine would be refused")


def _partition_for_jobs(options: Any, img_size: int, in_chans: int,
                        num_classes: int) -> tuple[PartitionRecord, Partition]:
    """The partition the jobs replay (its record, and the partition itself for the compile-time checks), found on
    the teacher as they build it: its head sized for the distillation data (a 1000-class head's FLOPs would move
    the balanced cuts). A trained meta model must build on it."""
    from monomod.frontend import example_input, load_model
    from monomod.passes.partition import partition
    from monomod.passes.trace import trace

    teacher = load_model(options.teacher, device="meta", img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    traced = trace(teacher, example_input(in_chans, img_size, device="meta"), name=options.teacher)
    record = record_partition(traced, options.modules, cuts=options.cuts, cost=options.cost,
                              tolerance=options.tolerance)
    cut = partition(traced, len(record.cuts) + 1, cost=record.cost, cuts=record.cuts)
    if options.meta == "trained":
        checks.check_meta_builds(cut, options.meta_width, record.cuts)
    return record, cut


def record_partition(traced: TracedModel, modules: int, *, cuts: list[str] | None = None, cost: str = "flops",
                     tolerance: float = 0.25) -> PartitionRecord:
    """Cut the teacher (the minimum-cut search, or ``cuts`` as given) and name the cuts so that the partition
    pass's manual path replays them: the record the plan keeps. A bad cut fails here in one line."""
    from monomod.passes.partition import partition

    found = partition(traced, None if cuts else modules, cost=cost, cuts=cuts, tolerance=tolerance)
    names = list(cuts) if cuts else [_cut_name(traced, spec.nodes) for spec in found.modules[1:]]
    replayed = partition(traced, modules, cost=cost, cuts=names)
    return PartitionRecord(cuts=tuple(names), cost=cost, tolerance=tolerance, balance=round(replayed.balance, 4))


def _cut_name(traced: TracedModel, nodes: tuple[str, ...]) -> str:
    """The shortest name the manual path resolves to the first compute node of a module: its unit (``blocks.3``)
    where that node begins the unit, else a deeper module path, else the fx node name."""
    compute = [n for n, info in traced.nodes.items() if info.op.startswith("call_") and not info.rematerializable]
    computed = set(compute)
    first = next(n for n in nodes if n in computed)
    path = traced.nodes[first].module or ""
    parts = path.split(".") if path else []
    for depth in range(1, len(parts) + 1):
        candidate = ".".join(parts[:depth])
        hit = next(n for n in compute if n == candidate or traced.nodes[n].module == candidate
                   or traced.nodes[n].module.startswith(candidate + "."))
        if hit == first:
            return candidate
    return first


def set_checkpointing(plan: Plan, every: int | None, minutes: float | None) -> bool:
    """Write how often each training job checkpoints into its config (None: leave as is). These keys stay out of
    job hashes (``monomod.plan.UNHASHED_TRAIN_KEYS``), so changing them never re-runs a finished job. Returns
    whether anything changed."""
    checks.check_checkpointing(0 if every is None else every, minutes)
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


def _all_data_facts(options: Any, img_size: int, in_chans: int, dry_run: bool, data_info: dict[str, int] | None,
                    notes: list[str]) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(num_classes, train_size) of the data and, when it differs, of the distillation data."""
    checks.check_image_folders(options.data)
    if options.distill_data:
        checks.check_image_folders(options.distill_data)
    facts = _data_facts(options.data, options.ood, img_size, in_chans, dry_run, data_info, notes)
    distill = None
    if options.distill_data and options.distill_data != options.data:
        distill = _data_facts(options.distill_data, None, img_size, in_chans, dry_run, None, notes)
    return facts, distill


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
    from monomod.data import load_data, parse_data_spec

    def missing(spec: str | None) -> str | None:
        if not (isinstance(spec, str) and spec.startswith("imagefolder:")):
            return None
        path = parse_data_spec(spec).path if spec != "imagefolder:" else None
        return path if path and not Path(path).exists() else None

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
    facts = bundle.num_classes, len(bundle.train)
    _check_declared(data_info, facts, data)
    return facts


def _check_declared(data_info: dict[str, int] | None, facts: tuple[int, int], data: str) -> None:
    """Declared data facts (a recipe's or ``--set data_info.*``) that the data read contradicts are refused: a
    setting is honoured or refused, never silently ignored."""
    for key, found in zip(("num_classes", "train_size"), facts):
        declared = (data_info or {}).get(key)
        if declared is not None and declared != found:
            raise MonomodError(f"data_info.{key} is {declared}, but {shorten(str(data))} has {found}",
                               f"set data_info.{key}={found}, or drop data_info (it only stands in for missing data)")
