"""Data parallelism inside one job: ``monomod run RUN_DIR --job NAME`` launched under ``torchrun``.

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (plus the rendezvous address) for each process it starts;
``session()`` turns that into a process group (gloo on CPU, nccl on CUDA) for the duration of a run. Inside a
session every rank runs the same training jobs in the same order:

* ``train()`` wraps the trainable in ``DistributedDataParallel`` (see ``data_parallel``) and gives each rank its
  contiguous slice of every *global* batch (``shard``); each rank's loss is scaled so the averaged gradient is the
  gradient of the global batch's mean loss, i.e. the same update as single-process training on the same global
  batch, up to float error (per-batch auxiliary losses such as MoE load balancing are computed per slice);
* only rank 0 (``is_writer()``) writes checkpoints, metrics, products, reports and ``done.json``; jobs that do not
  train (assemble, evaluate) run on rank 0 alone, and every job ends with a barrier so no rank reads a product
  before it is written.

Outside torchrun (``WORLD_SIZE`` unset or 1) every function here is a cheap no-op.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from monomod.errors import MonomodError


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MonomodError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer", "launch with torchrun") from None


def active() -> bool:
    """True inside a multi-process group (torchrun with more than one process)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_writer() -> bool:
    """Whether this process writes files: always outside torchrun, rank 0 inside."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def device() -> torch.device | None:
    """The device this rank trains on under torchrun (``cuda:LOCAL_RANK`` with CUDA), None when not distributed."""
    if not active():
        return None
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@contextmanager
def session() -> Iterator[int]:
    """Join the torchrun process group for the duration of the block; yields the world size (1 = not distributed).

    gloo on CPU, nccl when CUDA is available (each rank on ``cuda:LOCAL_RANK``)."""
    world = env_world_size()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield world_size()
        return
    if not dist.is_available():
        raise MonomodError("WORLD_SIZE > 1 but this torch build has no torch.distributed", "run without torchrun")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise MonomodError(f"WORLD_SIZE={world} is set but {name} is not", "launch with torchrun --nproc_per_node N")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    try:
        yield world
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard(n: int) -> tuple[slice, float]:
    """This rank's contiguous slice of a global batch of ``n`` samples, and the loss scale that makes DDP's gradient
    average equal the gradient of the global mean loss: ``n_local * world / n`` (1 when the batch splits evenly)."""
    world = world_size()
    if world == 1:
        return slice(0, n), 1.0
    if n < world:
        raise MonomodError(f"a global batch of {n} cannot be shared by {world} ranks", f"use batch_size >= {world}")
    lo, hi = n * rank() // world, n * (rank() + 1) // world
    return slice(lo, hi), (hi - lo) * world / n


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over the ranks (identity when not distributed)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@contextmanager
def data_parallel(trainable: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Wrap ``trainable`` in DistributedDataParallel for the block, so that the loss functions, which call
    ``trainable(...)`` directly, run its forward through DDP (and their backward all-reduces the gradients).

    The wrapper is thin: ``trainable.forward`` is routed through the DDP module while the block runs (DDP's own call
    into the module reaches the original forward) and restored afterwards; ``trainable.state_dict()`` keeps its
    keys. A no-op outside torchrun. The loss must call the trainable's forward exactly once per step."""
    if not active():
        yield trainable
        return
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(trainable, device_ids=ids)
    original = trainable.forward  # the bound method (or an instance attribute someone set)
    inside = [False]

    def routed(*args, **kwargs):
        if inside[0]:
            return original(*args, **kwargs)
        inside[0] = True
        try:
            return ddp(*args, **kwargs)
        finally:
            inside[0] = False

    had_instance_forward = "forward" in trainable.__dict__
    trainable.forward = routed
    try:
        yield ddp
    finally:
        if had_instance_forward:
            trainable.forward = original
        else:
            del trainable.forward
