"""Image folders (``imagefolder:PATH``): listing and reading images (unreadable ones skipped and named once), and
timm's transforms with the teacher's own normalisation, interpolation and crop."""
from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from monomod.errors import MonomodError
from monomod.data.sets import Augment, DataBundle, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


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


def train_transform(bundle: DataBundle, augment: Augment) -> Any:
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


def imagefolder_bundle(path: str, img_size: int, in_chans: int, augment: bool,
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
        train.transform = train_transform(bundle, Augment())
    return bundle


def ood_folder_set(path: str, bundle: DataBundle) -> Dataset:
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
