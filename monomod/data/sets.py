"""The in-memory data sets (built-in digits, a synthetic smoke-test set), the bundle every data set comes in, and the
corruptions that make the digits' OOD splits. Evaluation data never depends on the training seed: the digits split
and its corruptions use fixed seeds."""
from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets import DatasetFolder

from monomod.data.spec import DataSpec, parse_data_spec

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
            from monomod.data.folders import train_transform  # image folders read this module

            out.transform = train_transform(self, augment)
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


def digits_bundle(img_size: int, in_chans: int, ood: bool, augment: bool, compound: bool = False) -> DataBundle:
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


def synthetic_bundle(img_size: int, in_chans: int, ood: bool, augment: bool, seed: int) -> DataBundle:
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
