"""Plan pass: conversion options -> the Plan (a DAG of jobs) that carries out m2mKD end to end.

With ``teacher_training="incubate"`` (the default when monomod trains the teacher) the teacher comes out of
Deep Incubation, in the same meta model that m2mKD then uses (METHOD.md):
```
meta ─▶ incubate:0 ┐              ┌▶ m2mkd:0 ┐
     ─▶ incubate:1 ├─▶ teacher ─▶ ├▶ m2mkd:1 ├─▶ assemble ─▶ finetune ─┐
     ─▶  ...       ┘   (FT)       └▶  ...    ┘                         ├─▶ evaluate
baseline ──────────────────────────────────────────────────────────────┘
```
``end-to-end`` trains the teacher alone (``teacher`` beside ``meta``, no ``incubate`` jobs); ``none`` keeps a given
teacher as it is (with a trained meta model its modules are incubated, and m2mKD distils the incubated modules).
``meta`` is absent with ``meta="teacher"`` (the teacher's own modules are the context). The incubate jobs do not
depend on each other, nor do the m2mKD jobs, so executors run each group side by side. The meta, incubate and
m2mKD jobs (and the teacher) train on ``distill_data``; fine-tune, baseline and evaluation on ``data``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from monomod import __version__
from monomod.errors import MonomodError, shorten
from monomod.plan import DISTILL_KINDS, Job, Plan

STUDENT_KINDS = ("nac", "moe", "vit")
META_KINDS = ("trained", "teacher")
PRESETS = ("demo", "paper")
TEACHER_TRAININGS = ("incubate", "end-to-end", "none")
DISTILL_TARGETS = ("finetuned", "incubated")
# Stitch layers as the references use them: NAC plain Linear, V-MoE LayerNorm + Linear.
DEFAULT_STITCH = {"nac": "linear", "moe": "ln_linear", "vit": "linear"}


@dataclass
class ConvertOptions:
    """Everything `monomod convert` is asked for; `compile_plan` turns it into jobs."""

    teacher: str
    student: str
    modules: int
    data: str = "digits"
    ood: str | None = "auto"
    preset: str = "demo"
    meta: str = "trained"
    img_size: int | None = None
    in_chans: int | None = None
    weights: str | None = None
    pretrained: bool = False
    teacher_trained: bool = False  # the teacher already knows this data: same as teacher_training="none"
    teacher_training: str | None = None  # incubate | end-to-end | none (default: see resolve_teacher_training)
    distill_targets: str = "incubated"  # under incubation: which teacher modules m2mKD distils (finetuned | incubated)
    distill_data: str | None = None  # data of the teacher, meta, incubate and m2mKD jobs (default: data)
    student_preset: str | None = None
    student_overrides: dict[str, Any] = field(default_factory=dict)
    stitch: str | None = None
    keep_stitches: bool = False
    upcycle: bool = False
    alpha: float = 0.5
    tau: float = 1.0
    kd: str = "soft"
    kl_norm: str | None = None  # batchmean | reference (default: the preset's)
    feature_loss: float = 0.0
    seed: int = 0
    meta_width: int | None = None  # width of the trained meta model (default: the teacher's boundary width)
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)  # per job kind, over the preset's (BUDGET_KEYS)
    # How often training jobs checkpoint (how a job runs, not what it computes: kept out of job hashes)
    checkpoint_every: int = 0  # steps; 0 = by time only
    checkpoint_minutes: float = 10.0  # wall-clock minutes; 0 = by steps only
    loader_workers: int | None = None  # data-loader workers per job (None: the job's cores, at most 8); how fast, not
    # what is computed, so it never enters the plan or a job hash: the executor hands it to the jobs at run time


@dataclass(frozen=True)
class DataInfo:
    """What the plan needs to know of the data set (its size turns epochs into steps)."""

    num_classes: int
    in_chans: int
    train_size: int
    distill_num_classes: int | None = None  # of distill_data (default: num_classes)
    distill_train_size: int | None = None


# Training budgets. demo: sized so the whole plan fits in minutes on 2 CPU cores. paper: METHOD.md's reference
# hyper-parameters (epochs; lr 5e-4 x batch/512, AdamW wd 0.05, cosine, label smoothing 0.1, mixup 0.8 / CutMix 1.0,
# RandAugment rand-m9-mstd0.5-inc1, colour jitter 0.4, random erasing 0.25; mixing and smoothing kept on in the m2mKD
# jobs too, and the KL normalised by batch x classes). ``teacher`` is the teacher trained end to end, ``teacher_ft``
# the same job when it fine-tunes incubated modules (Deep Incubation's FT phase, no warm-up).
PRESET_BUDGETS: dict[str, dict[str, Any]] = {
    "demo": {
        "img_size": 32, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "label_smoothing": 0.0, "mixup": 0.0,
        "cutmix": 0.0, "auto_augment": None, "color_jitter": 0.0, "reprob": 0.0,
        "steps": {"teacher": 800, "teacher_ft": 150, "meta": 400, "incubate": 150, "m2mkd": 250, "finetune": 800},
        "warmup_fraction": 0.1, "kl_norm": "batchmean",
    },
    "paper": {
        "img_size": None, "batch_size": 512, "lr": 5e-4, "weight_decay": 0.05, "label_smoothing": 0.1, "mixup": 0.8,
        "cutmix": 1.0, "auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "reprob": 0.25,
        "epochs": {"teacher": 30, "teacher_ft": 100, "meta": 300, "incubate": 100, "m2mkd": 100, "finetune": 100},
        "warmup_epochs": 20, "no_warmup": ("teacher_ft",), "kl_norm": "reference",
    },
}


# What ``ConvertOptions.budgets`` may override, per job kind. The baseline trains with the fine-tune budget, so
# that the comparison with m2mKD stays fair. ``steps`` and ``epochs`` exclude each other, as do ``warmup_steps``
# and ``warmup_epochs``; epochs are turned into steps with the data set's size and the (overridden) batch size.
BUDGET_KINDS = ("teacher", "meta", "incubate", "m2mkd", "finetune")
BUDGET_KEYS = ("steps", "epochs", "warmup_steps", "warmup_epochs", "lr", "batch_size", "weight_decay",
               "label_smoothing", "mixup", "cutmix", "auto_augment", "color_jitter", "reprob", "min_lr", "grad_clip")
AUGMENT_KEYS = ("auto_augment", "color_jitter", "reprob")  # the loader's (monomod.data.Augment), every job kind


def resolve_teacher_training(o: ConvertOptions) -> str:
    """incubate where monomod trains the teacher and has a meta model to incubate it in; none for a teacher that
    already knows the data (``teacher_trained``); end-to-end with the teacher as its own meta model."""
    if o.teacher_training is not None:
        return o.teacher_training
    if o.teacher_trained:
        return "none"
    return "incubate" if o.meta == "trained" else "end-to-end"


def compile_plan(options: ConvertOptions, data: DataInfo) -> Plan:
    """Check the options and lay out the jobs. Pure: the same options and data give the same plan."""
    validate_options(options)
    budget = PRESET_BUDGETS[options.preset]
    training = resolve_teacher_training(options)
    distill_classes = data.distill_num_classes or data.num_classes
    settings = {
        "teacher": options.teacher, "weights": options.weights, "pretrained": options.pretrained,
        "student": options.student, "modules": options.modules, "student_preset": options.student_preset,
        "student_overrides": dict(options.student_overrides), "data": options.data, "ood": options.ood,
        "distill_data": options.distill_data or options.data, "distill_num_classes": distill_classes,
        "img_size": options.img_size or budget["img_size"], "in_chans": options.in_chans or data.in_chans,
        "num_classes": data.num_classes, "meta": options.meta, "preset": options.preset, "seed": options.seed,
        "teacher_training": training,
        "monomod": __version__,  # a new release invalidates finished jobs: their code may have changed
    }
    train = _budget_maker(options, data)
    jobs = _teacher_jobs(options, training, train)
    jobs += _m2mkd_jobs(options, training, train)
    distilled = [f"m2mkd:{i}" for i in range(options.modules)]
    jobs += [
        Job("assemble", "assemble", distilled, ["jobs/assemble/model.safetensors"], {"keep_stitches": options.keep_stitches}),
        Job("finetune", "finetune", ["assemble"], ["jobs/finetune/model.safetensors"], {"train": train("finetune", 3)}),
        # an upcycled baseline copies the teacher's MLPs, so it must wait for the teacher
        Job("baseline", "baseline", ["teacher"] if options.upcycle else [], ["jobs/baseline/model.safetensors"],
            {"train": train("finetune", 3), "upcycle": options.upcycle}),
        Job("evaluate", "evaluate", ["teacher", "assemble", "finetune", "baseline"],
            ["report.json", "report.md", "curves.png"], {"batch_size": 256}),
    ]
    return Plan(settings=settings, jobs=jobs)


def _teacher_jobs(o: ConvertOptions, training: str, train: Callable[[str, int], dict[str, Any]]) -> list[Job]:
    """The teacher, the meta model and, under Deep Incubation, one incubate job per module."""
    meta = [Job("meta", "meta", [], ["jobs/meta/model.safetensors"], {"train": train("meta", 2), "width": o.meta_width})]
    if o.meta == "teacher":
        meta = []
    incubate = [Job(f"incubate:{i}", "incubate", ["meta"], [f"jobs/incubate-{i}/model.safetensors"],
                    {"module": i, "train": train("incubate", 20 + i)}) for i in range(o.modules)]
    if training == "incubate":  # PT -> MT -> FT: the teacher job fine-tunes the assembled incubated modules
        teacher = Job("teacher", "teacher", [j.name for j in incubate], ["jobs/teacher/model.safetensors"],
                      {"train": train("teacher_ft", 1), "from": "incubate"})
        return [*meta, *incubate, teacher]
    teacher = Job("teacher", "teacher", [], ["jobs/teacher/model.safetensors"], {
        "train": train("teacher", 1), "skip_training": training == "none"})
    if training == "none" and o.meta == "trained":  # a given teacher: its modules learn the meta model's boundaries
        return [teacher, *meta, *incubate]
    return [teacher, *meta]


def _m2mkd_jobs(o: ConvertOptions, training: str, train: Callable[[str, int], dict[str, Any]]) -> list[Job]:
    """One m2mKD job per module; its target is the fine-tuned teacher's module i or incubated module i."""
    incubated = o.meta == "trained" and (training == "none" or (training == "incubate" and o.distill_targets == "incubated"))
    context = [] if o.meta == "teacher" else ["meta"]
    loss = {"alpha": o.alpha, "tau": o.tau, "kd": o.kd, "kl_norm": o.kl_norm or PRESET_BUDGETS[o.preset]["kl_norm"],
            "feature_loss": o.feature_loss}
    stitch = o.stitch or DEFAULT_STITCH.get(o.student, "linear")
    jobs = []
    for i in range(o.modules):
        target = f"incubate:{i}" if incubated else "teacher"
        inputs = [target, *context] + (["teacher"] if o.upcycle and target != "teacher" else [])
        jobs.append(Job(f"m2mkd:{i}", "m2mkd", inputs, [f"jobs/m2mkd-{i}/model.safetensors"], {
            "module": i, "target": target, "train": train("m2mkd", 10 + i), "loss": loss, "stitch": stitch,
            "upcycle": o.upcycle,
        }))
    return jobs


def _budget_maker(o: ConvertOptions, data: DataInfo) -> Callable[[str, int], dict[str, Any]]:
    """``train(kind, seed_offset)``: the training config of a job kind, from the preset and ``o.budgets``."""
    budget = PRESET_BUDGETS[o.preset]

    def train(kind: str, seed_offset: int) -> dict[str, Any]:
        override = dict(o.budgets.get("teacher" if kind == "teacher_ft" else kind, {}))
        batch_size = override.pop("batch_size", budget["batch_size"])
        size = (data.distill_train_size or data.train_size) if kind in (*DISTILL_KINDS, "teacher_ft") else data.train_size
        per_epoch = max(1, math.ceil(size / batch_size))
        if "steps" in override or "epochs" in override:
            steps = override.pop("steps") if "steps" in override else override.pop("epochs") * per_epoch
        elif "steps" in budget:
            steps = budget["steps"][kind]
        else:
            steps = budget["epochs"][kind] * per_epoch
        if "warmup_steps" in override or "warmup_epochs" in override:
            warmup = override.pop("warmup_steps") if "warmup_steps" in override else override.pop("warmup_epochs") * per_epoch
            warmup = min(warmup, steps)
        elif kind in budget.get("no_warmup", ()):
            warmup = 0
        elif "warmup_fraction" in budget:
            warmup = int(budget["warmup_fraction"] * steps)
        else:
            warmup = min(budget["warmup_epochs"] * per_epoch, steps // 5)
        config = {
            "steps": steps, "batch_size": batch_size, "lr": budget["lr"],
            "weight_decay": budget["weight_decay"], "warmup_steps": warmup,
            "label_smoothing": budget["label_smoothing"], "mixup": budget["mixup"], "cutmix": budget["cutmix"],
            **{key: budget[key] for key in AUGMENT_KEYS},
            "seed": o.seed + seed_offset,
        }
        config.update(override)  # lr, weight_decay, label_smoothing, mixup, cutmix, augmentation, ... as given
        return config

    return train


def validate_options(o: ConvertOptions) -> None:
    from monomod.students.custom import check_student_kind  # families, timm names, pkg.module:factory

    check_student_kind(o.student)
    minimum = 3 if o.student == "nac" else 2
    if not isinstance(o.modules, int) or o.modules < 1:
        raise MonomodError(f"--modules must be at least 1, got {shorten(repr(o.modules))}",
                           f"a {o.student} student needs --modules {minimum} or more")
    if o.modules < minimum:
        detail = "tokenizer+read-in, >=1 propagator, read-out" if o.student == "nac" else "a first and a last stage"
        raise MonomodError(f"a {o.student} student needs at least {minimum} modules ({detail}); got K={o.modules}",
                           f"pass --modules {minimum} or more")
    if o.meta not in META_KINDS:
        raise MonomodError(f"unknown --meta {o.meta!r}", f"use one of {', '.join(META_KINDS)}")
    if o.preset not in PRESETS:
        raise MonomodError(f"unknown --preset {o.preset!r}", f"use one of {', '.join(PRESETS)}")
    if o.kd not in ("soft", "hard"):
        raise MonomodError(f"unknown distillation target {o.kd!r}", "use soft or hard")
    _validate_teacher_training(o)
    if o.kl_norm not in (None, "batchmean", "reference"):
        raise MonomodError(f"unknown KL normalisation {o.kl_norm!r}", "use batchmean or reference")
    if not 0.0 <= o.alpha <= 1.0 or o.tau <= 0:
        raise MonomodError(f"alpha={o.alpha}, tau={o.tau} are out of range", "use 0 <= alpha <= 1 and tau > 0")
    if o.upcycle and o.student != "moe":
        raise MonomodError(f"--upcycle initialises MoE experts; a {o.student} student has none", "drop --upcycle or use --to moe")
    if o.feature_loss and o.student == "nac":
        raise MonomodError("--feature-loss needs the student's boundaries to carry the teacher's tokens; a NAC's carry "
                           "its latents (another count)", "drop --feature-loss for nac, or use --to moe / vit")
    if o.feature_loss < 0:
        raise MonomodError(f"--feature-loss must be 0 or more, got {o.feature_loss}", "pass a weight >= 0")
    if o.stitch not in (None, "linear", "ln_linear"):
        raise MonomodError(f"unknown --stitch {o.stitch!r}", "use linear or ln_linear")
    if o.loader_workers is not None and (not isinstance(o.loader_workers, int) or o.loader_workers < 0):
        raise MonomodError(f"loader_workers={o.loader_workers!r} is invalid", "give 0 (load in the job's process) or more")
    if o.meta_width is not None and (not isinstance(o.meta_width, int) or o.meta_width < 1 or o.meta == "teacher"):
        raise MonomodError(f"meta_width={o.meta_width!r} is invalid here", "give a positive integer, with meta=trained")
    for kind, override in (o.budgets or {}).items():
        if kind not in BUDGET_KINDS:
            raise MonomodError(f"budgets has an unknown job kind {kind!r}", f"use {', '.join(BUDGET_KINDS)}")
        unknown = sorted(set(override) - set(BUDGET_KEYS)) if isinstance(override, dict) else ["(not a mapping)"]
        if unknown:
            raise MonomodError(f"budgets.{kind} has unknown key(s) {', '.join(unknown)}", f"use {', '.join(BUDGET_KEYS)}")
        for pair in (("steps", "epochs"), ("warmup_steps", "warmup_epochs")):
            if all(key in override for key in pair):
                raise MonomodError(f"budgets.{kind} gives both {pair[0]} and {pair[1]}", "keep one of them")
        for key, value in override.items():
            if key in ("steps", "epochs", "warmup_steps", "warmup_epochs", "batch_size"):
                good = isinstance(value, int) and not isinstance(value, bool) and value >= (0 if "warmup" in key else 1)
            elif key == "grad_clip":
                good = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0)
            elif key == "auto_augment":
                good = value is None or (isinstance(value, str) and value != "")
            else:
                good = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf
            if not good:
                raise MonomodError(f"budgets.{kind}.{key}={shorten(repr(value))} is invalid",
                                   "give a finite non-negative number (an integer >= 1 for steps, epochs and batch_size)")


def _validate_teacher_training(o: ConvertOptions) -> None:
    if o.teacher_training not in (None, *TEACHER_TRAININGS):
        raise MonomodError(f"unknown --teacher-training {o.teacher_training!r}", f"use one of {', '.join(TEACHER_TRAININGS)}")
    if o.distill_targets not in DISTILL_TARGETS:
        raise MonomodError(f"unknown distill_targets {o.distill_targets!r}", f"use one of {', '.join(DISTILL_TARGETS)}")
    training = resolve_teacher_training(o)
    if o.teacher_trained and training != "none":
        raise MonomodError(f"--teacher-trained says the teacher needs no training, but --teacher-training is {training}",
                           "drop --teacher-trained, or use --teacher-training none")
    if training == "incubate" and o.meta == "teacher":
        raise MonomodError("Deep Incubation trains the teacher's modules inside a trained meta model, but --meta is teacher",
                           "use --meta trained, or --teacher-training end-to-end|none")
    if training == "none" and not (o.weights or o.pretrained or o.teacher_trained):
        raise MonomodError("--teacher-training none keeps the teacher as it is, but no trained weights are given",
                           "pass --weights FILE or --pretrained, or use --teacher-training incubate")


def options_to_dict(options: ConvertOptions) -> dict[str, Any]:
    return asdict(options)
