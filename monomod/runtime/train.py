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
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monomod.errors import MonomodError
from monomod.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from monomod.rundir import CHECKPOINT_DIR, METRICS_FILE, RESULT_FILE
from monomod.safe import open_append
from monomod.runtime import distributed
from monomod.runtime.checkpoint import (
    Checkpoints, TrainState, capture_rng_state, checkpoint_exists, restore_rng_state,
)
from monomod.runtime.config import TrainConfig, TrainResult, resolve_device, resolve_precision

# Parameter-name words that mark a parameter as exempt from weight decay (in addition to every 1-D parameter).
NO_DECAY_WORDS = frozenset({
    "token", "tokens", "embed", "embeds", "embedding", "embeddings", "signature", "signatures", "code", "codes",
})

LossFn = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor | None]"]






# ------------------------------------------------------------------------------------------------------ helpers


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


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


def _hard_labels(y: Tensor) -> Tensor:
    return y.argmax(dim=-1) if y.is_floating_point() and y.ndim > 1 else y


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def evaluate(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: str | torch.device = "cpu",
             precision: str = "fp32") -> float:
    """Top-1 accuracy of ``model`` over ``loader`` in eval mode without gradients (see ``correct_predictions``)."""
    correct = correct_predictions(model, loader, device, precision)
    return float(correct.sum()) / len(correct) if len(correct) else 0.0


@torch.no_grad()
def correct_predictions(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> Tensor:
    """Whether each sample of ``loader`` is classified right (a CPU bool tensor in loader order), so accuracies per
    subset (per OOD corruption) come from one pass. Eval mode without gradients, in ``precision`` (``bf16``: under
    the same autocast as training, so a bf16 model is measured as it runs); every submodule's previous train/eval
    mode is restored afterwards. Batches are moved to ``device``; the model must already be there."""
    modes = _module_modes(model)
    device = torch.device(device)
    model.eval()
    correct: list[Tensor] = []
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            correct.append(out.argmax(dim=-1) == _hard_labels(y))
    finally:
        for m, training in modes:
            m.training = training
    return torch.cat(correct).cpu() if correct else torch.zeros(0, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------------ loop


def train(
    trainable: nn.Module,
    loss_fn: LossFn,
    make_loader: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    config: TrainConfig,
    *,
    job_dir: Path,
    label: str = "train",
    extra_state: Callable[[], dict[str, Tensor]] | None = None,
    clip_groups: list[list[nn.Parameter]] | None = None,
) -> TrainResult:
    """Optimise ``trainable``'s ``requires_grad`` parameters on ``loss_fn`` for ``config.steps`` steps.

    ``loss_fn(x, y) -> (loss, logits | None)`` sees batches already on the device (mixed when ``config.mixup`` or
    ``config.cutmix``, in which case ``y`` holds probabilities: use ``soft_cross_entropy``); logits, when returned,
    give the training accuracy. ``make_loader(epoch)`` must yield the same batches for the same epoch. ``trainable`` is moved to the
    device and put in train mode; anything else ``loss_fn`` uses (a frozen teacher or meta model) must already be
    on ``resolve_device(config.device)``. ``extra_state()`` tensors are saved in the checkpoint under ``extra.`` (for
    the caller; they are not restored on resume). ``clip_groups`` clips each group's gradient norm apart (default:
    all parameters as one): the students of a fused m2mKD job, each clipped as its own job clips it.

    Writes ``job_dir/metrics.jsonl`` (one line per ``log_every`` steps), ``job_dir/checkpoint/`` (end of job, every
    ``checkpoint_every`` steps and every ``checkpoint_minutes`` minutes) and ``job_dir/result.json``. If
    ``job_dir/checkpoint`` holds a checkpoint with the same config (``monomod.plan.UNHASHED_TRAIN_KEYS`` may differ) the job resumes from it; a finished job
    returns at once with its weights loaded. A non-finite loss raises ``MonomodError`` before the optimizer step,
    leaving earlier checkpoints intact. An interrupted job (Ctrl-C, SIGKILL) writes no checkpoint of its own.

    Under torchrun (a process group with several ranks, see ``monomod.runtime.distributed``) the trainable runs
    inside DistributedDataParallel, each rank trains on its slice of every batch, logged loss and accuracy are
    those of the whole batch, and only rank 0 writes files.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    device = _train_device(config)
    writer = distributed.is_writer()
    mix = make_mixer(config)

    seed_everything(config.seed)
    trainable.to(device)
    trainable.train()
    optimizer = _make_optimizer(trainable, config, device, label)
    checkpoints = Checkpoints(job_dir / CHECKPOINT_DIR, trainable, optimizer, config, label, extra_state, writer)
    state = checkpoints.resume()
    step_once = _Stepper(loss_fn, optimizer, config, device, mix, label, checkpoints.path, clip_groups)
    batches = _Batches(make_loader, state, label)
    metrics = _Metrics(job_dir / METRICS_FILE, config, device, writer)
    metrics.prepare(state.resumed_from)

    state.started = checkpoints.last_saved = time.perf_counter()
    samples_run = 0
    progress = _ProgressBar(label, config.steps, state.step, disable=not writer)
    with progress, metrics, distributed.data_parallel(trainable, device):
        while state.step < config.steps:
            stepped = step_once(*batches.next(), state.step)
            state.step += 1
            samples_run += stepped.samples
            metrics.add(stepped)
            record = metrics.log(state) if metrics.due(state.step) else None
            progress.show(state.step, record)
            if state.step < config.steps and checkpoints.due(state.step):
                checkpoints.save(state)
        if state.resumed_from < config.steps:
            checkpoints.save(state)
    return _finish(job_dir, label, state, samples_run, writer)


def _train_device(config: TrainConfig) -> torch.device:
    if config.device == "auto" and distributed.device() is not None:
        return distributed.device()  # cuda:LOCAL_RANK under torchrun with CUDA
    return resolve_device(config.device)


def _finish(job_dir: Path, label: str, state: "TrainState", samples_run: int, writer: bool) -> TrainResult:
    seconds = time.perf_counter() - state.started
    result = TrainResult(
        steps=state.step,
        final_loss=state.last_loss,
        train_acc=state.last_acc,
        seconds=seconds,
        samples_per_second=samples_run / seconds if seconds > 0 else 0.0,
        resumed_from=state.resumed_from,
    )
    if writer:
        atomic_write_json(job_dir / RESULT_FILE, {"label": label, **dataclasses.asdict(result)})
    return result


# ------------------------------------------------------------------------------------------------------ batches


def _batches_of_epoch(make_loader: Callable[[int], Iterable], epoch: int) -> Iterator:
    return iter(make_loader(epoch))


class _Batches:
    """The loader's batches, epoch after epoch, counted in ``state``; a resumed job's epoch is rebuilt exactly."""

    def __init__(self, make_loader: Callable[[int], Iterable], state: TrainState, label: str) -> None:
        self.make_loader, self.state, self.label = make_loader, state, label
        self.batches: Iterator | None = None

    def next(self) -> tuple[Tensor, Tensor]:
        while True:
            if self.batches is None:
                self.batches = self._resumed_epoch() if self.state.resume_rng is not None else self._new_epoch()
            try:
                x, y = next(self.batches)
            except StopIteration:
                self._end_epoch()
                continue
            self.state.batch_in_epoch += 1
            return x, y

    def _new_epoch(self) -> Iterator:
        self.state.epoch_rng = capture_rng_state("rng.")
        self.state.batch_in_epoch = 0
        return _batches_of_epoch(self.make_loader, self.state.epoch)

    def _resumed_epoch(self) -> Iterator:
        """The interrupted epoch: epoch-start RNG, same loader, consumed batches skipped, then the RNG state of the
        checkpointed step."""
        state = self.state
        restore_rng_state(*state.epoch_rng, "epoch_rng.")
        state.epoch_rng = capture_rng_state("rng.")
        batches = _batches_of_epoch(self.make_loader, state.epoch)
        for _ in range(state.batch_in_epoch):
            next(batches, None)
        restore_rng_state(*state.resume_rng, "rng.")
        state.resume_rng = None
        return batches

    def _end_epoch(self) -> None:
        if self.state.batch_in_epoch == 0:
            raise MonomodError(
                f"training job '{self.label}': the loader of epoch {self.state.epoch} yielded no batches",
                "check the dataset path and that batch_size is not larger than the dataset with drop_last",
            ) from None
        self.state.epoch += 1
        self.batches = None


# ------------------------------------------------------------------------------------------------------ one step


def _make_optimizer(trainable: nn.Module, config: TrainConfig, device: torch.device, label: str) -> torch.optim.AdamW:
    groups = param_groups(trainable, config.weight_decay)
    if not groups:
        raise MonomodError(
            f"training job '{label}' has no trainable parameters",
            "pass the module whose parameters should be optimised (with requires_grad=True)",
        )
    # fused AdamW on CUDA (one kernel for all parameters); the reference for-loop implementation on CPU.
    return torch.optim.AdamW(
        groups, lr=learning_rate(0, config), weight_decay=config.weight_decay, fused=device.type == "cuda" or None,
    )


class _Stepped(NamedTuple):
    loss: float                 # the global batch's mean loss
    samples: int                # the global batch's size
    logits: Tensor | None       # this rank's
    labels: Tensor              # this rank's hard labels
    lr: float


class _Stepper:
    """One optimisation step: the batch to the device, mixing, this rank's slice, the scheduled learning rate, the
    loss under autocast, the non-finite check, backward, clipping and AdamW."""

    def __init__(self, loss_fn: LossFn, optimizer: torch.optim.Optimizer, config: TrainConfig, device: torch.device,
                 mix: Callable | None, label: str, ckpt_dir: Path,
                 clip_groups: list[list[nn.Parameter]] | None = None) -> None:
        self.loss_fn, self.optimizer, self.config, self.device = loss_fn, optimizer, config, device
        self.mix, self.label, self.ckpt_dir = mix, label, ckpt_dir
        self.use_amp = resolve_precision(config.precision, device) == "bf16"
        if config.compile:  # compiled on the first step, inside the job's time; the modules themselves stay unwrapped
            self.loss_fn = torch.compile(loss_fn)
        self.clip_groups = clip_groups or [[p for g in optimizer.param_groups for p in g["params"]]]

    def __call__(self, x: Tensor, y: Tensor, step: int) -> _Stepped:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        hard = _hard_labels(y)
        if self.mix is not None:
            x, y = self.mix(x, y, step)
        n = x.shape[0]  # the global batch
        mine, scale = distributed.shard(n)  # under torchrun: this rank's slice (else everything, scale 1)
        if mine.stop - mine.start != n:
            x, y, hard = x[mine], y[mine], hard[mine]
        lr = learning_rate(step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            loss, logits = self.loss_fn(x, y)
        loss_value = float(loss.detach())
        if distributed.active():  # the global batch's mean loss, identical on every rank
            loss_value = distributed.all_sum([loss_value * x.shape[0]], self.device)[0] / n
        if not math.isfinite(loss_value):
            raise _non_finite(self.label, loss_value, step, lr, self.config, self.ckpt_dir)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * scale if scale != 1.0 else loss).backward()
        if self.config.grad_clip:
            for params in self.clip_groups:
                torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.optimizer.step()
        return _Stepped(loss_value, n, logits, hard, lr)


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


# ------------------------------------------------------------------------------------------------------ metrics


class _Metrics:
    """``metrics.jsonl``: the steps since the last line accumulate in a window, written as one line every
    ``log_every`` steps and at the last step (only rank 0 writes)."""

    def __init__(self, path: Path, config: TrainConfig, device: torch.device, writer: bool) -> None:
        self.path, self.config, self.device, self.writer = path, config, device, writer
        self.file = None
        self._reset(time.perf_counter())

    def prepare(self, resumed_from: int) -> None:
        """A resumed job keeps the lines up to its checkpoint; a fresh one starts an empty log."""
        if not self.writer:
            return
        if resumed_from:
            _truncate_metrics(self.path, resumed_from)
        elif self.path.exists():
            atomic_write_text(self.path, "")

    def __enter__(self) -> "_Metrics":
        if self.writer:
            self.file = open_append(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _reset(self, now: float) -> None:
        self.loss, self.steps, self.samples, self.labelled, self.start = 0.0, 0, 0, 0, now
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)

    def add(self, stepped: _Stepped) -> None:
        self.samples += stepped.samples
        self.loss += stepped.loss
        self.steps += 1
        self.lr = stepped.lr
        if stepped.logits is not None:
            self.correct += (stepped.logits.detach().argmax(dim=-1) == stepped.labels).sum()
            self.labelled += stepped.labels.shape[0]

    def due(self, step: int) -> bool:
        return step % self.config.log_every == 0 or step == self.config.steps

    def log(self, state: TrainState) -> dict[str, Any]:
        """Close the window: its record (written, and kept in ``state`` as the last loss and accuracy)."""
        correct, labelled = float(self.correct), self.labelled
        if distributed.active():  # accuracy over the whole global batches
            correct, labelled = distributed.all_sum([correct, float(labelled)], self.device)
            correct, labelled = int(correct), int(labelled)
        now = time.perf_counter()
        state.last_loss = self.loss / self.steps
        state.last_acc = float(correct) / labelled if labelled else None
        record = {
            "step": state.step,
            "loss": state.last_loss,
            "acc": state.last_acc,
            "lr": self.lr,
            "samples_per_second": self.samples / max(now - self.start, 1e-9),
            "seconds": state.elapsed(now),
        }
        if self.file is not None:
            append_jsonl(self.file, record)
        self._reset(now)
        return record


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the metrics lines of steps <= last_step (drops lines a killed run wrote after its checkpoint)."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------------------------- progress bar


class _ProgressBar:
    """The rich bar of one job (disabled on ranks that do not write)."""

    def __init__(self, label: str, steps: int, completed: int, *, disable: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        self.progress = Progress(
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
        self.task = self.progress.add_task(label, total=steps, completed=completed, loss="-", acc="-", speed="-")

    def __enter__(self) -> "_ProgressBar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def show(self, step: int, record: dict[str, Any] | None = None) -> None:
        """Advance to ``step``; with a metrics record, also show its loss, accuracy and speed."""
        if record is None:
            self.progress.update(self.task, completed=step)
            return
        acc = "-" if record["acc"] is None else f"{record['acc']:.3f}"
        self.progress.update(self.task, completed=step, loss=f"{record['loss']:.4f}", acc=acc,
                             speed=f"{record['samples_per_second']:.0f}")
