"""Few labels (``shots=N``): the same N training images per class for every run, so runs pair up."""
from __future__ import annotations

import copy

import torch
from torch.utils.data import Dataset

from monomod.errors import MonomodError
from monomod.data.sets import TensorImageDataset

_SHOTS_SEED = 20240613  # fixed: every run with the same shots=N trains on the same images, so runs pair up


def few_shot(train: Dataset, shots: int, num_classes: int) -> Dataset:
    """The first ``shots`` images of each class in a fixed-seed shuffle of ``train`` (same images for every run)."""
    labels = _labels_of(train)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SHOTS_SEED)).tolist()
    kept: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for i in order:
        if len(kept.setdefault(labels[i], [])) < shots:
            kept[labels[i]].append(i)
    short = {c: len(ix) for c, ix in kept.items() if len(ix) < shots}
    if short:
        c, n = next(iter(short.items()))
        raise MonomodError(f"shots={shots} asks for more training images than class {c} has ({n})",
                           f"use shots={min(short.values())} or less")
    return _subset(train, sorted(i for ix in kept.values() for i in ix))


def _labels_of(dataset: Dataset) -> list[int]:
    if isinstance(dataset, TensorImageDataset):
        return dataset.labels.tolist()
    return [int(t) for t in dataset.targets]  # type: ignore[attr-defined]


def _subset(dataset: Dataset, indices: list[int]) -> Dataset:
    """The same kind of dataset over ``indices`` (a copy, so transforms and ``train_with`` keep working)."""
    out = copy.copy(dataset)
    if isinstance(out, TensorImageDataset):
        out.images, out.labels = dataset.images[indices], dataset.labels[indices]
        if dataset.tags is not None:
            out.tags = [dataset.tags[i] for i in indices]
    else:
        out.samples = [dataset.samples[i] for i in indices]  # type: ignore[attr-defined]
        out.targets = [dataset.targets[i] for i in indices]  # type: ignore[attr-defined]
        if hasattr(out, "imgs"):
            out.imgs = out.samples
    return out
