"""The runners of the job kinds that train or assemble (``monomod.plan.JOB_KINDS`` names each one): what a job of
that kind does with the run's context. Products are written atomically under ``jobs/<dir>`` (``RunDir``)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from monomod.errors import MonomodError
from monomod.plan import DISTILL_KINDS, Job
from monomod.runtime.config import TrainConfig, resolve_device, resolve_precision
from monomod.runtime.context import RunContext, assembly_mode
from monomod.runtime.evaluation import measure_hybrids
from monomod.runtime.losses import m2mkd_stage_loss, soft_cross_entropy
from monomod.runtime.train import seed_everything, train
from monomod.students.stitching import bridge


def _train_config(ctx: RunContext, job: Job) -> TrainConfig:
    cfg = dict(job.config["train"])
    cfg.setdefault("num_classes", ctx.distill_classes if job.kind in DISTILL_KINDS else ctx.settings["num_classes"])
    return TrainConfig.from_json(cfg)


def _classification(model: nn.Module, label_smoothing: float) -> Callable:
    """Cross-entropy on the model's logits, plus the model's auxiliary loss (MoE load balancing) when it has one."""

    def loss_fn(x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        loss = soft_cross_entropy(logits, y, label_smoothing)
        aux = model.aux_loss() if hasattr(model, "aux_loss") else None
        return (loss + aux if aux is not None else loss), logits

    return loss_fn


def _fit(ctx: RunContext, job: Job, model: nn.Module, loss_fn: Callable, cfg: TrainConfig,
         **train_options: Any) -> dict[str, Any]:
    """``model`` trained by ``train`` on the job's data (``train_options``: the loop's keyword options)."""
    from monomod.data import Augment

    augment = Augment(auto_augment=cfg.auto_augment, color_jitter=cfg.color_jitter, reprob=cfg.reprob)
    loader = ctx.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed, distill=job.kind in DISTILL_KINDS,
                        augment=augment, device=resolve_device(cfg.device))
    result = train(model, loss_fn, loader, cfg, job_dir=ctx.job_dir(job.name), label=job.name, **train_options)
    return {"train_steps": result.steps, "final_loss": result.final_loss, "train_acc": result.train_acc,
            "samples_per_second": result.samples_per_second}


def _train_classifier(ctx: RunContext, job: Job, model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """What the teacher, meta, fine-tune and baseline jobs share: ``model`` trained on the classification loss of
    its data, then saved as the job's product."""
    seed_everything(cfg.seed)
    info = _fit(ctx, job, model, _classification(model, cfg.label_smoothing), cfg)
    ctx.save_product(job.name, model)
    return info


def run_teacher(ctx: RunContext, job: Job) -> dict[str, Any]:
    """The teacher trained end to end, kept as given (``skip_training``), or, under Deep Incubation, its incubated
    modules assembled into one network and fine-tuned end to end (the FT phase)."""
    cfg = _train_config(ctx, job)
    seed_everything(cfg.seed)
    model = ctx.new_teacher()
    if job.config.get("from") == "incubate":
        _load_incubated(ctx, model, job.inputs)
    if job.config.get("skip_training"):
        ctx.save_product(job.name, model)
        return {}
    return _train_classifier(ctx, job, model, cfg)


def _load_incubated(ctx: RunContext, model: nn.Module, incubated: list[str]) -> None:
    """Load every incubated module's weights into the full teacher; each parameter must come from one of them."""
    covered: set[str] = set()
    for name in incubated:
        state = {k: v for k, v in ctx.product(name).items() if not k.startswith("_tensor_constant")}  # fx-made (Swin)
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise MonomodError(f"{name}'s weights do not fit the teacher ({', '.join(unexpected[:3])})",
                               "recompile the plan for this teacher (monomod convert ... --force)")
        covered.update(state)
    missing = [key for key, _ in model.named_parameters() if key not in covered]
    if missing:
        raise MonomodError(f"the incubated modules do not cover the teacher's {', '.join(missing[:3])}",
                           "report this as a bug: every teacher parameter belongs to one module")


def run_meta(ctx: RunContext, job: Job) -> dict[str, Any]:
    cfg = _train_config(ctx, job)
    ctx.partition()  # first, so that how the partition is found never shifts the meta model's random init
    seed_everything(cfg.seed)
    return _train_classifier(ctx, job, ctx.new_meta(), cfg)


def run_incubate(ctx: RunContext, job: Job) -> dict[str, Any]:
    """Deep Incubation's MT phase: teacher module i trained on the task inside the frozen meta model,
    ``meta[:i] -> T_i -> meta[i+1:]``, so that T_i learns to read and write the meta model's boundaries. Only T_i
    is updated."""
    from monomod.students.hybrid import hybrid

    i = job.config["module"]
    cfg = _train_config(ctx, job)
    device = resolve_device(cfg.device)
    meta = ctx.meta().to(device)
    seed_everything(cfg.seed)
    module = ctx.initial_teacher_module(i)
    pair = hybrid(meta, i, module)
    info = _fit(ctx, job, module, _classification(pair, cfg.label_smoothing), cfg)
    ctx.save_product(job.name, module)
    precision = resolve_precision(cfg.precision, device)
    return {**info, **measure_hybrids(ctx, i, {"teacher_hybrid": module.eval()}, precision=precision)}


def m2mkd_pair(ctx: RunContext, config: dict[str, Any], device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Module i's frozen teacher module (``target``) and its fresh stitched student stage in the family's m2mKD
    form (NAC: dense attention, fixed shared code), built from an m2mKD job's ``config``: the same calls in the
    same order wherever the stage is distilled (a separate job or a member of the fused one), so the same weights."""
    i = config["module"]
    teacher_module = ctx.teacher_module(i, config.get("target", "teacher")).to(device)
    student = ctx.new_student(ctx.settings["seed"], upcycle=config.get("upcycle", False),
                              num_classes=ctx.distill_classes)
    seed_everything(config["train"]["seed"])
    stitched = ctx.stitched(student, i, config["stitch"])
    stitched.distillation_mode(True)
    return teacher_module, stitched


def run_m2mkd(ctx: RunContext, job: Job) -> dict[str, Any]:
    """Distil student stage i: the teacher pair ``meta[:i] -> T_i -> meta[i+1:]`` against the student pair
    ``meta[:i] -> pre -> S_i -> post -> meta[i+1:]``. Only S_i and its stitches receive updates; the meta prefix
    and the teacher run without autograd; gradients flow back through the frozen meta suffix. T_i is the teacher's
    module i, or incubated module i (``target``)."""
    from monomod.students.hybrid import hybrid

    if job.config.get("fused"):  # a fused plan: the stage was trained by the fused job (monomod.runtime.fused)
        from monomod.runtime.fused import publish_member

        return publish_member(ctx, job)
    i, loss_cfg = job.config["module"], job.config["loss"]
    cfg = _train_config(ctx, job)
    device = resolve_device(cfg.device)  # the loop moves the trainable; the frozen context must follow it
    meta = ctx.meta().to(device)
    teacher_module, stitched = m2mkd_pair(ctx, job.config, device)
    teacher_pair, student_pair = hybrid(meta, i, teacher_module), hybrid(meta, i, stitched)
    last = i == len(meta.stages) - 1
    boundary = bool(loss_cfg.get("boundary_loss")) and not last

    def loss_fn(x: torch.Tensor, y: torch.Tensor):
        with torch.no_grad():
            context = teacher_pair.run_prefix(x)
            teacher_features = teacher_module(context)
            teacher_logits = teacher_pair.run_suffix(teacher_features)
            meta_features = meta.stages[i](context) if boundary else None
        student_features = stitched(context)
        student_logits = student_pair.run_suffix(student_features)
        loss = m2mkd_stage_loss(loss_cfg, y, (student_features, student_logits), (teacher_features, teacher_logits),
                                meta_features, cfg.label_smoothing, last)
        aux = stitched.aux_loss()
        return (loss + aux if aux is not None else loss), student_logits

    info = _fit(ctx, job, stitched, loss_fn, cfg)
    ctx.save_product(job.name, stitched)
    scores = measure_hybrids(ctx, i, {"teacher_hybrid": teacher_module, "student_hybrid": stitched.eval()},
                             precision=resolve_precision(cfg.precision, device))
    return {**info, **scores}


def run_assemble(ctx: RunContext, job: Job) -> dict[str, Any]:
    """Load every distilled stage into the full student, check each tensor landed, then drop the stitches or bridge
    the boundaries with them (``assemble``).

    A head distilled for other classes (``--distill-data`` with another class count) is left freshly initialised."""
    student = ctx.new_student(ctx.settings["seed"])
    stitched, reset = ctx.all_stitched(student), []
    for i, stage in enumerate(stitched):
        reset += _load_distilled(stage, ctx.product(f"m2mkd:{i}"), i)
    mode = assembly_mode(ctx.plan)
    student.stages = nn.ModuleList(bridge(stitched) if mode == "bridged" else [s.stage for s in stitched])
    ctx.save_product(job.name, student)
    return {"stages": len(stitched), "assemble": mode, "reinitialised": reset}


def _load_distilled(stitched: nn.Module, state: dict[str, torch.Tensor], i: int) -> list[str]:
    """Load stage i's m2mKD product into its stitched stage; the names of tensors left fresh (a head of another
    class count). Refuses, as a bug, a tensor that did not land."""
    own = stitched.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    stitched.load_state_dict(fits, strict=False)
    landed = stitched.state_dict()
    wrong = [k for k, v in fits.items() if not torch.equal(landed[k], v)] or sorted(set(own) - set(state))
    if wrong:
        raise MonomodError(f"stage {i}'s distilled weights did not land ({', '.join(wrong[:3])})", "report this as a bug")
    return [f"stage {i}: {k}" for k in state if k not in fits]


def run_finetune(ctx: RunContext, job: Job) -> dict[str, Any]:
    cfg = _train_config(ctx, job)
    student = ctx.assembled_student()
    student.load_state_dict(ctx.product("assemble"))
    return _train_classifier(ctx, job, student, cfg)


def run_baseline(ctx: RunContext, job: Job) -> dict[str, Any]:
    """The same student trained from scratch with the fine-tune budget: what m2mKD has to beat."""
    cfg = _train_config(ctx, job)
    student = ctx.new_student(ctx.settings["seed"], upcycle=job.config.get("upcycle", False))
    return _train_classifier(ctx, job, student, cfg)
