"""What each kind of job does. Every job reads only the plan and its inputs' outputs under RUN_DIR, so any
executor can run it anywhere RUN_DIR is reachable.

Products are ``jobs/<dir>/model.safetensors`` (written atomically); ``jobs/<dir>/checkpoint`` is the training
loop's resume state and ``jobs/<dir>/metrics.jsonl`` its log.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from monomod.errors import MonomodError
from monomod.ir import Partition
from monomod.plan import Job, Plan
from monomod.runtime.checkpoint import atomic_save_tensors, atomic_write_json
from monomod.runtime.distributed import barrier, is_writer, world_size
from monomod.runtime.losses import m2mkd_loss
from monomod.runtime.train import TrainConfig, evaluate, resolve_device, seed_everything, soft_cross_entropy, train
from monomod.students.base import StagedModel

MODEL_FILE = "model.safetensors"
DONE_FILE = "done.json"


@dataclass
class RunContext:
    """Lazily built, shared pieces of a run: data, teacher, partition, meta model, students."""

    run_dir: Path
    plan: Plan
    loader_workers: int | None = None  # a run-time setting (not in the plan): None = monomod.data.default_workers
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        return self.plan.settings

    def job_dir(self, name: str) -> Path:
        return self.run_dir / "jobs" / name.replace(":", "-")

    @cached_property
    def data(self):
        """The run's data; image folders take the teacher's normalisation, interpolation and crop (its timm
        pretrained config, read from a weightless copy), whether or not the weights are pretrained."""
        from timm.data import resolve_data_config

        from monomod.data import load_data
        from monomod.frontend import load_model

        s = self.settings
        config = None
        if str(s["data"]).startswith("imagefolder:") or str(s["ood"]).startswith("imagefolder:"):
            probe = load_model(s["teacher"], device="meta", img_size=s["img_size"], in_chans=s["in_chans"],
                               **s.get("teacher_kwargs", {}))
            config = resolve_data_config({}, model=probe)
        return load_data(s["data"], img_size=s["img_size"], in_chans=s["in_chans"], ood=s["ood"], data_config=config)

    def loader(self, split: str, batch_size: int, *, shuffle: bool, seed: int = 0,
               augment: Any = None) -> Callable[[int], Any]:
        """``make_loader(epoch)`` over ``split``; ``augment`` (a ``monomod.data.Augment``) applies to ``train``."""
        from monomod.data import make_loader

        dataset = self.data.train_with(augment) if split == "train" else getattr(self.data, split)
        return lambda epoch: make_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                         drop_last=shuffle and len(dataset) > batch_size,
                                         num_workers=self.loader_workers)

    # ----------------------------------------------------------------------------------------- teacher side

    def new_teacher(self) -> nn.Module:
        """The teacher as specified: timm init, pretrained weights or a local file, with this data's classifier."""
        from monomod.frontend import load_model, load_weights

        s = self.settings
        model = load_model(s["teacher"], pretrained=s["pretrained"], img_size=s["img_size"], in_chans=s["in_chans"],
                           num_classes=s["num_classes"], **s.get("teacher_kwargs", {}))
        if s.get("weights"):
            load_weights(model, s["weights"], allow_new_classifier=True)
        return model

    def teacher(self) -> nn.Module:
        """The adapted teacher (output of the ``teacher`` job), frozen."""
        if "teacher" not in self._cache:
            model = self.new_teacher()
            model.load_state_dict(self.product("teacher"))
            self._cache["teacher"] = _frozen(model)
        return self._cache["teacher"]

    def partition(self, device: str = "meta") -> Partition:
        """The teacher's partition. Traced on the meta device by default: shapes and costs need no weights."""
        key = f"partition-{device}"
        if key not in self._cache:
            from monomod.frontend import load_model
            from monomod.passes.partition import partition
            from monomod.passes.trace import trace

            s = self.settings
            if device == "meta":
                model = load_model(s["teacher"], device="meta", img_size=s["img_size"], in_chans=s["in_chans"],
                                   num_classes=s["num_classes"], **s.get("teacher_kwargs", {}))
            else:
                model = self.teacher()
            example = torch.zeros(1, s["in_chans"], s["img_size"], s["img_size"], device=device)
            self._cache[key] = partition(trace(model, example, name=s["teacher"]), s["modules"])
        return self._cache[key]

    def teacher_module(self, i: int) -> nn.Module:
        """Teacher module i with only its own weights read from the teacher's file: an m2mKD job never holds the
        whole teacher (the reference code builds the full model to use one stage). Models with non-persistent
        buffers (computed at init, absent from the file) are built in full instead."""
        from safetensors import safe_open

        from monomod.passes.extract import extract

        meta_part = self.partition("meta")
        if any(True for m in meta_part.traced.model.modules() for name in m._non_persistent_buffers_set):
            return _frozen(extract(self.partition("cpu"))[i])
        module = extract(meta_part)[i].to_empty(device="cpu")
        with safe_open(str(self.job_dir("teacher") / MODEL_FILE), framework="pt") as f:
            module.load_state_dict({key: f.get_tensor(key) for key in module.state_dict()})
        return _frozen(module)

    def new_meta(self) -> StagedModel:
        from monomod.students.meta import build_meta

        job = self.plan.job("meta")
        return build_meta(self.partition(), job.config.get("width"))

    def meta(self) -> StagedModel:
        """The context every m2mKD pair runs in: the trained meta model, or the teacher's own modules."""
        if "meta" not in self._cache:
            from monomod.students.meta import build_meta

            if self.settings["meta"] == "teacher":
                meta = build_meta(self.partition("cpu"), kind="teacher")
            else:
                meta = self.new_meta()
                meta.load_state_dict(self.product("meta"))
            self._cache["meta"] = _frozen(meta)
        return self._cache["meta"]

    # ----------------------------------------------------------------------------------------- student side

    def new_student(self, seed: int, *, upcycle: bool = False) -> StagedModel:
        """A freshly initialised student; ``upcycle`` copies the teacher's MLPs into MoE experts (beyond the paper)."""
        from monomod.students import build_student

        s = self.settings
        seed_everything(seed)
        student = build_student(s["student"], modules=s["modules"], num_classes=s["num_classes"],
                                img_size=s["img_size"], in_chans=s["in_chans"], preset=s["student_preset"],
                                **s["student_overrides"])
        if upcycle and s["student"] == "moe":
            from monomod.students.moe import upcycle_experts

            if not upcycle_experts(student, self.teacher()):
                raise MonomodError("upcycling found no teacher MLP with the experts' shapes",
                                   "give the student the teacher's width (student_overrides.embed_dim), or drop upcycle")
        return student

    def stitched(self, student: StagedModel, i: int, kind: str):
        """Student stage i between stitch layers to and from the teacher's boundary widths."""
        from monomod.passes.stitch import stitch

        spec = self.partition().modules[i]
        width_in = _token_width(spec.inputs) if i > 0 else None
        width_out = _token_width(spec.outputs) if i < len(student.stages) - 1 else None
        return stitch(student.stages[i], width_in, width_out, kind)

    def assembled_student(self) -> StagedModel:
        """The student structure the assemble job produced (stitches kept as adapters when asked)."""
        job = self.plan.job("assemble")
        student = self.new_student(self.settings["seed"])
        if job.config["keep_stitches"]:
            kind = self.plan.job("m2mkd:0").config["stitch"]
            student.stages = nn.ModuleList([self.stitched(student, i, kind) for i in range(len(student.stages))])
        return student

    # ----------------------------------------------------------------------------------------- products

    def product(self, name: str) -> dict[str, torch.Tensor]:
        path = self.job_dir(name) / MODEL_FILE
        if not path.is_file():
            raise MonomodError(f"job {name!r} has not produced {path}", f"run the plan (monomod run {self.run_dir})")
        return load_file(str(path))

    def save_product(self, name: str, module: nn.Module) -> None:
        if not is_writer():
            return  # under torchrun only rank 0 writes products
        atomic_save_tensors(self.job_dir(name) / MODEL_FILE, dict(module.state_dict()))


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _token_width(values) -> int | None:
    """The width of a boundary that is one ``[B, T, D]`` tensor, else None."""
    return values[0].token_width if len(values) == 1 else None


# ------------------------------------------------------------------------------------------------ the jobs


def _train_config(ctx: RunContext, job: Job) -> TrainConfig:
    cfg = dict(job.config["train"])
    cfg.setdefault("num_classes", ctx.settings["num_classes"])
    return TrainConfig.from_json(cfg)


def _classification(model: nn.Module, label_smoothing: float) -> Callable:
    """Cross-entropy on the model's logits, plus the model's auxiliary loss (MoE load balancing) when it has one."""

    def loss_fn(x: torch.Tensor, y: torch.Tensor):
        logits = model(x)
        loss = soft_cross_entropy(logits, y, label_smoothing)
        aux = model.aux_loss() if hasattr(model, "aux_loss") else None
        return (loss + aux if aux is not None else loss), logits

    return loss_fn


def _fit(ctx: RunContext, job: Job, model: nn.Module, loss_fn: Callable, cfg: TrainConfig) -> dict[str, Any]:
    from monomod.data import Augment

    augment = Augment(auto_augment=cfg.auto_augment, color_jitter=cfg.color_jitter, reprob=cfg.reprob)
    loader = ctx.loader("train", cfg.batch_size, shuffle=True, seed=cfg.seed, augment=augment)
    result = train(model, loss_fn, loader, cfg, job_dir=ctx.job_dir(job.name), label=job.name)
    return {"train_steps": result.steps, "final_loss": result.final_loss, "train_acc": result.train_acc,
            "samples_per_second": result.samples_per_second}


def run_teacher(ctx: RunContext, job: Job) -> dict[str, Any]:
    cfg = _train_config(ctx, job)
    seed_everything(cfg.seed)
    model = ctx.new_teacher()
    info: dict[str, Any] = {}
    if not job.config.get("skip_training"):
        info = _fit(ctx, job, model, _classification(model, cfg.label_smoothing), cfg)
    ctx.save_product(job.name, model)
    return info


def run_meta(ctx: RunContext, job: Job) -> dict[str, Any]:
    cfg = _train_config(ctx, job)
    ctx.partition()  # first, so that how the partition is found never shifts the meta model's random init
    seed_everything(cfg.seed)
    meta = ctx.new_meta()
    info = _fit(ctx, job, meta, _classification(meta, cfg.label_smoothing), cfg)
    ctx.save_product(job.name, meta)
    return info


def run_m2mkd(ctx: RunContext, job: Job) -> dict[str, Any]:
    """Distil student stage i: the teacher pair ``meta[:i] -> T_i -> meta[i+1:]`` against the student pair
    ``meta[:i] -> pre -> S_i -> post -> meta[i+1:]``. Only S_i and its stitches receive updates; the meta prefix
    and the teacher run without autograd; gradients flow back through the frozen meta suffix."""
    i, loss_cfg = job.config["module"], job.config["loss"]
    cfg = _train_config(ctx, job)
    device = resolve_device(cfg.device)  # the loop moves the trainable; the frozen context must follow it
    meta = ctx.meta().to(device)
    teacher_module = ctx.teacher_module(i).to(device)
    student = ctx.new_student(ctx.settings["seed"], upcycle=job.config.get("upcycle", False))
    seed_everything(cfg.seed)
    stitched = ctx.stitched(student, i, job.config["stitch"])
    prefix, suffix = list(meta.stages[:i]), list(meta.stages[i + 1:])
    last = i == len(meta.stages) - 1
    feature_weight = loss_cfg.get("feature_loss", 0.0)

    def run(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        for m in modules:
            x = m(x)
        return x

    def loss_fn(x: torch.Tensor, y: torch.Tensor):
        with torch.no_grad():
            context = run(prefix, x)
            teacher_features = teacher_module(context)
            teacher_logits = run(suffix, teacher_features)
        student_features = stitched(context)
        student_logits = run(suffix, student_features)
        labels = y if y.dim() == 1 else y.argmax(dim=-1)
        loss = m2mkd_loss(student_logits, teacher_logits, labels, alpha=loss_cfg["alpha"], tau=loss_cfg["tau"],
                          kd=loss_cfg["kd"], kl_norm=loss_cfg["kl_norm"])
        if feature_weight and not last:
            if student_features.shape != teacher_features.shape:
                raise MonomodError(f"the feature loss compares {tuple(student_features.shape)} student features with "
                                   f"{tuple(teacher_features.shape)} teacher features", "set feature_loss to 0 for this student")
            loss = loss + feature_weight * F.mse_loss(student_features, teacher_features)
        aux = stitched.aux_loss()
        return (loss + aux if aux is not None else loss), student_logits

    info = _fit(ctx, job, stitched, loss_fn, cfg)
    ctx.save_product(job.name, stitched)
    return info


def run_assemble(ctx: RunContext, job: Job) -> dict[str, Any]:
    """Load every distilled stage into the full student, check each tensor landed, drop or keep the stitches."""
    student = ctx.new_student(ctx.settings["seed"])
    kind = ctx.plan.job("m2mkd:0").config["stitch"]
    stages = []
    for i in range(len(student.stages)):
        stitched = ctx.stitched(student, i, kind)
        state = ctx.product(f"m2mkd:{i}")
        stitched.load_state_dict(state)
        landed = stitched.state_dict()
        wrong = [k for k, v in state.items() if not torch.equal(landed[k], v)]
        if wrong:
            raise MonomodError(f"stage {i}'s distilled weights did not land ({', '.join(wrong[:3])})", "report this as a bug")
        stages.append(stitched if job.config["keep_stitches"] else stitched.stage)
    student.stages = nn.ModuleList(stages)
    ctx.save_product(job.name, student)
    return {"stages": len(stages), "kept_stitches": job.config["keep_stitches"]}


def run_finetune(ctx: RunContext, job: Job) -> dict[str, Any]:
    cfg = _train_config(ctx, job)
    student = ctx.assembled_student()
    student.load_state_dict(ctx.product("assemble"))
    seed_everything(cfg.seed)
    info = _fit(ctx, job, student, _classification(student, cfg.label_smoothing), cfg)
    ctx.save_product(job.name, student)
    return info


def run_baseline(ctx: RunContext, job: Job) -> dict[str, Any]:
    """The same student trained from scratch with the fine-tune budget: what m2mKD has to beat."""
    cfg = _train_config(ctx, job)
    student = ctx.new_student(ctx.settings["seed"], upcycle=job.config.get("upcycle", False))
    seed_everything(cfg.seed)
    info = _fit(ctx, job, student, _classification(student, cfg.label_smoothing), cfg)
    ctx.save_product(job.name, student)
    return info


def run_evaluate(ctx: RunContext, job: Job) -> dict[str, Any]:
    from monomod.report import write_run_report

    started = time.perf_counter()
    batch = job.config.get("batch_size", 256)
    models: dict[str, nn.Module] = {"teacher": ctx.teacher()}
    for name in ("assemble", "finetune"):
        student = ctx.assembled_student()
        student.load_state_dict(ctx.product(name))
        models["assembled" if name == "assemble" else "student"] = student
    baseline = ctx.new_student(ctx.settings["seed"])
    baseline.load_state_dict(ctx.product("baseline"))
    models["baseline"] = baseline
    if ctx.settings["meta"] == "trained":
        models["meta"] = ctx.meta()
    device = resolve_device("auto")
    results: dict[str, dict[str, float | None]] = {}
    for name, model in models.items():
        model.to(device)
        iid = evaluate(model, ctx.loader("val", batch, shuffle=False)(0), device)
        ood = evaluate(model, ctx.loader("ood", batch, shuffle=False)(0), device) if ctx.data.ood is not None else None
        results[name] = {"iid_acc": iid, "ood_acc": ood}
    write_run_report(ctx.run_dir, ctx.plan, results, {job.name: round(time.perf_counter() - started, 3)})
    return {name: r for name, r in results.items()}


TRAINING_KINDS = frozenset({"teacher", "meta", "m2mkd", "finetune", "baseline"})  # jobs that call train()
RUNNERS: dict[str, Callable[[RunContext, Job], dict[str, Any]]] = {
    "teacher": run_teacher, "meta": run_meta, "m2mkd": run_m2mkd, "assemble": run_assemble,
    "finetune": run_finetune, "baseline": run_baseline, "evaluate": run_evaluate,
}


def is_done(run_dir: Path, job: Job) -> bool:
    """Finished with the current hash, and its products still exist."""
    marker = run_dir / "jobs" / job.dir / DONE_FILE
    if not marker.is_file():
        return False
    try:
        done = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return done.get("hash") == job.hash and all((run_dir / out).exists() for out in job.outputs)


def run_job(ctx: RunContext, job: Job) -> dict[str, Any]:
    """Run one job and record it as done (hash, wall time, result) with an atomic marker.

    Under torchrun every rank trains (data parallel); jobs that do not train run on rank 0 alone; only rank 0
    writes, and all ranks meet at a barrier before the next job, so no rank reads a product before it exists."""
    started = time.perf_counter()
    if world_size() > 1 and job.kind not in TRAINING_KINDS and not is_writer():
        result: dict[str, Any] = {}
    else:
        result = RUNNERS[job.kind](ctx, job)
    seconds = time.perf_counter() - started
    record = {"name": job.name, "hash": job.hash, "seconds": round(seconds, 3), "result": result}
    if world_size() > 1:
        record["world_size"] = world_size()
    if is_writer():
        atomic_write_json(ctx.job_dir(job.name) / DONE_FILE, record)
    barrier()
    return record
