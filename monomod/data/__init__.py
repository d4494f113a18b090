"""Datasets for every training job: built-in digits, a synthetic smoke-test set, and image folders.

Every dataset yields ``(image, label)`` with ``image`` a float tensor ``[C, H, W]`` that is already normalised with the
bundle's ``mean``/``std``, so training code feeds it straight to a model. The bundle records ``mean``/``std`` so the
exported student can take raw images in [0, 1] and normalise itself.

Evaluation data never depends on the training seed: the digits split and its OOD corruptions use fixed seeds, so every
run (and every resumed run) scores on exactly the same images. ``make_loader`` makes the batch order and every
sample's random augmentation a pure function of ``(seed, epoch, index)`` (each sample seeds the RNGs its transform
draws from), so loader workers, their number and a resume mid-epoch all give the batches the uninterrupted job saw.

Image folders decode and augment through timm (``create_transform``) with the teacher's own mean, std, interpolation
and crop (``resolve_data_config``); the paper's RandAugment, colour jitter and random erasing come from ``Augment``.

One module per concern: the spec grammar (``spec``), the in-memory data sets and their corruptions (``sets``), image
folders (``folders``), few-shot selection (``fewshot``), loading and seeding (``loading``) and ``load_data``
(``load``). The public names are all importable from ``monomod.data``.
"""
from __future__ import annotations

from monomod.data.fewshot import few_shot
from monomod.data.folders import IMAGE_SUFFIXES, RAND_AUGMENT_MAGNITUDE_CAP, cap_rand_augment
from monomod.data.load import load_data
from monomod.data.loading import (
    MAX_LOADER_WORKERS, SeededLoader, default_workers, derive_seed, global_rngs_kept, make_loader, seed_global_rngs,
)
from monomod.data.sets import (
    DIGITS_COMPOUND, DIGITS_CORRUPTIONS, IMAGENET_MEAN, IMAGENET_STD, Augment, DataBundle, RandomShiftAffine,
    TensorImageDataset, in_memory_bytes,
)
from monomod.data.spec import DATA_KINDS, DataSpec, parse_data_spec

__all__ = [
    "DATA_KINDS", "DIGITS_COMPOUND", "DIGITS_CORRUPTIONS", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES",
    "MAX_LOADER_WORKERS", "RAND_AUGMENT_MAGNITUDE_CAP", "Augment", "DataBundle", "DataSpec", "RandomShiftAffine",
    "SeededLoader", "TensorImageDataset", "cap_rand_augment", "default_workers", "derive_seed", "few_shot",
    "global_rngs_kept", "in_memory_bytes", "load_data", "make_loader", "parse_data_spec", "seed_global_rngs",
]
