"""Schedule pass: conversion options, data facts and the recorded partition -> the Plan (a DAG of jobs) that
carries out m2mKD end to end. Pure: it runs nothing and checks nothing (``monomod.compiler`` validates first).

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
from dataclasses import dataclass
from typing import Any, Callable

from monomod.plan import DISTILL_KINDS, JOB_KINDS, Job, PartitionRecord, Plan
from monomod.passes.fuse import fuse_m2mkd
from monomod.rundir import job_outputs
from monomod.version import __version__

# Budget kinds seeded by ``teacher_seed`` (when given): the teacher side's job kinds, and the teacher's fine-tune
# (``teacher_ft``: the teacher job's budget when it fine-tunes incubated modules).
TEACHER_SIDE = (*(kind.budget for kind in JOB_KINDS.values() if kind.teacher_side), "teacher_ft")

META_KINDS = ("trained", "teacher")
PRESETS = ("demo", "paper")
TEACHER_TRAININGS = ("incubate", "end-to-end", "none")
DISTILL_TARGETS = ("finetuned", "incubated")


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


# What ``ConvertOptions.budgets`` may override, per budget kind (``monomod.plan.BUDGET_KINDS``, from each job kind's
# ``budget``). ``steps`` and ``epochs`` exclude each other, as do ``warmup_steps`` and ``warmup_epochs``; epochs are
# turned into steps with the data set's size and the (overridden) batch size.
BUDGET_KEYS = ("steps", "epochs", "warmup_steps", "warmup_epochs", "lr", "batch_size", "weight_decay",
               "label_smoothing", "mixup", "cutmix", "auto_augment", "color_jitter", "reprob", "min_lr", "grad_clip")
AUGMENT_KEYS = ("auto_augment", "color_jitter", "reprob")  # the loader's (monomod.data.Augment), every job kind


def resolve_teacher_training(teacher_training: str | None, teacher_trained: bool, meta: str) -> str:
    """incubate where monomod trains the teacher and has a meta model to incubate it in; none for a teacher that
    already knows the data (``teacher_trained``); end-to-end with the teacher as its own meta model."""
    if teacher_training is not None:
        return teacher_training
    if teacher_trained:
        return "none"
    return "incubate" if meta == "trained" else "end-to-end"


def schedule(options: Any, data: DataInfo, partition: PartitionRecord, *, student_revision: int = 0) -> Plan:
    """Lay out the jobs of ``options`` (a validated ``monomod.compiler.ConvertOptions``). Pure: the same options,
    data facts and partition give the same plan. The partition is recorded in the plan's settings: jobs replay its
    cuts, and the jobs that use the teacher's modules hash them (``monomod.plan.SETTINGS_SCOPE``).
    ``student_revision`` (``monomod.students.student_revision``) enters the student jobs' hashes only, so a changed
    student family re-runs its jobs and keeps a finished teacher."""
    budget = PRESET_BUDGETS[options.preset]
    training = resolve_teacher_training(options.teacher_training, options.teacher_trained, options.meta)
    distill_classes = data.distill_num_classes or data.num_classes
    settings = {
        "teacher": options.teacher, "weights": options.weights, "pretrained": options.pretrained,
        "student": options.student, "modules": options.modules, "student_preset": options.student_preset,
        "student_overrides": dict(options.student_overrides), "data": options.data, "ood": options.ood,
        "distill_data": options.distill_data or options.data, "distill_num_classes": distill_classes,
        "img_size": options.img_size or budget["img_size"], "in_chans": options.in_chans or data.in_chans,
        "num_classes": data.num_classes, "meta": options.meta, "preset": options.preset, "seed": options.seed,
        "teacher_training": training, "partition": partition.to_dict(), "student_revision": student_revision,
        "threads": options.threads,  # torch threads of every job, whichever executor runs it (not in job hashes)
        "monomod": __version__,  # a new release invalidates finished jobs: their code may have changed
    }
    if options.input_path != "auto":  # recorded only when asked: others keep their hashes
        settings["input_path"] = options.input_path
    train = _budget_maker(options, data)
    jobs = _teacher_jobs(options, training, train)
    jobs += _m2mkd_jobs(options, training, train)
    if options.m2mkd == "fused":  # decided by compile_options (monomod.runtime.fused)
        jobs = fuse_m2mkd(jobs)
    distilled = [f"m2mkd:{i}" for i in range(options.modules)]
    jobs += [
        _job("assemble", distilled, {"assemble": options.assemble}),
        _job("finetune", ["assemble"], {"train": train("finetune", 3)}),
        # an upcycled baseline copies the teacher's MLPs, so it must wait for the teacher
        _job("baseline", ["teacher"] if options.upcycle else [], {"train": train("finetune", 3),
                                                                 "upcycle": options.upcycle}),
        _job("evaluate", ["teacher", "assemble", "finetune", "baseline"], {"batch_size": 256}),
    ]
    return Plan(settings=settings, jobs=jobs)


def _job(name: str, inputs: list[str], config: dict[str, Any]) -> Job:
    """Job ``name`` (``kind`` or ``kind:i``), writing what its kind produces (``RunDir`` spells the paths)."""
    kind = name.partition(":")[0]
    return Job(name, kind, inputs, job_outputs(name, kind), config)


def _teacher_jobs(o: Any, training: str, train: Callable[[str, int], dict[str, Any]]) -> list[Job]:
    """The teacher, the meta model and, under Deep Incubation, one incubate job per module."""
    meta = [_job("meta", [], {"train": train("meta", 2), "width": o.meta_width})]
    if o.meta == "teacher":
        meta = []
    incubate = [_job(f"incubate:{i}", ["meta"], {"module": i, "train": train("incubate", 20 + i)})
                for i in range(o.modules)]
    if training == "incubate":  # PT -> MT -> FT: the teacher job fine-tunes the assembled incubated modules
        teacher = _job("teacher", [j.name for j in incubate], {"train": train("teacher_ft", 1), "from": "incubate"})
        return [*meta, *incubate, teacher]
    teacher = _job("teacher", [], {"train": train("teacher", 1), "skip_training": training == "none"})
    if training == "none" and o.meta == "trained":  # a given teacher: its modules learn the meta model's boundaries
        return [teacher, *meta, *incubate]
    return [teacher, *meta]


def _m2mkd_jobs(o: Any, training: str, train: Callable[[str, int], dict[str, Any]]) -> list[Job]:
    """One m2mKD job per module; its target is the fine-tuned teacher's module i or incubated module i."""
    incubated = o.meta == "trained" and (training == "none" or (training == "incubate" and o.distill_targets == "incubated"))
    context = [] if o.meta == "teacher" else ["meta"]
    loss = {"alpha": o.alpha, "tau": o.tau, "kd": o.kd, "kl_norm": o.kl_norm or PRESET_BUDGETS[o.preset]["kl_norm"],
            "feature_loss": o.feature_loss}
    if o.boundary_loss:  # in the hashed config only when on: plans without it keep their finished m2mKD jobs
        loss["boundary_loss"] = float(o.boundary_loss)
    stitch = o.stitch  # the family's default, resolved by the compiler (``monomod.students.FAMILIES``)
    jobs = []
    for i in range(o.modules):
        target = f"incubate:{i}" if incubated else "teacher"
        inputs = [target, *context] + (["teacher"] if o.upcycle and target != "teacher" else [])
        jobs.append(_job(f"m2mkd:{i}", inputs, {
            "module": i, "target": target, "train": train("m2mkd", 10 + i), "loss": loss, "stitch": stitch,
            "upcycle": o.upcycle,
        }))
    return jobs


def _budget_maker(o: Any, data: DataInfo) -> Callable[[str, int], dict[str, Any]]:
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
            "seed": (o.seed if o.teacher_seed is None or kind not in TEACHER_SIDE else o.teacher_seed) + seed_offset,
            "precision": o.precision, "compile": o.compile,
        }
        config.update(override)  # lr, weight_decay, label_smoothing, mixup, cutmix, augmentation, ... as given
        return config

    return train
