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
from monomod.compiler.options import TOLERANCE, options_dict, validate
from monomod.data import DataSpec, in_memory_bytes
from monomod.errors import MonomodError, shorten
from monomod.ir import Partition, TracedModel
from monomod.plan import PartitionRecord, Plan
from monomod.students import student_family


def compile_options(options: Any, *, dry_run: bool = False, data_info: dict[str, int] | None = None,
                    notes: list[str] | None = None) -> Plan:
    """Validate ``options`` (a ``ConvertOptions``), resolve what they leave open (image size, data facts, student
    patch size), cut the teacher and lay out the plan. One pass over the teacher: it is loaded once (on the meta
    device), traced once with its head sized for the distillation data, and cut once (one search, or ``--cuts``).

    ``dry_run=True`` tolerates missing ``imagefolder:`` folders: the data facts (``num_classes``, ``train_size``)
    then come from ``data_info`` (recipes declare them) and a line saying so is appended to ``notes``.
    Precision, threads and device stay as asked (``auto`` included): each job resolves them where it runs.
    """
    from monomod.data import parse_data_spec
    from monomod.passes.schedule import DataInfo, schedule
    from monomod.students import student_revision
    from monomod.runtime.execute import check_train_configs

    from monomod.runtime.device_folder import check_device_augment
    from monomod.runtime.fused import resolve_m2mkd

    validate(options_dict(options))
    data = parse_data_spec(options.data)  # parsed once: the DataSpec travels from here on
    distill_data = parse_data_spec(options.distill_data) if options.distill_data else None
    in_memory = all(spec.kind != "imagefolder" for spec in (data, distill_data) if spec)
    options = replace(options, m2mkd=resolve_m2mkd(options.m2mkd))  # it shapes the plan, so decided here
    notes = notes if notes is not None else []
    teacher, img_size, in_chans = _load_teacher(options)
    if options.weights:
        checks.check_weights(teacher, options.weights)
    facts, distill = _all_data_facts(options, data, distill_data, min(img_size, _FACTS_SIZE), in_chans, dry_run,
                                     data_info, notes)
    teacher = _size_head(teacher, options, distill[0] if distill else facts[0], img_size, in_chans)
    traced = checks.check_teacher_takes(teacher, options.teacher, options.modules, img_size, in_chans)
    memory = _teacher_memory(options, traced, data, distill_data, img_size, in_chans)
    _check_memory(memory, dry_run, notes)  # no image was drawn at img_size yet: a 100000-pixel set never is
    record, teacher_cut = cut_teacher(traced, options.modules, cuts=options.cuts, cost=options.cost,
                                      tolerance=options.tolerance, single_tensor=options.meta == "trained")
    if options.meta == "trained":
        checks.check_meta_builds(teacher_cut, options.meta_width, record.cuts)
    options = replace(with_family_defaults(options), img_size=img_size, in_chans=in_chans,
                      student_overrides=_student_overrides(options, teacher))
    student = checks.check_student_builds(options, facts[0], teacher_cut)
    if student is not None:
        params = sum(p.numel() for p in student.parameters())
        _check_memory({**memory, "student parameters": 16 * params}, dry_run, notes)
    if options.upcycle:
        _check_upcycling(options, teacher, facts[0])
    plan = schedule(options, DataInfo(num_classes=facts[0], in_chans=in_chans, train_size=facts[1],
                                      distill_num_classes=distill[0] if distill else None,
                                      distill_train_size=distill[1] if distill else None), record,
                    student_revision=student_revision(options.student))
    set_checkpointing(plan, options.checkpoint_every, options.checkpoint_minutes)
    check_train_configs(plan)
    if options.input_path in ("device", "cached") and not in_memory:  # image folders augmented on the device
        check_device_augment(train for job in plan.jobs for train in job.train_configs())
    return plan


def _load_teacher(options: Any) -> tuple[nn.Module, int, int]:
    """The teacher on the meta device (the one load of a compile), and the image size and channels it is run at:
    the options', else the preset's, else its pretrained config's."""
    from monomod.frontend import load_model
    from monomod.passes.schedule import PRESET_BUDGETS

    preset_size = PRESET_BUDGETS[options.preset]["img_size"]
    teacher = load_model(options.teacher, device="meta", img_size=options.img_size or preset_size,
                         in_chans=options.in_chans)
    cfg = getattr(teacher, "pretrained_cfg", None) or {}
    img_size = options.img_size or preset_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    in_chans = options.in_chans or int(cfg.get("input_size", (3,))[0])
    return teacher, img_size, in_chans


def _size_head(teacher: nn.Module, options: Any, num_classes: int, img_size: int, in_chans: int) -> nn.Module:
    """The teacher's head sized for the distillation data, as the jobs build it (a 1000-class head's FLOPs would
    move the balanced cuts): timm's ``reset_classifier`` on the meta device, in place."""
    if getattr(teacher, "num_classes", None) == num_classes:
        return teacher
    if not hasattr(teacher, "reset_classifier"):  # a factory's model: built again with the head it needs
        from monomod.frontend import load_model

        return load_model(options.teacher, device="meta", img_size=img_size, in_chans=in_chans,
                          num_classes=num_classes)
    with torch.device("meta"):
        teacher.reset_classifier(num_classes)
    return teacher


def with_family_defaults(options: Any) -> Any:
    """``options`` with what the student family decides when they leave it open: its stitch layers and the weight
    of its boundary loss."""
    family = student_family(options.student)
    boundary = family.boundary_loss if options.boundary_loss is None else options.boundary_loss
    return replace(options, stitch=options.stitch or family.stitch, boundary_loss=boundary)


def _student_overrides(options: Any, teacher: nn.Module) -> dict[str, Any]:
    """The student's overrides, with the teacher's patch size for a ViT-like student (token grids line up)."""
    overrides = dict(options.student_overrides)
    patch = getattr(getattr(teacher, "patch_embed", None), "patch_size", None)
    if student_family(options.student).takes_patch_size and patch and "patch_size" not in overrides:
        overrides["patch_size"] = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    return overrides


# The data facts (classes, training images) do not depend on the image size: they are read at a small one, so that
# the memory estimate refuses a huge --img-size before any image is drawn at it.
_FACTS_SIZE = 32
_MEMORY_FIXES = {
    "teacher parameters": "lower --in-chans or --img-size (the teacher's size follows them), or pick a smaller teacher",
    "activations": "lower --img-size or the batch size (e.g. --set budgets.m2mkd.batch_size=16, for each job kind)",
    "data": "lower --img-size or --in-chans: the in-memory data set is drawn at that size",
    "student parameters": "lower the student's size: student_overrides (embed_dim, depth, ...), --in-chans, "
                          "--img-size or --student-preset",
}
_ANY_MACHINE = 1 << 40  # 1 TiB on one device: refused even in a dry run, which may plan for a bigger machine


def _teacher_memory(options: Any, traced: TracedModel, data: DataSpec, distill_data: DataSpec | None,
                    img_size: int, in_chans: int) -> dict[str, int]:
    """The teacher's terms of the memory estimate (with the in-memory data), at the plan's largest training
    batch."""
    from monomod.passes.schedule import PRESET_BUDGETS

    batch = max([PRESET_BUDGETS[options.preset]["batch_size"]]
                + [b["batch_size"] for b in (options.budgets or {}).values() if "batch_size" in b])
    params, per_sample = checks.traced_bytes(traced)
    terms = checks.training_bytes(params, per_sample, batch)
    data_bytes = max(in_memory_bytes(spec, img_size, in_chans) for spec in (data, distill_data))
    return {"teacher parameters": terms["parameters"], "activations": terms["activations"], "data": data_bytes}


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


def cut_teacher(traced: TracedModel, modules: int, *, cuts: list[str] | None = None, cost: str = "flops",
                tolerance: float = TOLERANCE, single_tensor: bool = False) -> tuple[PartitionRecord, Partition]:
    """Cut the teacher once (the search, or ``cuts`` as given) and name the cuts so that the partition pass's manual
    path replays them: the record the plan keeps, and the partition the jobs will replay (checked here by replaying
    the names). A bad cut fails here in one line."""
    from monomod.passes.partition import partition

    if cuts:
        found = partition(traced, modules, cost=cost, cuts=cuts)
        return PartitionRecord(tuple(cuts), cost, tolerance, round(found.balance, 4)), found
    found = partition(traced, modules, cost=cost, tolerance=tolerance, single_tensor=single_tensor)
    names = [_cut_name(traced, spec.nodes) for spec in found.modules[1:]]
    replayed = partition(traced, modules, cost=cost, cuts=names)
    return PartitionRecord(tuple(names), cost, tolerance, round(replayed.balance, 4)), replayed


def record_partition(traced: TracedModel, modules: int, *, cuts: list[str] | None = None, cost: str = "flops",
                     tolerance: float = TOLERANCE) -> PartitionRecord:
    """The record ``cut_teacher`` keeps in the plan."""
    return cut_teacher(traced, modules, cuts=cuts, cost=cost, tolerance=tolerance)[0]


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


def _all_data_facts(options: Any, data: DataSpec, distill_data: DataSpec | None, img_size: int, in_chans: int,
                    dry_run: bool, data_info: dict[str, int] | None,
                    notes: list[str]) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(num_classes, train_size) of the data and, when it differs, of the distillation data."""
    checks.check_image_folders(data)
    if distill_data is not None:
        checks.check_image_folders(distill_data)
    facts = _data_facts(data, options.ood, img_size, in_chans, dry_run, data_info, notes)
    distill = None
    if distill_data is not None and distill_data != data:
        distill = _data_facts(distill_data, None, img_size, in_chans, dry_run, None, notes)
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


def _data_facts(data: DataSpec, ood: str | None, img_size: int, in_chans: int, dry_run: bool,
                data_info: dict[str, int] | None, notes: list[str]) -> tuple[int, int]:
    """(num_classes, train_size) of the data set, read from the data unless a dry run lacks the folders."""
    from monomod.data import load_data

    def missing(spec: DataSpec | str | None) -> str | None:
        path = spec.path if isinstance(spec, DataSpec) else (spec[len("imagefolder:"):] if isinstance(spec, str)
                                                             and spec.startswith("imagefolder:") else None)
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
    _check_declared(data_info, facts, data.text)
    return facts


def _check_declared(data_info: dict[str, int] | None, facts: tuple[int, int], data: str) -> None:
    """Declared data facts (a recipe's or ``--set data_info.*``) that the data read contradicts are refused: a
    setting is honoured or refused, never silently ignored."""
    for key, found in zip(("num_classes", "train_size"), facts):
        declared = (data_info or {}).get(key)
        if declared is not None and declared != found:
            raise MonomodError(f"data_info.{key} is {declared}, but {shorten(str(data))} has {found}",
                               f"set data_info.{key}={found}, or drop data_info (it only stands in for missing data)")
