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
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import random
import re
import stat
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import DatasetFolder, ImageFolder

from monomod.errors import MonomodError

DATA_KINDS = ("digits", "synthetic", "imagefolder")

# Fixed seeds for evaluation data: independent of the training seed so every run scores on the same images.
_SPLIT_SEED = 20240601
_OOD_SEED = 20240602

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Corruptions applied to the digits test split to make its OOD split; test image i gets exactly one of them.
DIGITS_CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "low_contrast", "rotation", "shift", "inversion", "occlusion")
# The compound OOD split (``ood="compound"``): every test image gets all of these at once, in this order, so a gain
# measured on mild single shifts can be checked on a harder one.
DIGITS_COMPOUND = ("rotation", "gaussian_blur", "occlusion")

_SPEC_FORMS = "'digits', 'synthetic' or 'imagefolder:PATH' (few labels: 'digits:shots=5', 'imagefolder:PATH,shots=5')"
_SHOTS_SEED = 20240613  # fixed: every run with the same shots=N trains on the same images, so runs pair up
MAX_LOADER_WORKERS = 8
log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation beyond the light default (random resized crop + flip), in ``create_transform``'s terms.

    Image folders get all of it; in-memory sets (digits, synthetic) keep their light shift/rotate augmentation and
    take only the random erasing, because RandAugment's photometric ops assume natural photographs.
    """

    auto_augment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1" (RandAugment), None = off
    color_jitter: float = 0.0        # timm ignores it while RandAugment is on, as the reference does
    reprob: float = 0.0              # random erasing probability, per-pixel noise ("pixel" mode)


@dataclass
class DataBundle:
    """A task's splits plus what a model needs to know about its inputs (shape, classes, normalisation)."""

    name: str
    train: Dataset
    val: Dataset
    ood: Dataset | None
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    interpolation: str = "bilinear"  # resize filter of the image-folder transforms (the teacher's, when it has one)
    crop_pct: float = 0.875          # eval centre-crop fraction (likewise)

    def train_with(self, augment: Augment | None) -> Dataset:
        """The training split under ``augment`` (``None``: as loaded); the images are shared, not reloaded."""
        if augment is None or augment == Augment():
            return self.train
        out = copy.copy(self.train)
        if isinstance(out, DatasetFolder):
            out.transform = _train_transform(self, augment)
        elif isinstance(out, TensorImageDataset) and augment.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            out.erase = RandomErasing(augment.reprob, mode="pixel", device="cpu")
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (sizes, shape, normalisation) for reports, so a result says what it was measured on."""
        out: dict[str, Any] = {
            "name": self.name,
            "train": len(self.train),  # type: ignore[arg-type]
            "val": len(self.val),  # type: ignore[arg-type]
            "ood": None if self.ood is None else len(self.ood),  # type: ignore[arg-type]
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "img_size": self.img_size,
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "classes": list(self.classes),
        }
        tags = getattr(self.ood, "tags", None)
        if tags is not None:
            out["ood_corruptions"] = dict(sorted(Counter(tags).items()))
        return out


# --------------------------------------------------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """Images held in memory as raw uint8 ``[N, c, H, W]`` (``c`` is 1 or ``in_chans``), normalised on access.

    uint8 keeps a 224-pixel digits set under 100 MB; channels are expanded to ``in_chans`` lazily for the same reason.
    ``augment`` (train only) runs on the raw [0, 1] image before normalisation and draws from the torch RNG;
    ``erase`` (train only, see ``DataBundle.train_with``) runs on the normalised image.
    ``tags`` optionally names what was done to each image (the OOD corruption), for per-corruption reports.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        tags: list[str] | None = None,
    ) -> None:
        assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] in (1, in_chans)
        assert len(images) == len(labels)
        self.images = images
        self.labels = labels.long()
        self.in_chans = in_chans
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self.erase: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.tags = tags

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, index: int) -> torch.Tensor:
        """The un-augmented, un-normalised image in [0, 1], ``[in_chans, H, W]``."""
        x = self.images[index].float().div_(255.0)
        return x.expand(self.in_chans, -1, -1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float().div_(255.0)
        if self.augment is not None:
            x = self.augment(x)
        x = (x.expand(self.in_chans, -1, -1) - self.mean) / self.std
        if self.erase is not None:
            x = self.erase(x)
        return x, int(self.labels[index])


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def _channel_stats(images: torch.Tensor, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 images as the model sees them ([0, 1], channels expanded to in_chans)."""
    x = images.double().div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    if len(mean) == 1 and in_chans > 1:
        mean, std = mean.expand(in_chans), std.expand(in_chans)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class RandomShiftAffine:
    """Light train augmentation for small centred images: rotate by up to ``degrees``, scale by ``1 ± scale``, and
    translate by up to ``img_size / 8`` pixels (one pixel of the original 8x8 digit). Draws from the torch RNG, which
    ``make_loader`` seeds from ``(seed, epoch, index)``. Background (0) fills the exposed border."""

    def __init__(self, img_size: int, degrees: float = 10.0, scale: float = 0.1) -> None:
        self.max_shift = max(1, round(img_size / 8))
        self.degrees = degrees
        self.scale = scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import InterpolationMode, affine

        u = torch.rand(3)
        shift = torch.randint(-self.max_shift, self.max_shift + 1, (2,))
        return affine(
            x,
            angle=float((u[0] * 2 - 1) * self.degrees),
            translate=[int(shift[0]), int(shift[1])],
            scale=float(1 + (u[1] * 2 - 1) * self.scale),
            shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
            fill=[0.0],
        )


# ----------------------------------------------------------------------------------------------------------- digits


def _resize(x: torch.Tensor, img_size: int) -> torch.Tensor:
    if x.shape[-1] == img_size and x.shape[-2] == img_size:
        return x
    return F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    y = F.conv2d(F.pad(x[None], (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y[0]


def _corrupt(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """One deterministic corruption of a single-channel image ``[1, H, W]`` in [0, 1]; randomness comes from ``g``.

    gaussian_noise: additive N(0, 0.35). gaussian_blur: sigma = 0.6 source pixel. low_contrast: squeezed to 30 % of its
    range around mid grey. rotation: 30-50 degrees either way. shift: translated 2 source pixels in a random direction
    (part of the digit leaves the frame). inversion: 1 - x. occlusion: a random square of 40 % side set to white.
    """
    from torchvision.transforms.functional import InterpolationMode, affine

    size = x.shape[-1]
    u = torch.rand(4, generator=g)
    if kind == "gaussian_noise":
        return x + 0.35 * torch.randn(x.shape, generator=g)
    if kind == "gaussian_blur":
        return _gaussian_blur(x, sigma=0.6 * size / 8)
    if kind == "low_contrast":
        return 0.5 + (x - 0.5) * 0.3
    if kind == "rotation":
        angle = float((30 + 20 * u[0]) * (1 if u[1] < 0.5 else -1))
        return affine(x, angle=angle, translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                      interpolation=InterpolationMode.BILINEAR, fill=[0.0])
    if kind == "shift":
        step = max(1, round(2 * size / 8))
        theta = float(u[0]) * 2 * math.pi
        dx, dy = round(step * math.cos(theta)), round(step * math.sin(theta))
        return affine(x, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0],
                      interpolation=InterpolationMode.NEAREST, fill=[0.0])
    if kind == "inversion":
        return 1.0 - x
    if kind == "occlusion":
        side = max(1, round(0.4 * size))
        top, left = int(u[0] * (size - side + 1)), int(u[1] * (size - side + 1))
        y = x.clone()
        y[..., top:top + side, left:left + side] = 1.0
        return y
    raise AssertionError(kind)


def _digits_ood(images: torch.Tensor, compound: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Corrupt each test image with one corruption; the assignment is a fixed-seed balanced permutation.
    ``compound``: every image gets all of ``DIGITS_COMPOUND`` in turn instead."""
    g = torch.Generator().manual_seed(_OOD_SEED)
    if compound:
        out = images
        for kind in DIGITS_COMPOUND:
            out = torch.stack([_corrupt(img, kind, g) for img in out])
        return out, ["+".join(DIGITS_COMPOUND)] * len(images)
    which = torch.randperm(len(images), generator=g) % len(DIGITS_CORRUPTIONS)
    tags = [DIGITS_CORRUPTIONS[int(k)] for k in which]
    out = torch.stack([_corrupt(img, tag, g) for img, tag in zip(images, tags)])
    return out, tags


_IN_MEMORY_IMAGES = {"digits": 2 * 1797, "synthetic": 512 + 2 * 128 + 128}  # with their OOD copies


def in_memory_bytes(spec: Any, img_size: int, in_chans: int) -> int:
    """Peak bytes of drawing an in-memory data set (digits, synthetic) at this size: float images and their noise,
    8 bytes a value. Image folders stream from disk: 0. For the compile-time memory estimate."""
    name = parse_data_spec(spec).kind if isinstance(spec, (str, DataSpec)) else None
    return _IN_MEMORY_IMAGES.get(name, 0) * in_chans * img_size * img_size * 8


def _load_digits(img_size: int, in_chans: int, ood: bool, augment: bool, compound: bool = False) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    y = torch.from_numpy(digits.target).long()
    idx_train, idx_val = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=digits.target, random_state=_SPLIT_SEED
    )
    idx_train, idx_val = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_val))
    x = _resize(x, img_size).clamp(0.0, 1.0)
    train_x, val_x = _to_uint8(x[idx_train]), _to_uint8(x[idx_val])
    mean, std = _channel_stats(train_x, in_chans)
    common = {"in_chans": in_chans, "mean": mean, "std": std}
    train = TensorImageDataset(train_x, y[idx_train], augment=RandomShiftAffine(img_size) if augment else None,
                               **common)
    val = TensorImageDataset(val_x, y[idx_val], **common)
    ood_ds = None
    if ood:
        ood_x, tags = _digits_ood(x[idx_val], compound)
        ood_ds = TensorImageDataset(_to_uint8(ood_x), y[idx_val], tags=tags, **common)
    return DataBundle("digits", train, val, ood_ds, 10, in_chans, img_size, mean, std, [str(i) for i in range(10)])


# -------------------------------------------------------------------------------------------------------- synthetic


def _load_synthetic(img_size: int, in_chans: int, ood: bool, augment: bool, seed: int) -> DataBundle:
    """10 classes, each a smooth random template (a 4x4 grid per channel, upsampled) plus pixel noise.

    Noise (sigma 0.3) is larger than the class structure (+-0.2) per pixel but averages out over a patch, so it is
    learnable in a few epochs without being trivial at one channel. The OOD split uses the same templates under a
    shifted distribution: stronger noise (0.45), contrast squeezed to 60 %, and the image rolled right by an eighth.
    ``seed`` picks the templates and noise, so smoke tests can vary it; train/val/ood are 512/128/128.
    """
    num_classes, n_train, n_val, n_ood = 10, 512, 128, 128
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    templates = _resize(torch.rand(num_classes, in_chans, 4, 4, generator=g), img_size)
    templates = (templates - templates.amin(dim=(1, 2, 3), keepdim=True)) / (
        templates.amax(dim=(1, 2, 3), keepdim=True) - templates.amin(dim=(1, 2, 3), keepdim=True) + 1e-6
    )
    templates = 0.3 + 0.4 * templates  # mid-grey with +-0.2 class structure

    def draw(n: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        return templates[labels] + noise * torch.randn(n, in_chans, img_size, img_size, generator=g), labels

    train_x, train_y = draw(n_train, 0.3)
    val_x, val_y = draw(n_val, 0.3)
    train_u8, val_u8 = _to_uint8(train_x), _to_uint8(val_x)
    mean, std = _channel_stats(train_u8, in_chans)
    common = {"in_chans": in_chans, "mean": mean, "std": std}
    train = TensorImageDataset(train_u8, train_y, augment=RandomShiftAffine(img_size) if augment else None, **common)
    val = TensorImageDataset(val_u8, val_y, **common)
    ood_ds = None
    if ood:
        ood_x, ood_y = draw(n_ood, 0.45)
        ood_x = torch.roll(0.5 + (ood_x - 0.5) * 0.6, shifts=max(1, img_size // 8), dims=-1)
        ood_ds = TensorImageDataset(_to_uint8(ood_x), ood_y, **common)
    classes = [f"class{i}" for i in range(num_classes)]
    return DataBundle("synthetic", train, val, ood_ds, num_classes, in_chans, img_size, mean, std, classes)


# ------------------------------------------------------------------------------------------------------ imagefolder


class _PilLoader:
    """Opens any image as ``mode`` ("RGB" or "L"): grayscale, palette and CMYK files become the channels a model
    expects. Converts once (a second ``convert`` copies every pixel again)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, path: str) -> Any:
        from PIL import Image

        if not _is_regular(path):  # opening a FIFO or a device blocks for ever
            raise MonomodError(f"cannot read image {path} (not a regular file)", "delete or replace that file")
        try:  # a corrupt file is named (and skipped by the folder dataset), never a PIL traceback mid-epoch
            with open(path, "rb") as f:
                img = Image.open(f)
                if img.mode == self.mode:
                    img.load()
                    return img
                if img.mode == "CMYK" and self.mode == "L":
                    img = img.convert("RGB")  # PIL has no direct CMYK -> L
                return img.convert(self.mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise MonomodError(f"cannot read image {path} ({' '.join(str(e).split())[:200]})",
                               "delete or replace that file") from None


def _is_regular(path: str) -> bool:
    """A regular file (through a link to one): not a FIFO, socket or device, which would block a reader."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _image_files(directory: str | Path, class_to_idx: dict[str, int], extensions: Any = None,
                 is_valid_file: Any = None, allow_empty: bool = True) -> list[tuple[str, int]]:
    """``(path, class index)`` of the image files under each class folder, sorted. Links to folders are not
    followed (a link loop would list the same images again and again); what is not a readable image (a FIFO, a
    decompression bomb) is dropped by ``_ClassFolder.drop_unreadable``, named."""
    samples = []
    for name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
        folder = Path(directory) / name
        for dirpath, dirnames, filenames in os.walk(folder):  # followlinks=False
            dirnames.sort()
            for file in sorted(filenames):
                path = os.path.join(dirpath, file)
                if file.lower().endswith(IMAGE_SUFFIXES):
                    samples.append((path, index))
    return samples


def _unreadable(path: str) -> str | None:
    """Why PIL cannot open ``path`` from its header (garbage, a decompression bomb), or None: read before any
    job, so each such file is named once per process, not once per read in every loader worker."""
    from PIL import Image

    if not _is_regular(path):
        return "not a regular file"
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - the header is parsed; pixels are not decoded
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return " ".join(str(e).split())[:200]
    return None


class _ClassFolder(ImageFolder):
    """ImageFolder with the class list and label indices given (not rediscovered), so labels can follow another
    split's classes. An image that cannot be decoded is skipped with one warning naming it (the next image of the
    folder takes its place, so batches stay a pure function of the index) instead of a traceback mid-epoch."""

    def __init__(self, root: str, classes: list[str], class_to_idx: dict[str, int], **kwargs: Any) -> None:
        self._given = (list(classes), dict(class_to_idx))
        self._warned: set[str] = set()
        super().__init__(root, allow_empty=True, **kwargs)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self._given[0], dict(self._given[1])

    make_dataset = staticmethod(_image_files)

    def drop_unreadable(self) -> dict[int, int]:
        """Drop the files whose header cannot be read, each named once; returns unreadable files per class."""
        kept, dropped = [], Counter()
        for path, target in self.samples:
            why = _unreadable(path)
            if why is None:
                kept.append((path, target))
            else:
                self._warned.add(path)
                dropped[target] += 1
                log.warning("skipping unreadable image %s (%s)", path, why)
        self.samples, self.imgs, self.targets = kept, kept, [t for _, t in kept]
        return dict(dropped)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(index)  # ends plain iteration (``for x, y in dataset``)
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                sample = self.loader(path)
            except MonomodError as e:  # the loader's word for a truncated or unknown file
                if path not in self._warned:
                    self._warned.add(path)
                    log.warning("skipping unreadable image %s (%s)", path, " ".join(str(e).split()))
                continue
            return (self.transform(sample) if self.transform is not None else sample), target
        raise MonomodError(f"no image in {self.root} can be read", "check the files (are they images?)")


def _image_folder(root: Path, class_to_idx: dict[str, int] | None, transform: Any, in_chans: int, what: str) -> Any:
    """An ImageFolder over ``root/<class>/*``; labels come from ``class_to_idx`` (the IID classes) when given, so val
    and OOD folders that hold a subset of the classes still get the training indices. A class folder without images
    is refused here, naming it, rather than giving a class that never appears."""
    if not root.is_dir():
        raise MonomodError(f"{what} directory {root} does not exist", "create it with one subfolder per class")
    folders = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise MonomodError(f"no class folders in {what} directory {root}", f"put its images in {root}/<class>/")
    if class_to_idx is not None:
        unknown = [c for c in folders if c not in class_to_idx]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            raise MonomodError(
                f"{what} directory {root} has classes not in the training set: {shown}",
                "its class folders must be a subset of the training class folders (matched by name)",
            )
        mapping = {c: class_to_idx[c] for c in folders}
    else:
        mapping = {c: i for i, c in enumerate(folders)}

    loader = _PilLoader("L" if in_chans == 1 else "RGB")
    ds = _ClassFolder(str(root), folders, mapping, transform=transform, loader=loader)
    dropped = ds.drop_unreadable()
    if dropped:
        log.warning("%d unreadable image(s) skipped in %s", sum(dropped.values()), root)
    if len(ds) == 0:
        raise MonomodError(f"no images in {what} directory {root}" + (
            f" ({sum(dropped.values())} unreadable)" if dropped else ""), f"put image files in {root}/<class>/")
    found = set(ds.targets)
    empty = [c for c in folders if mapping[c] not in found]
    if empty:
        bad = dropped.get(mapping[empty[0]], 0)
        why = f" it can read ({bad} unreadable)" if bad else ""
        more = f" (nor {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise MonomodError(f"class folder {root / empty[0]} has no images{why}{more}",
                           "put readable images in it, or remove the folder")
    return ds


def _eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bilinear",
                    crop_pct: float = 0.875) -> Any:
    from timm.data import create_transform

    return create_transform(img_size, is_training=False, interpolation=interpolation, mean=tuple(mean),
                            std=tuple(std), crop_pct=crop_pct)


def _train_transform(bundle: DataBundle, augment: Augment) -> Any:
    """timm's training transform: random resized crop + flip, then ``augment``'s RandAugment, jitter and erasing."""
    from timm.data import create_transform

    return cap_rand_augment(create_transform(
        bundle.img_size, is_training=True, interpolation=bundle.interpolation, mean=tuple(bundle.mean),
        std=tuple(bundle.std), auto_augment=augment.auto_augment, color_jitter=augment.color_jitter or None,
        re_prob=augment.reprob, re_mode="pixel",
    ))


# Recent Pillow (13 here) refuses to posterize to 0 bits, which timm's RandAugment asks for at its top magnitude (10,
# where it clips the sampled magnitude): capped just below, every op acts as at 10 but posterize keeps one bit.
RAND_AUGMENT_MAGNITUDE_CAP = 9.99


def cap_rand_augment(transform: Any) -> Any:
    """Cap the magnitude of the RandAugment ops inside a timm ``Compose`` (see RAND_AUGMENT_MAGNITUDE_CAP)."""
    for stage in getattr(transform, "transforms", []):
        for op in getattr(stage, "ops", []):
            if hasattr(op, "magnitude_max"):
                op.magnitude_max = RAND_AUGMENT_MAGNITUDE_CAP
    return transform


def _image_stats(in_chans: int, data_config: dict[str, Any] | None) -> tuple[tuple, tuple, str, float]:
    """mean, std, interpolation and crop fraction: the teacher's (timm ``resolve_data_config``) when given."""
    cfg = data_config or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if in_chans == 1 or len(mean) != in_chans:
        mean, std = (0.5,) * in_chans, (0.5,) * in_chans
    return mean, std, str(cfg.get("interpolation", "bilinear")), float(cfg.get("crop_pct", 0.875))


def _load_imagefolder(path: str, img_size: int, in_chans: int, augment: bool,
                      data_config: dict[str, Any] | None) -> DataBundle:
    if in_chans not in (1, 3):
        raise MonomodError(f"imagefolder data needs in_chans 1 or 3, got {in_chans}", "use in_chans 3 (RGB) or 1")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MonomodError(f"data directory {root} does not exist",
                           "pass imagefolder:PATH with PATH/train and PATH/val")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise MonomodError(f"no {split}/ directory in {root}", f"create {root / split}/<class>/ with its images")
    mean, std, interpolation, crop_pct = _image_stats(in_chans, data_config)
    eval_tf = _eval_transform(img_size, mean, std, interpolation, crop_pct)
    train = _image_folder(root / "train", None, eval_tf, in_chans, "train")
    val = _image_folder(root / "val", train.class_to_idx, eval_tf, in_chans, "val")
    bundle = DataBundle(f"imagefolder:{root.resolve()}", train, val, None, len(train.classes), in_chans, img_size,
                        mean, std, list(train.classes), interpolation, crop_pct)
    if augment:  # the light default: random resized crop + flip
        train.transform = _train_transform(bundle, Augment())
    return bundle


def _load_ood_folder(path: str, bundle: DataBundle) -> Dataset:
    """An OOD image folder (e.g. Tiny-ImageNet-R) whose classes are a subset of the IID classes, by folder name."""
    if bundle.in_chans not in (1, 3):
        raise MonomodError(f"an imagefolder OOD set needs in_chans 1 or 3, got {bundle.in_chans}",
                           "use in_chans 3 (RGB) or 1")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise MonomodError(f"OOD directory {root} does not exist", "pass ood='imagefolder:PATH' with PATH/<class>/")
    if (root / "val").is_dir():
        root = root / "val"
    class_to_idx = {c: i for i, c in enumerate(bundle.classes)}
    transform = _eval_transform(bundle.img_size, bundle.mean, bundle.std, bundle.interpolation, bundle.crop_pct)
    return _image_folder(root, class_to_idx, transform, bundle.in_chans, "OOD")


# ------------------------------------------------------------------------------------------------------- public API


def load_data(
    spec: str | DataSpec,
    *,
    img_size: int,
    in_chans: int = 3,
    ood: str | None = "auto",
    seed: int = 0,
    augment: bool = True,
    data_config: dict[str, Any] | None = None,
) -> DataBundle:
    """Load the task named by ``spec``: ``digits`` (built in), ``synthetic`` (smoke tests) or ``imagefolder:PATH``.

    ``ood``: ``"auto"`` gives each kind its default OOD split (digits: fixed corruptions of the test split, one per
    image; synthetic: its shifted split; imagefolder: none), ``"compound"`` (digits) the test split with
    ``DIGITS_COMPOUND`` applied to every image at once, ``None`` (or ``"none"``) gives none, and
    ``"imagefolder:PATH2"`` loads ``PATH2/val`` (or ``PATH2``) with labels mapped to the IID classes by folder name.
    ``seed`` only picks the synthetic data; the digits split is fixed so every run evaluates on the same images.
    ``augment`` turns on the light random train augmentation (``DataBundle.train_with`` adds the paper's); val and
    OOD are never augmented. ``data_config`` (timm's ``resolve_data_config`` of the teacher) gives image folders their
    mean, std, interpolation and crop fraction; in-memory sets normalise with their own statistics.
    """
    parsed = parse_data_spec(spec)
    if not isinstance(img_size, int) or img_size < 1:
        raise MonomodError(f"img_size must be a positive integer, got {img_size!r}", "pass e.g. img_size=32")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise MonomodError(f"in_chans must be a positive integer, got {in_chans!r}",
                           "pass 3 for RGB or 1 for grayscale")
    ood_folder: str | None = None
    if ood is None or ood == "none":
        want_ood = False
    elif ood in ("auto", "compound"):
        want_ood = True
    elif isinstance(ood, str) and ood.startswith("imagefolder:") and ood[len("imagefolder:"):]:
        want_ood, ood_folder = False, ood[len("imagefolder:"):]
    else:
        raise MonomodError(f"unknown OOD spec {ood!r}", "use 'auto', 'compound', None or 'imagefolder:PATH'")

    if ood == "compound" and parsed.kind != "digits":
        raise MonomodError(f"ood='compound' is built for the digits data, not {parsed.kind}",
                           "use ood='auto', or bring your own OOD set with ood='imagefolder:PATH'")
    if parsed.kind == "digits":
        bundle = _load_digits(img_size, in_chans, want_ood, augment, compound=ood == "compound")
    elif parsed.kind == "synthetic":
        bundle = _load_synthetic(img_size, in_chans, want_ood, augment, seed)
    else:
        bundle = _load_imagefolder(parsed.path, img_size, in_chans, augment, data_config)
    if parsed.shots is not None:
        bundle.train = few_shot(bundle.train, parsed.shots, bundle.num_classes)
        bundle.name = f"{bundle.name},shots={parsed.shots}"
    if ood_folder is not None:
        bundle.ood = _load_ood_folder(ood_folder, bundle)
    return bundle


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: the kind, the folder of ``imagefolder``, ``shots`` (labelled images per class) and
    the text it was parsed from. Parsed once (``parse_data_spec``), it travels as this value."""

    kind: str
    path: str | None = None
    shots: int | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text


def parse_data_spec(spec: Any) -> DataSpec:
    """A ``DataSpec`` (returned as is) or its text: ``digits`` | ``synthetic`` | ``imagefolder:PATH``, each optionally keeping N training images per class:
    ``digits:shots=5``, ``synthetic:shots=5``, ``imagefolder:PATH,shots=5``. Raises a one-line MonomodError."""
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise MonomodError(f"unknown data spec {spec!r}", f"use {_SPEC_FORMS}")
    body, shots = spec, None
    option = re.fullmatch(r"(.*?)[,:]shots=([^,:]*)", spec)
    if option:
        body, value = option.groups()
        if not value.isdigit() or int(value) < 1:
            raise MonomodError(f"shots must be a positive whole number, got {value!r} in {spec!r}",
                               "use e.g. digits:shots=5")
        shots = int(value)
        if body.startswith("imagefolder:") and spec[len(body)] != ",":
            raise MonomodError(f"unknown data spec {spec!r}", "write imagefolder:PATH,shots=N")
    kind, sep, path = body.partition(":")
    if kind in ("digits", "synthetic") and not sep:
        return DataSpec(kind, None, shots, spec)
    if kind == "imagefolder" and path:
        return DataSpec(kind, path, shots, spec)
    if kind == "imagefolder":
        raise MonomodError("imagefolder data needs a path", "use 'imagefolder:PATH' with PATH/train and PATH/val")
    raise MonomodError(f"unknown data spec {spec!r}", f"use {_SPEC_FORMS}")


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
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        # DataLoader draws its workers' base seed from this generator, not from the global RNG
        generator=torch.Generator().manual_seed(derive_seed(seed, epoch, 2)),
    )
