"""What each kind of job does. Every job reads only the plan and its inputs' outputs under RUN_DIR, so any
executor can run it anywhere RUN_DIR is reachable.

Products are ``jobs/<dir>/model.safetensors`` (written atomically); ``jobs/<dir>/checkpoint`` is the training
loop's resume state and ``jobs/<dir>/metrics.jsonl`` its log.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from monomod.errors import MonomodError, first_line
from monomod.io import atomic_save_tensors
from monomod.ir import Partition
from monomod.plan import DISTILL_KINDS, Job, Plan
from monomod.rundir import RunDir
from monomod.runtime.config import TrainConfig, resolve_device, resolve_precision
from monomod.runtime.distributed import barrier, is_writer, world_size
from monomod.runtime.losses import m2mkd_loss, soft_cross_entropy
from monomod.runtime.train import correct_predictions, evaluate, seed_everything, train
from monomod.students.base import StagedModel
from monomod.students.stitching import bridge



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

    @cached_property
    def dirs(self) -> RunDir:
        return RunDir(self.run_dir)

    def job_dir(self, name: str) -> Path:
        return self.dirs.job_dir(name)

    @cached_property
    def data(self):
        """The task's data (``--data``): fine-tune, baseline and evaluation."""
        s = self.settings
        return self._load_data(s["data"], s["ood"])

    @cached_property
    def distill_data(self):
        """The data the teacher, meta, incubate and m2mKD jobs train on (``--distill-data``; no OOD split)."""
        return self._load_data(self.settings.get("distill_data") or self.settings["data"], None)

    def _load_data(self, spec: str, ood: str | None):
        """Image folders take the teacher's normalisation, interpolation and crop (its timm pretrained config, read
        from a weightless copy), whether or not the weights are pretrained."""
        from timm.data import resolve_data_config

        from monomod.data import load_data
        from monomod.frontend import load_model

        s = self.settings
        config = None
        if str(spec).startswith("imagefolder:") or str(ood).startswith("imagefolder:"):
            probe = load_model(s["teacher"], device="meta", img_size=s["img_size"], in_chans=s["in_chans"],
                               **s.get("teacher_kwargs", {}))
            config = resolve_data_config({}, model=probe)
        return load_data(spec, img_size=s["img_size"], in_chans=s["in_chans"], ood=ood, data_config=config)

    def loader(self, split: str, batch_size: int, *, shuffle: bool, seed: int = 0, distill: bool = False,
               augment: Any = None) -> Callable[[int], Any]:
        """``make_loader(epoch)`` over ``split`` of the task's data or (``distill``) the distillation data;
        ``augment`` (a ``monomod.data.Augment``) applies to ``train``."""
        from monomod.data import make_loader

        bundle = self.distill_data if distill else self.data
        dataset = bundle.train_with(augment) if split == "train" else getattr(bundle, split)
        if split == "train" and self.settings.get("input_path") == "device":  # monomod.runtime.device_data
            from monomod.runtime.device_data import device_loader

            return device_loader(dataset, batch_size, shuffle=shuffle, seed=seed, device=resolve_device("auto"))
        return lambda epoch: make_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                         drop_last=shuffle and len(dataset) > batch_size,
                                         num_workers=self.loader_workers)

    @property
    def distill_classes(self) -> int:
        return self.settings.get("distill_num_classes") or self.settings["num_classes"]

    # ----------------------------------------------------------------------------------------- teacher side

    def new_teacher(self) -> nn.Module:
        """The teacher as specified: timm init, pretrained weights or a local file, with this data's classifier."""
        from monomod.frontend import load_model, load_weights

        s = self.settings
        model = load_model(s["teacher"], pretrained=s["pretrained"], img_size=s["img_size"], in_chans=s["in_chans"],
                           num_classes=self.distill_classes, **s.get("teacher_kwargs", {}))
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
        """The teacher's partition, replayed from the cuts the plan records (never searched again). Traced on the
        meta device by default: shapes and costs need no weights."""
        key = f"partition-{device}"
        if key not in self._cache:
            from monomod.frontend import load_model

            s = self.settings
            if device == "meta":
                model = load_model(s["teacher"], device="meta", img_size=s["img_size"], in_chans=s["in_chans"],
                                   num_classes=self.distill_classes, **s.get("teacher_kwargs", {}))
            else:
                model = self.teacher()
            self._cache[key] = self._replay_cuts(model, device)
        return self._cache[key]

    def _replay_cuts(self, model: nn.Module, device: str) -> Partition:
        """``model`` traced on the run's input and cut where the plan's recorded partition cuts it."""
        from monomod.frontend import example_input
        from monomod.passes.partition import partition
        from monomod.passes.trace import trace
        from monomod.plan import PartitionRecord

        s = self.settings
        record = PartitionRecord.from_settings(s)
        example = example_input(s["in_chans"], s["img_size"], device=device)
        return partition(trace(model, example, name=s["teacher"]), s["modules"], cost=record.cost,
                         cuts=record.cuts)

    def teacher_module(self, i: int, source: str = "teacher") -> nn.Module:
        """Teacher module i, frozen, with only its own weights read from job ``source``'s product (the teacher, or
        ``incubate:i``): an m2mKD job never holds the whole teacher (the reference code builds the full model to
        use one stage). Models with non-persistent buffers (computed at init, absent from files) are built in full."""
        from safetensors import safe_open

        path = str(self.product_path(source))
        if self._has_computed_buffers():
            model = self.new_teacher()
            model.load_state_dict(load_file(path), strict=False)
            return _frozen(self._extract_from(model, i))
        module = self._empty_module(i)
        with safe_open(path, framework="pt") as f:
            module.load_state_dict({key: f.get_tensor(key) for key in module.state_dict()})
        return _frozen(module)

    def initial_teacher_module(self, i: int) -> nn.Module:
        """Teacher module i as Deep Incubation starts it: the teacher's given weights (``--weights``,
        ``--pretrained``) or timm's initialisation, trainable."""
        return self._extract_from(self.new_teacher(), i)

    def _extract_from(self, model: nn.Module, i: int) -> nn.Module:
        """Module i of ``model``, cut where the plan's partition cuts, with ``model``'s weights."""
        from monomod.passes.extract import extract

        if self._has_computed_buffers():
            return extract(self._replay_cuts(model, "cpu"))[i]
        module = self._empty_module(i)
        weights = model.state_dict()
        module.load_state_dict({key: weights[key] for key in module.state_dict()})
        return module

    def _empty_module(self, i: int) -> nn.Module:
        """Module i with uninitialised CPU tensors, to be loaded. A deep copy: extracted modules share their leaf
        modules with the traced model, so without it two modules extracted in one process would share weights."""
        from monomod.passes.extract import extract

        return copy.deepcopy(extract(self.partition("meta"))[i]).to_empty(device="cpu")

    def _has_computed_buffers(self) -> bool:
        return any(True for m in self.partition("meta").traced.model.modules() for _ in m._non_persistent_buffers_set)

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

    def new_student(self, seed: int, *, upcycle: bool = False, num_classes: int | None = None) -> StagedModel:
        """A freshly initialised student; ``upcycle`` copies the teacher's MLPs into MoE experts (beyond the paper).
        ``num_classes`` sizes its head (default: the task's; m2mKD jobs pass the distillation data's)."""
        from monomod.students import build_student

        s = self.settings
        seed_everything(seed)
        student = build_student(s["student"], modules=s["modules"], num_classes=num_classes or s["num_classes"],
                                img_size=s["img_size"], in_chans=s["in_chans"], preset=s["student_preset"],
                                **s["student_overrides"])
        if upcycle and s["student"] == "moe":
            from monomod.students.moe import upcycle_experts

            if not upcycle_experts(student, self.teacher()):
                raise MonomodError("upcycling found no teacher MLP with the experts' shapes",
                                   "give the student the teacher's width (student_overrides.embed_dim), or drop upcycle")
        return student

    def stitched(self, student: StagedModel, i: int, kind: str):
        """Student stage i between stitch layers to and from the teacher's boundaries, chosen by their shapes."""
        from monomod.students.stitching import stitch_student

        return stitch_student(student, self.partition(), i, kind)

    def assembled_student(self) -> StagedModel:
        """The student structure the assemble job produced (stitches dropped, or bridged between the stages)."""
        student, mode = self.new_student(self.settings["seed"]), assembly_mode(self.plan)
        if mode != "dropped":
            stitched = self.all_stitched(student)
            student.stages = nn.ModuleList(bridge(stitched) if mode == "bridged" else stitched)
        return student

    def all_stitched(self, student: StagedModel) -> list:
        """Every stage of ``student`` between its m2mKD stitch layers."""
        kind = self.plan.job("m2mkd:0").config["stitch"]
        return [self.stitched(student, i, kind) for i in range(len(student.stages))]

    # ----------------------------------------------------------------------------------------- products

    def product_path(self, name: str) -> Path:
        """The path of job ``name``'s weights, verified against its done record (size, sha256)."""
        path = self.dirs.product(name)
        if not path.is_file():
            raise MonomodError(f"job {name!r} has not produced {path}", f"run the plan (monomod run {self.run_dir})")
        job = self.plan.job(name)
        problem = self.dirs.done_problem(job) if self.dirs.done_file(job).is_file() else None
        if problem is not None and problem != "finished with another hash":
            raise MonomodError(f"job {name!r}: {problem}", f"run `monomod run {self.run_dir}` to make it again")
        return path

    def product(self, name: str) -> dict[str, torch.Tensor]:
        """Job ``name``'s weights, verified before they are read."""
        path = self.product_path(name)
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a torn file of a job still running, or without a done record
            raise MonomodError(f"cannot read {path} ({first_line(e)})",
                               f"run `monomod run {self.run_dir}` to make it again") from None

    def save_product(self, name: str, module: nn.Module) -> None:
        if not is_writer():
            return  # under torchrun only rank 0 writes products
        atomic_save_tensors(self.dirs.product(name), dict(module.state_dict()))


def assembly_mode(plan: Plan) -> str:
    """``dropped`` or ``bridged``; or ``stitched`` for plans written before ``--assemble`` with ``keep_stitches``
    (each stage kept between its own stitches: bridged, unfused)."""
    config = plan.job("assemble").config
    return config.get("assemble") or ("stitched" if config.get("keep_stitches") else "dropped")


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


# ------------------------------------------------------------------------------------------------ the jobs


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
                        augment=augment)
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
    teacher_module = ctx.teacher_module(i, job.config.get("target", "teacher")).to(device)
    student = ctx.new_student(ctx.settings["seed"], upcycle=job.config.get("upcycle", False),
                              num_classes=ctx.distill_classes)
    seed_everything(cfg.seed)
    stitched = ctx.stitched(student, i, job.config["stitch"])
    stitched.distillation_mode(True)  # the family's m2mKD form (NAC: dense attention, fixed shared code)
    teacher_pair, student_pair = hybrid(meta, i, teacher_module), hybrid(meta, i, stitched)
    feature_weight = loss_cfg.get("feature_loss", 0.0) if i < len(meta.stages) - 1 else 0.0

    def loss_fn(x: torch.Tensor, y: torch.Tensor):
        with torch.no_grad():
            context = teacher_pair.run_prefix(x)
            teacher_features = teacher_module(context)
            teacher_logits = teacher_pair.run_suffix(teacher_features)
        student_features = stitched(context)
        student_logits = student_pair.run_suffix(student_features)
        loss = m2mkd_loss(student_logits, teacher_logits, y, alpha=loss_cfg["alpha"], tau=loss_cfg["tau"],
                          kd=loss_cfg["kd"], kl_norm=loss_cfg["kl_norm"], label_smoothing=cfg.label_smoothing)
        if feature_weight:
            if student_features.shape != teacher_features.shape:
                raise MonomodError(f"the feature loss compares {tuple(student_features.shape)} student features with "
                                   f"{tuple(teacher_features.shape)} teacher features", "set feature_loss to 0 for this student")
            loss = loss + feature_weight * F.mse_loss(student_features, teacher_features)
        aux = stitched.aux_loss()
        return (loss + aux if aux is not None else loss), student_logits

    info = _fit(ctx, job, stitched, loss_fn, cfg)
    ctx.save_product(job.name, stitched)
    scores = measure_hybrids(ctx, i, {"teacher_hybrid": teacher_module, "student_hybrid": stitched.eval()},
                             precision=resolve_precision(cfg.precision, device))
    return {**info, **scores}


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
    asked = ctx.plan.job("finetune").config["train"].get("precision", "fp32")
    return resolve_precision(asked, resolve_device("auto"))


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


@dataclass(frozen=True)
class JobKind:
    run: Callable[[RunContext, Job], dict[str, Any]]
    trains: bool  # calls train(): under torchrun every rank runs it, the others run on rank 0 alone


RUNNERS: dict[str, JobKind] = {  # one entry per monomod.plan.JOB_KINDS
    "teacher": JobKind(run_teacher, trains=True),
    "meta": JobKind(run_meta, trains=True),
    "incubate": JobKind(run_incubate, trains=True),
    "m2mkd": JobKind(run_m2mkd, trains=True),
    "assemble": JobKind(run_assemble, trains=False),
    "finetune": JobKind(run_finetune, trains=True),
    "baseline": JobKind(run_baseline, trains=True),
    "evaluate": JobKind(run_evaluate, trains=False),
}


def _run_m2mkd_fused(ctx: RunContext, job: Job) -> dict[str, Any]:
    from monomod.runtime.fused import run_m2mkd_fused

    return run_m2mkd_fused(ctx, job)


RUNNERS["m2mkd-fused"] = JobKind(_run_m2mkd_fused, trains=True)  # the K m2mKD jobs as one (--m2mkd fused)


@contextmanager
def plan_threads(threads: int | None) -> Iterator[None]:
    """Run the block with the plan's torch thread count (``settings.threads``; None, as in older plans: leave it),
    then put the caller's back. Every executor runs a job through here, so a job computes with the same number of
    threads, and sums in the same order, whichever executor runs it."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_job(ctx: RunContext, job: Job) -> dict[str, Any]:
    """Run one job and record it as done (hash, wall time, result) with an atomic marker.

    Under torchrun every rank trains (data parallel); jobs that do not train run on rank 0 alone; only rank 0
    writes, and all ranks meet at a barrier before the next job, so no rank reads a product before it exists."""
    started = time.perf_counter()
    kind = RUNNERS[job.kind]
    if world_size() > 1 and not kind.trains and not is_writer():
        result: dict[str, Any] = {}
    else:
        with plan_threads(ctx.settings.get("threads")):
            result = kind.run(ctx, job)
    seconds = time.perf_counter() - started
    record = {"name": job.name, "hash": job.hash, "seconds": round(seconds, 3), "result": result}
    if world_size() > 1:
        record["world_size"] = world_size()
    if is_writer():
        record = ctx.dirs.write_done(job, record)
    barrier()
    return record
