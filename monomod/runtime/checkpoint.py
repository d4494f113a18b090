"""Crash-safe checkpoints: a directory of ``tensors.safetensors`` + ``state.json``, replaced atomically.

Layout of a checkpoint ``path/``::

    path/tensors.safetensors   every tensor (model, optimizer moments, RNG states), no pickle anywhere
    path/state.json            everything else (step, config, optimizer hyper-parameters, python RNG state, ...)

Writing protocol (``save_checkpoint``):

1. write both files into a fresh temporary sibling ``.{name}.tmp-{pid}-{rand}/`` and fsync them and the directory;
2. if ``path`` exists, rename it aside to ``.{name}.old-{pid}-{rand}/``;
3. ``os.replace`` the temporary directory onto ``path`` and fsync the parent directory;
4. delete the aside copy.

A reader therefore sees either the old checkpoint or the new one, never a mix, and a writer killed at any point
leaves at most a stray hidden sibling. ``checkpoint_exists`` / ``load_checkpoint`` ignore temporary siblings; if the
writer died between steps 2 and 3 (``path`` missing, the previous checkpoint still aside), they fall back to the aside
copy, so the last complete checkpoint is never lost. The next ``save_checkpoint`` cleans stray siblings up.
One writer per checkpoint path is assumed (each training job owns its ``job_dir``).

A training job's resume (``Checkpoints``): the checkpoint of ``job_dir/checkpoint`` is loaded when it was made with
the job's config (up to ``monomod.plan.UNHASHED_TRAIN_KEYS``), and saved on the loop's cadence (``checkpoint_due``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from monomod.errors import MonomodError
from monomod.io import fsync_dir, fsync_file, owned_cpu_tensors, unique_sibling
from monomod.plan import UNHASHED_TRAIN_KEYS
from monomod.runtime.config import TrainConfig

log = logging.getLogger(__name__)

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / TENSORS_FILE).is_file() and (path / STATE_FILE).is_file()


def _siblings(path: Path, kind: str) -> list[Path]:
    parent = path.parent
    if not parent.is_dir():
        return []
    return [p for p in parent.glob(f".{path.name}.{kind}-*") if p.is_dir()]


def _resolve(path: Path) -> Path | None:
    """The directory holding the last complete checkpoint for ``path``: itself, else an aside copy left by a writer
    that died between moving the previous checkpoint aside and moving the new one into place."""
    if _complete(path):
        return path
    if path.exists():
        return None  # something incomplete that is not ours to guess about
    aside = [p for p in _siblings(path, "old") if _complete(p)]
    if not aside:
        return None
    return max(aside, key=lambda p: (p / STATE_FILE).stat().st_mtime)


def save_checkpoint(path: Path | str, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Atomically write (or replace) the checkpoint directory ``path``; see the module docstring for the protocol."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prepared = owned_cpu_tensors(tensors)
    state_text = json.dumps(state, indent=2, sort_keys=True, allow_nan=True) + "\n"

    # A previous writer killed between the two renames left ``path`` missing and the good copy aside: put it back
    # first so that the sequence below always has a complete checkpoint somewhere.
    if not path.exists():
        fallback = _resolve(path)
        if fallback is not None and fallback != path:
            os.replace(fallback, path)
    for stray in _siblings(path, "tmp") + _siblings(path, "old"):
        shutil.rmtree(stray, ignore_errors=True)

    tmp = unique_sibling(path, "tmp")
    tmp.mkdir()
    try:
        save_file(prepared, str(tmp / TENSORS_FILE))
        fsync_file(tmp / TENSORS_FILE)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            f.write(state_text)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    aside = None
    if path.exists():
        aside = unique_sibling(path, "old")
        os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        if aside is not None and not path.exists():
            os.replace(aside, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def checkpoint_exists(path: Path | str) -> bool:
    """True when a complete checkpoint can be loaded from ``path`` (temporary siblings of killed writers ignored)."""
    return _resolve(Path(path)) is not None


class UnreadableCheckpoint(Exception):
    """A checkpoint whose files cannot be read (random bytes, a torn copy, garbage JSON); already set aside."""


def load_checkpoint(path: Path | str, required: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, state)`` of the checkpoint at ``path``; safetensors + JSON only, nothing is unpickled.

    A checkpoint that cannot be read (or whose state lacks an integer for a ``required`` key) is renamed aside (never deleted: it may be someone's only copy) and
    ``UnreadableCheckpoint`` says where it went, so the job restarts from step 0 instead of failing on every run."""
    path = Path(path)
    where = _resolve(path)
    if where is None:
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    try:
        tensors = load_file(str(where / TENSORS_FILE))
        state = json.loads((where / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in required):
            raise ValueError(f"{STATE_FILE} is no mapping with {', '.join(required) or 'keys'}")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a corrupt file
        aside = set_aside(where)
        raise UnreadableCheckpoint(f"the checkpoint in {where} cannot be read ({' '.join(str(e).split())[:160]}); "
                                   f"set aside as {aside.name}, the job restarts from step 0") from None
    return tensors, state


def set_aside(where: Path) -> Path:
    """Rename a checkpoint folder to a visible sibling ``<name>.unreadable-<n>`` (kept, never read again)."""
    for n in range(1, 1000):
        aside = where.with_name(f"{where.name.lstrip('.')}.unreadable-{n}")
        if not aside.exists():
            os.replace(where, aside)
            fsync_dir(where.parent)
            return aside
    raise OSError(f"too many unreadable checkpoints next to {where}")


# --------------------------------------------------------------------------------------------- optimizer state


def _encode(value: Any) -> Any:
    """JSON form of a param-group value; tuples are tagged so they come back as tuples (AdamW's ``betas``)."""
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError("optimizer param groups may only hold scalar tensors")
        return {"__scalar_tensor__": value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        if "__scalar_tensor__" in value:
            return torch.tensor(value["__scalar_tensor__"], dtype=getattr(torch, value["dtype"]))
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def optimizer_state_to_tensors(state_dict: dict, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``{prefix}{param_id}.{key}``: AdamW's step, exp_avg, exp_avg_sq)
    and a JSON-able description (param groups, non-tensor per-param values)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = _encode(value)
    meta = {
        "param_groups": _encode(state_dict["param_groups"]),
        "params": sorted(str(pid) for pid in state_dict["state"]),
        "scalars": scalars,
    }
    return tensors, meta


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optim.") -> dict:
    """Inverse of ``optimizer_state_to_tensors``: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {int(pid): {} for pid in meta["params"]}
    for name, value in tensors.items():
        if not name.startswith(prefix):
            continue
        pid, key = name[len(prefix):].split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        for key, value in values.items():
            state.setdefault(int(pid), {})[key] = _decode(value)
    return {"state": state, "param_groups": _decode(meta["param_groups"])}


# ---------------------------------------------------------------------------------------------------- RNG state


def capture_rng_state(prefix: str = "rng.") -> tuple[dict[str, torch.Tensor], dict]:
    """Every global RNG: torch CPU (uint8 tensor), CUDA devices when initialised, python ``random``, numpy."""
    tensors = {f"{prefix}torch": torch.get_rng_state()}
    meta: dict[str, Any] = {"python": _encode(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states = torch.cuda.get_rng_state_all()
        for i, s in enumerate(states):
            tensors[f"{prefix}cuda.{i}"] = s
        meta["cuda_devices"] = len(states)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "rng.") -> None:
    """Inverse of ``capture_rng_state`` (CUDA states are restored when the same number of devices is present)."""
    torch.set_rng_state(tensors[f"{prefix}torch"])
    random.setstate(_decode(meta["python"]))
    n_cuda = meta.get("cuda_devices", 0)
    if n_cuda and torch.cuda.is_available() and torch.cuda.device_count() == n_cuda:
        torch.cuda.set_rng_state_all([tensors[f"{prefix}cuda.{i}"] for i in range(n_cuda)])
    if "numpy" in meta:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover
            return
        kind, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------- a training job's resume

CHECKPOINT_FORMAT = 1
RngState = tuple[dict[str, torch.Tensor], dict]


@dataclass
class TrainState:
    """Where a job stands: what a checkpoint records and a resume restores."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed_before: float = 0.0              # wall time of earlier, interrupted runs
    last_loss: float = float("nan")          # of the last logging window
    last_acc: float | None = None
    epoch_rng: RngState | None = None        # the RNG at the start of the current epoch
    resume_rng: RngState | None = None       # the RNG after the checkpointed step, until its epoch is rebuilt
    resumed_from: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)  # when this call started training

    def elapsed(self, now: float | None = None) -> float:
        return self.elapsed_before + ((time.perf_counter() if now is None else now) - self.started)


def _comparable(config_json: dict) -> dict:
    """A training config without the keys that say how a job runs (``UNHASHED_TRAIN_KEYS``): a checkpoint made
    under other values of them still resumes."""
    return {k: v for k, v in config_json.items() if k not in UNHASHED_TRAIN_KEYS}


@dataclass
class Checkpoints:
    """The job's resume checkpoint: loaded when it was made with this config, saved on the loop's cadence."""

    path: Path
    trainable: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    label: str
    extra_state: Callable[[], dict[str, Tensor]] | None
    writer: bool
    last_saved: float = dataclasses.field(default_factory=time.perf_counter)

    def resume(self) -> TrainState:
        """The checkpointed state with the weights and AdamW moments loaded, or a fresh state."""
        if not checkpoint_exists(self.path):
            return TrainState()
        try:
            tensors, saved = load_checkpoint(self.path, required=("step", "epoch", "batch_in_epoch"))
        except UnreadableCheckpoint as e:
            log.warning(f"{self.label}: {e}")
            return TrainState()
        comparable = _comparable(saved.get("config", {})) == _comparable(self.config.to_json())
        if saved.get("format") != CHECKPOINT_FORMAT or not comparable:
            log.warning(f"{self.label}: the checkpoint in {self.path} was made with a different config; starting afresh")
            return TrainState()
        self._load_weights(tensors, saved)
        return TrainState(
            step=saved["step"], epoch=saved["epoch"], batch_in_epoch=saved["batch_in_epoch"],
            elapsed_before=saved.get("elapsed", 0.0),
            last_loss=saved.get("last_loss", float("nan")), last_acc=saved.get("last_acc"),
            epoch_rng=(tensors, saved["epoch_rng"]), resume_rng=(tensors, saved["rng"]), resumed_from=saved["step"],
        )

    def _load_weights(self, tensors: dict[str, Tensor], saved: dict) -> None:
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.trainable.load_state_dict(model_state, strict=True)
            self.optimizer.load_state_dict(optimizer_state_from_tensors(tensors, saved["optimizer"]))
        except (RuntimeError, ValueError, KeyError) as e:
            raise MonomodError(
                f"training job '{self.label}': the checkpoint in {self.path} does not fit the model being trained ({e})",
                f"delete {self.path} to restart the job from scratch",
            ) from None

    def due(self, step: int) -> bool:
        return checkpoint_due(step, self.config, self.last_saved)

    def save(self, state: TrainState) -> None:
        """Weights, AdamW, the position in the epoch and both RNG states (only rank 0 writes)."""
        if self.writer:
            tensors, meta = self._tensors(state)
            save_checkpoint(self.path, tensors, {**self._position(state), **meta})
        self.last_saved = time.perf_counter()

    def _tensors(self, state: TrainState) -> tuple[dict[str, Tensor], dict]:
        tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in self.trainable.state_dict().items()}
        if self.extra_state is not None:
            tensors.update({f"extra.{k}": v for k, v in self.extra_state().items()})
        opt_tensors, opt_meta = optimizer_state_to_tensors(self.optimizer.state_dict())
        rng_tensors, rng_meta = capture_rng_state("rng.")
        tensors.update(opt_tensors)
        tensors.update(rng_tensors)
        epoch_tensors, epoch_meta = state.epoch_rng
        tensors.update({f"epoch_rng.{k[len('rng.'):]}": v for k, v in epoch_tensors.items() if k.startswith("rng.")})
        return tensors, {"optimizer": opt_meta, "rng": rng_meta, "epoch_rng": epoch_meta}

    def _position(self, state: TrainState) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "label": self.label,
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "config": self.config.to_json(),
            "elapsed": state.elapsed(),
            "last_loss": state.last_loss,
            "last_acc": state.last_acc,
        }


def checkpoint_due(step: int, config: TrainConfig, last_saved: float) -> bool:
    """Every ``checkpoint_every`` steps and every ``checkpoint_minutes`` of wall time (either may be 0 = off), so a
    killed long job loses minutes, not the job."""
    by_steps = config.checkpoint_every and step % config.checkpoint_every == 0
    by_time = config.checkpoint_minutes and time.perf_counter() - last_saved >= 60 * config.checkpoint_minutes
    return bool(by_steps or by_time)
