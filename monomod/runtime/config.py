"""How a training job is configured (``TrainConfig``, checked when built and when a plan is read back), what it
reports (``TrainResult``), and where and in which precision it runs."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from monomod.errors import MonomodError, shorten

PRECISIONS = ("auto", "fp32", "bf16")
_INT_FIELDS = ("steps", "batch_size", "warmup_steps", "seed", "log_every", "checkpoint_every")
_FLOAT_FIELDS = ("lr", "weight_decay", "min_lr", "label_smoothing", "mixup", "checkpoint_minutes")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training job (JSON round-trip via ``to_json`` / ``from_json``)."""

    steps: int                      # optimisation steps (the loop cycles epochs over the loader as needed)
    batch_size: int = 64            # for the caller's make_loader; the loop uses whatever batches it is given
    lr: float = 5e-4                # peak learning rate
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr: float = 1e-6
    grad_clip: float | None = 1.0   # max global gradient norm; None or 0 = no clipping
    label_smoothing: float = 0.0    # for the caller's loss (see soft_cross_entropy); the loop does not apply it
    mixup: float = 0.0              # mixup alpha (0 = off); applied by the loop (timm Mixup) to (x, y) before loss_fn
    cutmix: float = 0.0             # CutMix alpha (0 = off); with mixup too, each batch picks one (switch prob 0.5)
    num_classes: int | None = None  # needed by mixup/CutMix to one-hot the integer labels
    auto_augment: str | None = None  # for the caller's loader (monomod.data.Augment): e.g. "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.0       # for the caller's loader
    reprob: float = 0.0             # for the caller's loader: random erasing probability
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0       # 0 = no step-based checkpoints; N = also every N steps
    checkpoint_minutes: float = 10.0  # also every M minutes of wall time (0 = not by time); always at the end
    precision: str = "auto"         # "bf16" = bf16 autocast; "fp32"; "auto" = see resolve_precision (at run time)
    compile: bool = False           # torch.compile the loss function (trainable and frozen context); weights unchanged
    device: str = "auto"

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> MonomodError:
            return MonomodError(f"training config: {field}={shorten(repr(getattr(self, field)))} {why}",
                                f"set a valid {field}")

        _check_types(self, bad)
        if self.steps < 1:
            raise bad("steps", "must be at least 1")
        if self.batch_size < 1:
            raise bad("batch_size", "must be at least 1")
        if not 0 < self.lr < math.inf:
            raise bad("lr", "must be positive and finite")
        if not 0 <= self.min_lr <= self.lr:
            raise bad("min_lr", f"must lie in [0, lr={self.lr}]")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be non-negative")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be non-negative")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise bad("grad_clip", "must be positive, 0 or null")
        if not 0 <= self.label_smoothing < 1:
            raise bad("label_smoothing", "must lie in [0, 1)")
        if self.mixup < 0:
            raise bad("mixup", "must be non-negative")
        if self.cutmix < 0:
            raise bad("cutmix", "must be non-negative")
        if self.color_jitter < 0:
            raise bad("color_jitter", "must be non-negative")
        if not 0 <= self.reprob <= 1:
            raise bad("reprob", "must lie in [0, 1]")
        if self.num_classes is not None and self.num_classes < 2:
            raise bad("num_classes", "must be at least 2")
        if self.log_every < 1:
            raise bad("log_every", "must be at least 1")
        if self.checkpoint_every < 0 or self.checkpoint_minutes < 0:
            raise bad("checkpoint_every" if self.checkpoint_every < 0 else "checkpoint_minutes", "must be non-negative")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"must be one of {', '.join(PRECISIONS)}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MonomodError(f"unknown training config keys {unknown}", f"use only {sorted(known)}")
        return cls(**data)


def _check_types(config: TrainConfig, bad: Callable[[str, str], MonomodError]) -> None:
    """Integers where steps are counted, finite numbers elsewhere: an edited plan.yaml may say ``steps: many``."""
    for name in _INT_FIELDS:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(name, "must be an integer")
    for name in (*_FLOAT_FIELDS, "grad_clip"):
        value = getattr(config, name)
        if name == "grad_clip" and value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise bad(name, "must be a finite number")
    if config.num_classes is not None and (not isinstance(config.num_classes, int) or isinstance(config.num_classes, bool)):
        raise bad("num_classes", "must be an integer")
    if not isinstance(config.precision, str) or not isinstance(config.device, str):
        raise bad("precision" if not isinstance(config.precision, str) else "device", "must be a string")
    if not isinstance(config.compile, bool):
        raise bad("compile", "must be true or false")


@dataclass
class TrainResult:
    steps: int                      # steps completed by the job (== config.steps)
    final_loss: float               # mean loss over the last logging window
    train_acc: float | None         # mean top-1 over the last logging window (None if loss_fn returned no logits)
    seconds: float                  # wall time of this call (not counting earlier, interrupted runs)
    samples_per_second: float       # samples trained by this call / seconds
    resumed_from: int               # step the job resumed from (0 = fresh start)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` = CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise MonomodError(f"unknown device {device!r} ({e})", "use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MonomodError(f"device {device!r} was requested but CUDA is not available", "use device auto or cpu")
    return resolved


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively: CUDA, or a CPU whose oneDNN reports bf16 support (AVX512-BF16,
    AMX). Elsewhere bf16 is emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - a build without oneDNN
        return False


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """``fp32`` or ``bf16``: ``auto`` is bf16 where ``device`` (default: the one ``auto`` picks, CUDA when there
    is one) computes bf16 natively, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device if device is not None else resolve_device("auto")) else "fp32"


def cpu_count() -> int:
    """CPU cores this process may use (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def resolve_threads(asked: int | None, allotted: int | None = None) -> int:
    """The torch threads a job computes with: the plan's ``threads`` where it asks for a count (the same on every
    executor, so the same numbers), else what the executor allots it on this machine (its share of the cores),
    else every core this process may use. Decided where the job runs, and recorded in its done record."""
    if asked:
        return int(asked)
    return int(allotted) if allotted else cpu_count()


def used_here(train: dict | None, threads: int, device: str = "auto") -> dict[str, object]:
    """What a job computes with on this machine: its threads, device and (for a training config) precision, each
    resolved here from what the plan asked (``auto`` included). Recorded in ``done.json`` as ``used``."""
    resolved = resolve_device(str((train or {}).get("device", device)))
    used: dict[str, object] = {"threads": threads, "device": str(resolved)}
    if train is not None:
        used["precision"] = resolve_precision(str(train.get("precision", "fp32")), resolved)
    return used
