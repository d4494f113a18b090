"""Loading and seeding: a loader whose batch order and every sample's augmentation are a pure function of
``(seed, epoch, index)``, so loader workers, their number and a resume mid-epoch give the same batches."""
from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import DatasetFolder

from monomod.errors import MonomodError

MAX_LOADER_WORKERS = 8


def derive_seed(*words: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, index, ...), so nearby inputs give unrelated streams.
    blake2b, not numpy's SeedSequence: it runs once per sample and costs 2 us instead of 30."""
    data = b",".join(str(int(w)).encode() for w in words)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def seed_global_rngs(seed: int) -> None:
    """Seed the global RNGs a transform may draw from: python ``random`` (timm), numpy (RandAugment's op choice),
    torch's CPU generator (torchvision, random erasing). CPU only: the CUDA generators are the training loop's."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


@contextmanager
def global_rngs_kept() -> Iterator[None]:
    """Run the block and put python, numpy and torch CPU RNG states back as they were."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class _EpochSampler(Sampler):
    """Yields ``(epoch_seed, index)``: the epoch's order (a permutation from ``(seed, epoch)`` when shuffling) with
    the seed each sample's augmentation derives from. Runs in the main process, never touching the global RNG."""

    def __init__(self, size: int, *, shuffle: bool, seed: int, epoch: int) -> None:
        self.size, self.shuffle = size, shuffle
        self.order_seed, self.epoch_seed = derive_seed(seed, epoch, 0), derive_seed(seed, epoch, 1)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.order_seed)).tolist()
        else:
            order = range(self.size)
        return ((self.epoch_seed, i) for i in order)


class _SeededSamples(Dataset):
    """``dataset[index]`` with the global RNGs seeded from ``(epoch_seed, index)`` first, so every random transform
    of every sample is fixed whichever process (main or worker) and whichever worker computes it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch_seed, index = key
        seed_global_rngs(derive_seed(epoch_seed, index))
        return self.dataset[index]


class SeededLoader(DataLoader):
    """A DataLoader over ``_SeededSamples``. In the main process (``num_workers=0``) each batch runs inside
    ``global_rngs_kept``, so the training loop's own randomness (dropout, init) neither affects nor is affected by
    data loading; workers own their RNGs. Iterating the same loader twice gives the same batches."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        it = super().__iter__()
        while True:
            try:
                if self.num_workers == 0:
                    with global_rngs_kept():
                        batch = next(it)
                else:
                    batch = next(it)
            except StopIteration:
                return
            yield batch


def _reads_files(dataset: Dataset) -> bool:
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return isinstance(dataset, DatasetFolder)


def default_workers(dataset: Dataset) -> int:
    """Loader workers for ``dataset``: the cores this job was given (``torch.get_num_threads()``, which executors
    set per job), at most 8, for sets that decode files. In-memory tensor sets get none: indexing one takes
    microseconds, while a worker would pickle every batch through shared memory, and only costs."""
    if not _reads_files(dataset):
        return 0
    return max(1, min(MAX_LOADER_WORKERS, torch.get_num_threads()))


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    drop_last: bool = False,
    num_workers: int | None = None,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    """The one way monomod loads batches: order and augmentations a pure function of ``(seed, epoch, index)``, so a
    job resumed mid-epoch sees exactly the batches it would have seen, whatever ``num_workers`` (default:
    ``default_workers``). Workers persist across re-iterations; batches are pinned for non-blocking CUDA copies."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MonomodError(f"batch_size must be a positive integer, got {batch_size!r}", "pass e.g. batch_size=64")
    workers = default_workers(dataset) if num_workers is None else num_workers
    if not isinstance(workers, int) or workers < 0:
        raise MonomodError(f"loader workers must be 0 or more, got {workers!r}", "pass e.g. --loader-workers 2")
    sampler = _EpochSampler(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch)  # type: ignore[arg-type]
    return SeededLoader(
        _SeededSamples(dataset), batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(), collate_fn=collate_fn,
        # DataLoader draws its workers' base seed from this generator, not from the global RNG
        generator=torch.Generator().manual_seed(derive_seed(seed, epoch, 2)),
    )
