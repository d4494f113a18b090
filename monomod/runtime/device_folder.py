"""Image folders on the device input path (``--input-path device``): the loader's workers only read each file's
bytes; the device decodes a batch at a time (nvJPEG through ``torchvision.io.decode_jpeg`` on CUDA, in one call per
batch; other formats, and JPEGs nvJPEG refuses, on the CPU), crops, flips and resizes each image, then normalises
and erases the batch as ``monomod.runtime.device_data`` does. On CUDA the next batch is prepared on a side stream
while the model computes on this one (``Prefetcher``, as timm's ``PrefetchLoader``).

Each image is cropped as timm's ``RandomResizedCropAndInterpolation`` crops it (area fraction in ``scale``,
log-uniform aspect ratio in ``ratio``, ten tries, then a centre crop within the ratio bounds) and resized with the
teacher's interpolation, antialiased, one image at a time: the images differ in size, and one batched
``grid_sample`` would not antialias a downscale. Every random number comes from ``sample_uniforms(seed, index)``, so a
sample is augmented the same in any batch, worker count or device, and a resumed job sees exactly its batches.

``--input-path cached`` decodes every training image once instead (``load_cache``): resized so its shorter side is
the size timm's eval transform resizes to (``img_size / crop_pct``), centre-cropped to a square, kept as one uint8
tensor on the device and saved in ``RUN_DIR/cache`` for the next job. Batches then skip reading and decoding;
the random resized crop works on the square (what lies outside it is never seen, as with any pre-resized set).

RandAugment runs after the crop, on the uint8 batch, as timm runs it on the cropped image
(``monomod.runtime.device_randaugment``). Colour jitter alone (without RandAugment, which makes timm drop it) has no
device form yet: ``check_device_augment`` refuses ``--input-path device`` for it at compile time and names the fix.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from monomod.data import DataBundle, derive_seed, make_loader
from monomod.errors import MonomodError
from monomod.io import atomic_save_tensors
from monomod.runtime.device_data import BatchAugment, finish_batch, sample_uniforms
from monomod.runtime.device_randaugment import RandAugmentSpec, parse_rand_augment, rand_augment_batch

log = logging.getLogger(__name__)
_TRIES = 10  # timm's RandomResizedCropAndInterpolation.get_params
_JPEG_MAGIC = (0xFF, 0xD8)


class FileBytes(Dataset):
    """``(bytes, label, index)`` of an image folder's ``samples``: what a loader worker does on the device path
    (read, nothing else)."""

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        path, label = self.samples[index]
        return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8), label, index


def collate_bytes(items: list[tuple[Tensor, int, int]]) -> tuple[list[Tensor], Tensor, Tensor]:
    blobs, labels, indices = zip(*items)
    return list(blobs), torch.tensor(labels), torch.tensor(indices)


def decode_batch(blobs: list[Tensor], device: torch.device, in_chans: int) -> list[Tensor]:
    """uint8 ``[in_chans, H, W]`` images on ``device``: the JPEGs in one ``decode_jpeg`` call there, the rest (and
    every JPEG of a batch that call refuses, such as CMYK on nvJPEG) one by one on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders for TorchCodec
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB
        jpegs = [k for k, b in enumerate(blobs) if len(b) > 1 and (int(b[0]), int(b[1])) == _JPEG_MAGIC]
        out: list[Tensor | None] = [None] * len(blobs)
        try:
            for k, image in zip(jpegs, decode_jpeg([blobs[k] for k in jpegs], mode=mode, device=device) if jpegs else []):
                out[k] = image
        except RuntimeError:
            pass  # decoded below, one by one on the CPU
        for k, blob in enumerate(blobs):
            if out[k] is None:
                out[k] = _decode_on_cpu(blob, mode, decode_image).to(device)
    return out  # type: ignore[return-value]


def _decode_on_cpu(blob: Tensor, mode: Any, decode_image: Callable) -> Tensor:
    try:
        return decode_image(blob, mode=mode)
    except RuntimeError:  # a format torchvision does not read (BMP, TIFF, ...): Pillow, as the CPU path
        import io

        import numpy as np
        from PIL import Image

        image = Image.open(io.BytesIO(blob.numpy().tobytes())).convert("L" if mode.name == "GRAY" else "RGB")
        array = np.asarray(image)
        return torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)


def crop_boxes(u: Tensor, sizes: list[tuple[int, int]], scale: tuple[float, float],
               ratio: tuple[float, float]) -> list[tuple[int, int, int, int]]:
    """``(top, left, height, width)`` per image, as timm's random resized crop draws it, from that image's
    uniforms ``u[k]`` (``4 * _TRIES`` of them)."""
    low, high = math.log(ratio[0]), math.log(ratio[1])
    boxes = []
    for row, (height, width) in zip(u.tolist(), sizes):
        boxes.append(_centre_box(height, width, ratio))
        for t in range(_TRIES):
            a, r, y, x = row[4 * t:4 * t + 4]
            area = height * width * (scale[0] + a * (scale[1] - scale[0]))
            aspect = math.exp(low + r * (high - low))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                boxes[-1] = (int(y * (height - h + 1)), int(x * (width - w + 1)), h, w)
                break
    return boxes


def _centre_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """timm's fallback: the whole image, cut to the ratio bounds, centred."""
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, round(width / min(ratio))
    elif aspect > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_and_resize(images: list[Tensor], boxes: list[tuple[int, int, int, int]], flips: list[bool], size: int,
                    interpolation: str) -> Tensor:
    """uint8 ``[B, C, size, size]``, as Pillow's resize gives: each image's box, resized (antialiased) and flipped
    where asked."""
    mode = interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"
    out = []
    for image, (top, left, h, w), flip in zip(images, boxes, flips):
        crop = image[:, top:top + h, left:left + w].unsqueeze(0).float()
        crop = F.interpolate(crop, size=(size, size), mode=mode, align_corners=False, antialias=True)
        out.append(crop.flip(-1) if flip else crop)
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)  # bicubic overshoots; Pillow clamps


class FolderBatches:
    """One epoch of an image folder on the device: ``make_loader``'s order over the files' bytes (read by the
    loader's workers), each batch decoded and augmented on ``device``, one batch ahead on CUDA."""

    def __init__(self, files: Iterable, bundle: DataBundle, augment: tuple[BatchAugment, RandAugmentSpec | None], *,
                 seed: int, epoch: int, device: torch.device, cache: tuple[Tensor, Tensor] | None = None) -> None:
        self.files, self.bundle, self.device, self.cache = files, bundle, device, cache
        self.augment, self.rand_augment = augment
        self.fill = torch.tensor([min(255, round(255 * m)) for m in bundle.mean], device=device)  # timm's img_mean
        self.epoch_seed = derive_seed(seed, epoch, 1)
        self.mean = torch.tensor(bundle.mean, device=device)
        self.std = torch.tensor(bundle.std, device=device)

    def __len__(self) -> int:
        return len(self.files)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(Prefetcher(self.files, self.prepare, self.device))

    def prepare(self, batch: tuple[list[Tensor], Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        blobs, labels, indices = batch
        if self.cache is None:
            images = decode_batch(blobs, self.device, self.bundle.in_chans)
        else:  # pre-resized, already on the device
            on_device = indices.to(self.device)
            images, labels = list(self.cache[0][on_device]), self.cache[1][on_device]
        u = sample_uniforms(self.epoch_seed, indices, 4 * _TRIES + 1)
        boxes = crop_boxes(u[:, :4 * _TRIES], [tuple(i.shape[-2:]) for i in images], self.augment.crop_scale,
                           self.augment.crop_ratio)
        flips = (u[:, -1] < self.augment.hflip).tolist()
        x = crop_and_resize(images, boxes, flips, self.bundle.img_size, self.bundle.interpolation)
        if self.rand_augment is not None:
            u = sample_uniforms(self.epoch_seed + 3, indices, self.rand_augment.draws)
            x = rand_augment_batch(x, u, self.rand_augment, self.fill)
        indices = indices.to(self.device)
        x = finish_batch(x.float().div_(255.0), indices, self.epoch_seed, self.augment, mean=self.mean, std=self.std,
                         in_chans=self.bundle.in_chans)
        return x, labels.to(self.device, non_blocking=True)


class Prefetcher:
    """``prepare(batch)`` for each batch of ``batches``; on CUDA the next one is prepared on a side stream while the
    caller computes on this one (the idea of timm's ``PrefetchLoader``), elsewhere in turn."""

    def __init__(self, batches: Iterable, prepare: Callable[[Any], tuple[Tensor, Tensor]],
                 device: torch.device) -> None:
        self.batches, self.prepare, self.device = batches, prepare, device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.device.type != "cuda":
            yield from map(self.prepare, self.batches)
            return
        stream, ahead = torch.cuda.Stream(self.device), None
        for batch in self.batches:
            with torch.cuda.stream(stream):
                ready, done = self.prepare(batch), torch.cuda.Event()
                done.record(stream)
            if ahead is not None:
                yield self._handed_over(*ahead)
            ahead = ready, done
        if ahead is not None:
            yield self._handed_over(*ahead)

    def _handed_over(self, tensors: tuple[Tensor, Tensor], done: torch.cuda.Event) -> tuple[Tensor, Tensor]:
        """The batch, once its preparation on the side stream is done, owned by the caller's stream from now on."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        for tensor in tensors:
            tensor.record_stream(current)  # not reused by the side stream's allocator before the caller is done
        return tensors


def folder_augment(augment: Any) -> tuple[BatchAugment, RandAugmentSpec | None]:
    """The device form of a folder's training augmentation (``monomod.data.Augment``): timm's random resized crop
    and flip, its RandAugment, and random erasing. Colour jitter alone has none yet: refused by name (with
    RandAugment on, timm leaves it off, and so does this path)."""
    from monomod.data import RAND_AUGMENT_MAGNITUDE_CAP

    policy = getattr(augment, "auto_augment", None)
    if not policy and getattr(augment, "color_jitter", 0.0):
        raise MonomodError("the device input path has no form of colour jitter yet",
                           "use --input-path cpu, or --set color_jitter=0")
    spec = parse_rand_augment(policy, RAND_AUGMENT_MAGNITUDE_CAP) if policy else None
    return BatchAugment(crop=True, reprob=float(getattr(augment, "reprob", 0.0) or 0.0)), spec


def check_device_augment(train_configs: Iterable[dict[str, Any]]) -> None:
    """Refuse, at compile time, a plan on the device path whose jobs ask for augmentation it has no form of."""
    from monomod.data import Augment

    for cfg in train_configs:
        folder_augment(Augment(auto_augment=cfg.get("auto_augment"), color_jitter=cfg.get("color_jitter") or 0.0))


def folder_loader(dataset: Any, bundle: DataBundle, augment: Any, batch_size: int, *, shuffle: bool, seed: int,
                  device: torch.device, workers: int,
                  cache_at: Callable[[str], Path] | None = None) -> Callable[[int], FolderBatches]:
    """``make_loader(epoch)`` of the device path for an image folder's training split (``RunContext.loader``);
    with ``cache_at`` (``--input-path cached``: the file of a cache key), over the pre-resized copy kept there and on
    the device."""
    aug, files = folder_augment(augment), FileBytes(dataset.samples)
    cache = None
    if cache_at is not None:
        cache, files, workers = load_cache(dataset, bundle, device, workers, cache_at), _Indices(len(files)), 0
    drop_last = shuffle and len(files) > batch_size
    return lambda epoch: FolderBatches(
        make_loader(files, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last,
                    num_workers=workers, collate_fn=collate_bytes),
        bundle, aug, seed=seed, epoch=epoch, device=device, cache=cache)


class _Indices(Dataset):
    """``(nothing, 0, index)``: the batches' order alone, for the cached path (images and labels are on the device)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return torch.empty(0, dtype=torch.uint8), 0, index


CACHE_FORMAT = 1  # bump when what a cache file holds changes: old files are then rebuilt, never misread
_LOADED: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}  # the last cache this process loaded, per device


def cache_side(bundle: DataBundle) -> int:
    """The cached images' side: what timm's eval transform resizes the shorter side to before its centre crop."""
    return math.floor(bundle.img_size / bundle.crop_pct)


def load_cache(dataset: Any, bundle: DataBundle, device: torch.device, workers: int,
               cache_at: Callable[[str], Path]) -> tuple[Tensor, Tensor]:
    """The training split's images, decoded once, resized and centre-cropped (uint8 ``[N, C, S, S]``), and their
    labels, on ``device``: from this process's last load, else from the file ``cache_at(key)``, else built (and
    saved there)."""
    from safetensors.torch import load_file

    side = cache_side(bundle)
    key = _cache_key(dataset.samples, side, bundle)
    if (key, str(device)) in _LOADED:
        return _LOADED[key, str(device)]
    _check_fits(len(dataset) * bundle.in_chans * side * side, device)
    path = cache_at(key)
    if path.is_file():
        tensors = load_file(str(path))
        images, labels = tensors["images"], tensors["labels"]
    else:
        log.info("decoding the %d training images once into a %d px cache (%s)", len(dataset), side, path)
        started = time.perf_counter()
        images, labels = build_cache(dataset, bundle, side, workers)
        atomic_save_tensors(path, {"images": images, "labels": labels})
        log.info("image cache built in %.1f s", time.perf_counter() - started)
    _LOADED.clear()  # one cache held at a time: a run trains on one folder
    _LOADED[key, str(device)] = images.to(device), labels.to(device)
    return _LOADED[key, str(device)]


def _cache_key(samples: Sequence[tuple[str, int]], side: int, bundle: DataBundle) -> str:
    """A digest of what the cache depends on: each file's path, label, size and modification time, and how it is
    resized. An edited, added or removed image makes a new cache."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, side, bundle.in_chans, bundle.interpolation]).encode())
    for path, label in samples:
        status = os.stat(path)
        digest.update(f"{path}\0{label}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _check_fits(size: int, device: torch.device) -> None:
    """Refuse a cache larger than half the memory free where it is to live, before decoding anything."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # no such query here (macOS, Windows): nothing to check
            return
    if size > free / 2:
        raise MonomodError(f"the pre-resized image cache needs {size / 2**30:.1f} GiB, more than half the "
                           f"{free / 2**30:.1f} GiB free on {device}",
                           "use --input-path device (decodes each batch) or a smaller --img-size")


def build_cache(dataset: Any, bundle: DataBundle, side: int, workers: int) -> tuple[Tensor, Tensor]:
    """Every image of ``dataset`` (an image folder) resized as timm's eval transform resizes it (shorter side to
    ``side``, the bundle's interpolation) and centre-cropped to ``side`` x ``side``, decoded by ``workers``; an
    unreadable file is replaced by the next as the folder does it on the CPU path, so labels come from the folder."""
    from timm.data.transforms import str_to_interp_mode
    from torchvision.transforms import CenterCrop, Compose, PILToTensor, Resize

    source = copy.copy(dataset)
    source.transform = Compose([Resize(side, interpolation=str_to_interp_mode(bundle.interpolation)),
                                CenterCrop(side), PILToTensor()])
    images = torch.empty((len(source), bundle.in_chans, side, side), dtype=torch.uint8)
    labels = torch.empty(len(source), dtype=torch.int64)
    done = 0
    for x, y in make_loader(source, batch_size=256, shuffle=False, seed=0, num_workers=workers):
        images[done:done + len(y)], labels[done:done + len(y)] = x, y
        done += len(y)
    return images, labels
