"""The one training loop behind every job of a distillation plan.

Teacher adaptation, meta-model training, each module's m2mKD job, end-to-end fine-tuning and the from-scratch
baseline differ only in *what* is optimised and *which* loss is used; the caller supplies both (``trainable`` and
``loss_fn``) and this loop owns the rest: AdamW, the warm-up + cosine schedule, gradient clipping, mixup/CutMix, bf16
autocast, a rich progress bar, ``metrics.jsonl``, crash-safe checkpoints and bitwise-exact resume.

Schedule (computed by hand each step, no LambdaLR; see ``learning_rate``)::

    step s (0-based) < warmup_steps:  lr = peak * (s + 1) / warmup_steps
    otherwise:                        lr = min_lr + (peak - min_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2

so the first warm-up step already learns, step ``W`` runs at the peak and the curve reaches ``min_lr`` at ``s = T``.
Because the schedule is a pure function of the step, the only scheduler state a checkpoint needs is the step.

Resume: ``job_dir/checkpoint`` holds the trainable's state_dict, AdamW's moments, the step, the position in the
epoch, the RNG state after that step *and* the RNG state at the start of the epoch. Resuming restores the
epoch-start RNG, re-creates the epoch's loader (so loaders that draw from the global RNG, e.g. a shuffling
DataLoader without its own generator, rebuild the same order), skips the batches already consumed, then restores the
RNG state of the checkpointed step. Mixup/CutMix (timm's ``Mixup``) draws from numpy seeded by ``(seed, step)``.
On CPU with the same seed, a job killed at any point and resumed finishes with bitwise the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monomod.errors import MonomodError, shorten
from monomod.runtime import distributed
from monomod.runtime.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    capture_rng_state,
    checkpoint_exists,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    restore_rng_state,
    save_checkpoint,
)

CHECKPOINT_FORMAT = 1
AMP_MODES = ("auto", "bf16", "off")
# Config fields that may change between a run and its resume without invalidating the checkpoint.
RESUME_INSENSITIVE = frozenset({"log_every", "checkpoint_every", "checkpoint_minutes", "device"})
# Parameter-name words that mark a parameter as exempt from weight decay (in addition to every 1-D parameter).
NO_DECAY_WORDS = frozenset({
    "token", "tokens", "embed", "embeds", "embedding", "embeddings", "signature", "signatures", "code", "codes",
})

LossFn = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor | None]"]


# ------------------------------------------------------------------------------------------------------ config


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
    amp: str = "auto"               # "auto" = bf16 autocast on CUDA, off on CPU; "bf16" = always; "off" = never
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
        if self.amp not in AMP_MODES:
            raise bad("amp", f"must be one of {', '.join(AMP_MODES)}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MonomodError(f"unknown training config keys {unknown}", f"use only {sorted(known)}")
        return cls(**data)


_INT_FIELDS = ("steps", "batch_size", "warmup_steps", "seed", "log_every", "checkpoint_every")
_FLOAT_FIELDS = ("lr", "weight_decay", "min_lr", "label_smoothing", "mixup", "checkpoint_minutes")


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
    if not isinstance(config.amp, str) or not isinstance(config.device, str):
        raise bad("amp" if not isinstance(config.amp, str) else "device", "must be a string")


@dataclass
class TrainResult:
    steps: int                      # steps completed by the job (== config.steps)
    final_loss: float               # mean loss over the last logging window
    train_acc: float | None         # mean top-1 over the last logging window (None if loss_fn returned no logits)
    seconds: float                  # wall time of this call (not counting earlier, interrupted runs)
    samples_per_second: float       # samples trained by this call / seconds
    resumed_from: int               # step the job resumed from (0 = fresh start)


# ------------------------------------------------------------------------------------------------------ helpers


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


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


def learning_rate(step: int, config: TrainConfig) -> float:
    """Learning rate used for 0-based optimisation step ``step`` (see the module docstring for the formula)."""
    peak, warmup, total = config.lr, config.warmup_steps, config.steps
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return config.min_lr + (peak - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def no_weight_decay(name: str, param: Tensor) -> bool:
    """True for 1-D parameters (biases, norms) and parameters named like tokens, embeddings, signatures or codes."""
    if param.ndim <= 1:
        return True
    leaf = name.rsplit(".", 1)[-1].lower()
    return any(word in NO_DECAY_WORDS for word in leaf.split("_"))


def param_groups(trainable: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: ``[{decayed params}, {weight_decay=0 params}]`` over trainable's ``requires_grad`` parameters.

    Weights of ``nn.Embedding`` modules count as embeddings (no decay) whatever their name."""
    embedding_weights = {id(m.weight) for m in trainable.modules() if isinstance(m, nn.Embedding)}
    decay, keep = [], []
    for name, p in trainable.named_parameters():
        if not p.requires_grad:
            continue
        (keep if no_weight_decay(name, p) or id(p) in embedding_weights else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    return groups


def soft_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy against class indices (integer ``(B,)``) or class probabilities (float ``(B, C)``, e.g.
    mixup targets). Label smoothing mixes the targets with the uniform distribution. Computed in fp32."""
    logits = logits.float()
    if not targets.is_floating_point():
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    targets = targets.float()
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


MIX_SWITCH_PROB = 0.5  # with both on, the chance a batch uses CutMix rather than mixup (the reference's)


def make_mixer(config: TrainConfig) -> Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]] | None:
    """timm's ``Mixup`` (mixup and/or CutMix per batch) as ``mix(x, y, step) -> (x, probabilities)``, or None when
    both are off. timm draws from numpy's global RNG; ``mix`` seeds it from ``(config.seed, step)`` and puts the old
    state back, so a resumed job mixes exactly as the uninterrupted one. Label smoothing stays with the loss
    (``soft_cross_entropy``): smoothing then mixing equals mixing then smoothing, and it is applied once."""
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    if config.num_classes is None:
        raise MonomodError("mixup/CutMix needs the number of classes to turn integer labels into probabilities",
                           "set num_classes in the training config")
    from timm.data import Mixup

    from monomod.data import derive_seed, global_rngs_kept

    mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, switch_prob=MIX_SWITCH_PROB,
                  label_smoothing=0.0, num_classes=config.num_classes)

    def mix(x: Tensor, y: Tensor, step: int) -> tuple[Tensor, Tensor]:
        if y.is_floating_point():
            raise MonomodError("mixup/CutMix needs integer class labels, the loader gave probabilities",
                               "turn mixup and cutmix off for this loader")
        if x.shape[0] % 2:  # timm mixes sample i with sample B-1-i: an odd batch has no partner for the middle one
            return x, F.one_hot(y.long(), config.num_classes).float()
        with global_rngs_kept():
            np.random.seed(derive_seed(config.seed, step, 3) % 2**32)
            return mixup(x.float() if not x.is_floating_point() else x, y)

    return mix


def _amp_enabled(amp: str, device: torch.device) -> bool:
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def _hard_labels(y: Tensor) -> Tensor:
    return y.argmax(dim=-1) if y.is_floating_point() and y.ndim > 1 else y


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` over ``loader`` in eval mode without gradients; every submodule's previous
    train/eval mode is restored afterwards. Batches are moved to ``device``; the model must already be there."""
    modes = _module_modes(model)
    device = torch.device(device)
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            correct += (out.argmax(dim=-1) == _hard_labels(y)).sum()
            seen += y.shape[0]
    finally:
        for m, training in modes:
            m.training = training
    return float(correct) / seen if seen else 0.0


# ----------------------------------------------------------------------------------------------- progress bar


def _progress(label: str, steps: int, completed: int, *, disable: bool = False):
    from rich.console import Console
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("acc {task.fields[acc]}"),
        TextColumn("{task.fields[speed]} samples/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
        disable=disable,
    )
    task = progress.add_task(label, total=steps, completed=completed, loss="-", acc="-", speed="-")
    return progress, task


# ------------------------------------------------------------------------------------------------------ loop


def _batches_of_epoch(make_loader: Callable[[int], Iterable], epoch: int) -> Iterator:
    return iter(make_loader(epoch))


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the metrics lines of steps <= last_step (drops lines a killed run wrote after its checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def _comparable(config_json: dict) -> dict:
    return {k: v for k, v in config_json.items() if k not in RESUME_INSENSITIVE}


def train(
    trainable: nn.Module,
    loss_fn: LossFn,
    make_loader: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    config: TrainConfig,
    *,
    job_dir: Path,
    label: str = "train",
    extra_state: Callable[[], dict[str, Tensor]] | None = None,
) -> TrainResult:
    """Optimise ``trainable``'s ``requires_grad`` parameters on ``loss_fn`` for ``config.steps`` steps.

    ``loss_fn(x, y) -> (loss, logits | None)`` sees batches already on the device (mixed when ``config.mixup`` or
    ``config.cutmix``, in which case ``y`` holds probabilities: use ``soft_cross_entropy``); logits, when returned,
    give the training accuracy. ``make_loader(epoch)`` must yield the same batches for the same epoch. ``trainable`` is moved to the
    device and put in train mode; anything else ``loss_fn`` uses (a frozen teacher or meta model) must already be
    on ``resolve_device(config.device)``. ``extra_state()`` tensors are saved in the checkpoint under ``extra.`` (for
    the caller; they are not restored on resume).

    Writes ``job_dir/metrics.jsonl`` (one line per ``log_every`` steps), ``job_dir/checkpoint/`` (end of job, every
    ``checkpoint_every`` steps and every ``checkpoint_minutes`` minutes) and ``job_dir/result.json``. If
    ``job_dir/checkpoint`` holds a checkpoint with the same config (``RESUME_INSENSITIVE`` fields may differ) the job resumes from it; a finished job
    returns at once with its weights loaded. A non-finite loss raises ``MonomodError`` before the optimizer step,
    leaving earlier checkpoints intact. An interrupted job (Ctrl-C, SIGKILL) writes no checkpoint of its own.

    Under torchrun (a process group with several ranks, see ``monomod.runtime.distributed``) the trainable runs
    inside DistributedDataParallel, each rank trains on its slice of every batch, logged loss and accuracy are
    those of the whole batch, and only rank 0 writes files.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = job_dir / "checkpoint"
    metrics_path = job_dir / "metrics.jsonl"
    device = resolve_device(config.device)
    if config.device == "auto" and distributed.device() is not None:
        device = distributed.device()  # cuda:LOCAL_RANK under torchrun with CUDA
    writer = distributed.is_writer()
    use_amp = _amp_enabled(config.amp, device)
    mix = make_mixer(config)

    seed_everything(config.seed)
    trainable.to(device)
    trainable.train()
    groups = param_groups(trainable, config.weight_decay)
    if not groups:
        raise MonomodError(
            f"training job '{label}' has no trainable parameters",
            "pass the module whose parameters should be optimised (with requires_grad=True)",
        )
    params = [p for g in groups for p in g["params"]]
    # fused AdamW on CUDA (one kernel for all parameters); the reference for-loop implementation on CPU.
    optimizer = torch.optim.AdamW(
        groups, lr=learning_rate(0, config), weight_decay=config.weight_decay, fused=device.type == "cuda" or None,
    )

    step, epoch, batch_in_epoch, elapsed_before = 0, 0, 0, 0.0
    last_loss, last_acc = float("nan"), None
    epoch_rng: tuple[dict[str, Tensor], dict] | None = None
    resume_rng: tuple[dict[str, Tensor], dict] | None = None
    resumed_from = 0

    if checkpoint_exists(ckpt_dir):
        tensors, state = load_checkpoint(ckpt_dir)
        saved_config = state.get("config", {})
        if state.get("format") == CHECKPOINT_FORMAT and _comparable(saved_config) == _comparable(config.to_json()):
            model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
            try:
                trainable.load_state_dict(model_state, strict=True)
                optimizer.load_state_dict(optimizer_state_from_tensors(tensors, state["optimizer"]))
            except (RuntimeError, ValueError, KeyError) as e:
                raise MonomodError(
                    f"training job '{label}': the checkpoint in {ckpt_dir} does not fit the model being trained ({e})",
                    f"delete {ckpt_dir} to restart the job from scratch",
                ) from None
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            elapsed_before = state.get("elapsed", 0.0)
            last_loss, last_acc = state.get("last_loss", float("nan")), state.get("last_acc")
            epoch_rng = (tensors, state["epoch_rng"])
            resume_rng = (tensors, state["rng"])
            resumed_from = step
            if writer:
                _truncate_metrics(metrics_path, step)
        else:
            from rich.console import Console

            Console(stderr=True).print(
                f"[yellow]{label}: the checkpoint in {ckpt_dir} was made with a different config; starting afresh"
            )
    if writer and resumed_from == 0 and metrics_path.exists():
        atomic_write_text(metrics_path, "")

    def save() -> None:
        if not writer:
            return
        tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in trainable.state_dict().items()}
        if extra_state is not None:
            tensors.update({f"extra.{k}": v for k, v in extra_state().items()})
        opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer.state_dict())
        rng_tensors, rng_meta = capture_rng_state("rng.")
        tensors.update(opt_tensors)
        tensors.update(rng_tensors)
        tensors.update({f"epoch_rng.{k[len('rng.'):]}": v for k, v in epoch_rng[0].items() if k.startswith("rng.")})
        state = {
            "format": CHECKPOINT_FORMAT,
            "label": label,
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "config": config.to_json(),
            "optimizer": opt_meta,
            "scheduler": {"kind": "warmup_cosine", "step": step, "next_lr": learning_rate(step, config)},
            "rng": rng_meta,
            "epoch_rng": epoch_rng[1],
            "elapsed": elapsed_before + (time.perf_counter() - start),
            "last_loss": last_loss,
            "last_acc": last_acc,
        }
        save_checkpoint(ckpt_dir, tensors, state)

    start = time.perf_counter()
    last_saved = start
    samples_run = 0
    window_loss, window_steps, window_samples = 0.0, 0, 0
    window_correct = torch.zeros((), dtype=torch.long, device=device)
    window_labelled = 0
    window_start = start
    batches: Iterator | None = None

    progress, task = _progress(label, config.steps, step, disable=not writer)
    with progress, _open_metrics(metrics_path, writer) as metrics, distributed.data_parallel(trainable, device):
        while step < config.steps:
            if batches is None:
                if resume_rng is not None:
                    # Rebuild the interrupted epoch exactly: epoch-start RNG, same loader, skip consumed batches,
                    # then the RNG state of the checkpointed step.
                    restore_rng_state(epoch_rng[0], epoch_rng[1], "epoch_rng.")
                    epoch_rng = capture_rng_state("rng.")
                    batches = _batches_of_epoch(make_loader, epoch)
                    for _ in range(batch_in_epoch):
                        next(batches, None)
                    restore_rng_state(resume_rng[0], resume_rng[1], "rng.")
                    resume_rng = None
                else:
                    epoch_rng = capture_rng_state("rng.")
                    batches = _batches_of_epoch(make_loader, epoch)
                    batch_in_epoch = 0
            try:
                x, y = next(batches)
            except StopIteration:
                if batch_in_epoch == 0:
                    raise MonomodError(
                        f"training job '{label}': the loader of epoch {epoch} yielded no batches",
                        "check the dataset path and that batch_size is not larger than the dataset with drop_last",
                    ) from None
                epoch += 1
                batches = None
                continue
            batch_in_epoch += 1

            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            hard = _hard_labels(y)
            if mix is not None:
                x, y = mix(x, y, step)
            n = x.shape[0]  # the global batch
            mine, scale = distributed.shard(n)  # under torchrun: this rank's slice (else everything, scale 1)
            if mine.stop - mine.start != n:
                x, y, hard = x[mine], y[mine], hard[mine]
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr

            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, logits = loss_fn(x, y)
            loss_value = float(loss.detach())
            if distributed.active():  # the global batch's mean loss, identical on every rank
                loss_value = distributed.all_sum([loss_value * x.shape[0]], device)[0] / n
            if not math.isfinite(loss_value):
                raise _non_finite(label, loss_value, step, lr, config, ckpt_dir)
            optimizer.zero_grad(set_to_none=True)
            (loss * scale if scale != 1.0 else loss).backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            step += 1

            samples_run += n
            window_samples += n
            window_loss += loss_value
            window_steps += 1
            if logits is not None:
                window_correct += (logits.detach().argmax(dim=-1) == hard).sum()
                window_labelled += hard.shape[0]

            if step % config.log_every == 0 or step == config.steps:
                if distributed.active():  # accuracy over the whole global batches
                    correct, labelled = distributed.all_sum([float(window_correct), float(window_labelled)], device)
                    window_correct.fill_(int(correct))
                    window_labelled = int(labelled)
                now = time.perf_counter()
                last_loss = window_loss / window_steps
                last_acc = float(window_correct) / window_labelled if window_labelled else None
                speed = window_samples / max(now - window_start, 1e-9)
                record = {
                    "step": step,
                    "loss": last_loss,
                    "acc": last_acc,
                    "lr": lr,
                    "samples_per_second": speed,
                    "seconds": elapsed_before + (now - start),
                }
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                progress.update(
                    task, completed=step, loss=f"{last_loss:.4f}",
                    acc="-" if last_acc is None else f"{last_acc:.3f}", speed=f"{speed:.0f}",
                )
                window_loss, window_steps, window_samples, window_labelled = 0.0, 0, 0, 0
                window_correct.zero_()
                window_start = now
            else:
                progress.update(task, completed=step)

            if step < config.steps and _checkpoint_due(step, config, last_saved):
                save()
                last_saved = time.perf_counter()
        if resumed_from < config.steps:
            save()

    seconds = time.perf_counter() - start
    result = TrainResult(
        steps=step,
        final_loss=last_loss,
        train_acc=last_acc,
        seconds=seconds,
        samples_per_second=samples_run / seconds if seconds > 0 else 0.0,
        resumed_from=resumed_from,
    )
    if writer:
        atomic_write_json(job_dir / "result.json", {"label": label, **dataclasses.asdict(result)})
    return result


def _checkpoint_due(step: int, config: TrainConfig, last_saved: float) -> bool:
    """Every ``checkpoint_every`` steps and every ``checkpoint_minutes`` of wall time (either may be 0 = off), so a
    killed long job loses minutes, not the job."""
    by_steps = config.checkpoint_every and step % config.checkpoint_every == 0
    by_time = config.checkpoint_minutes and time.perf_counter() - last_saved >= 60 * config.checkpoint_minutes
    return bool(by_steps or by_time)


def _non_finite(label: str, loss: float, step: int, lr: float, config: TrainConfig, ckpt_dir: Path) -> MonomodError:
    """The message for a diverged job: what was kept (only a checkpoint that exists) and an lr worth trying."""
    if checkpoint_exists(ckpt_dir):
        kept = f"the last checkpoint in {ckpt_dir} was kept"
    else:
        kept = "no checkpoint was written yet, so the job restarts from step 0"
    suggestion = min(config.lr / 10, 1e-3)  # an order of magnitude down, and never above a common safe peak
    return MonomodError(
        f"training job '{label}' hit a non-finite loss ({loss}) at step {step + 1} of {config.steps} (lr {lr:.3g})",
        f"lower the learning rate (e.g. lr={suggestion:.3g}) and keep grad_clip on; {kept}",
    )


def _open_metrics(path: Path, writer: bool):
    """The metrics log opened for appending (a null context on ranks that do not write)."""
    from contextlib import nullcontext

    return open(path, "a", encoding="utf-8") if writer else nullcontext(None)
