"""A device-resident input path: an in-memory data set kept as uint8 images on the training device and augmented
there, a whole batch per call, instead of image by image on the CPU (issue 26: on a GPU the jobs wait for their
input).

- ``DeviceImages``: a ``monomod.data.TensorImageDataset`` (the digits, the synthetic set, any set that fits the
  device) moved to the device once, uint8.
- ``augment_batch``: one ``affine_grid`` + ``grid_sample`` per batch applies each sample's own geometric
  augmentation (the digits' small rotate/scale/shift, the same ranges as ``monomod.data.RandomShiftAffine``; or
  timm's random resized crop, scale (0.08, 1), ratio (3/4, 4/3), with a horizontal flip), then normalisation and
  random erasing in timm's "pixel" mode. Mixup and CutMix stay with the training loop (timm's ``Mixup``, which
  runs on device tensors already).
- ``DeviceLoader``: the batches of one epoch in the same order as ``monomod.data.make_loader`` (the permutation
  of ``(seed, epoch)``), each sample's augmentation drawn from a counter-based hash of ``(seed, epoch, index)``,
  so a sample is augmented the same whatever batch it falls in and a resumed job sees exactly its batches.

Own ops rather than torchvision v2 or kornia (``python -m benchmarks.run --only augment``): v2's random transforms
draw one set of parameters per call, so per-sample augmentation takes one call per image (on a GPU, a launch
sequence per image); kornia draws per sample but from torch's generator, so a sample's augmentation depends on its
batch and a resumed job would not see its batches again. Neither hashes ``(seed, index)``. On the 2-core CPU, at 32
px this path ran 2.5x kornia and 6.7x v2 per image; at 224 px 1.8x kornia, and v2 per image ran 1.4x this path
(it crops a view and resizes only the crop; a GPU figure is still to be measured). Image folders are
decoded, cropped and RandAugmented on the device by ``monomod.runtime.device_folder``; colour jitter alone has no
device form yet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from monomod.data import TensorImageDataset, derive_seed
from monomod.errors import MonomodError
from monomod.runtime.config import resolve_device

_MASK32 = 0xFFFFFFFF


def _pcg(x: Tensor) -> Tensor:
    """One round of the PCG output hash on 32-bit words held in int64 (products stay below 2**63)."""
    x = (x * 747796405 + 2891336453) & _MASK32
    word = (((x >> ((x >> 28) + 4)) ^ x) * 277803737) & _MASK32
    return (word >> 22) ^ word


def sample_uniforms(seed: int, indices: Tensor, count: int) -> Tensor:
    """``[len(indices), count]`` uniforms in [0, 1), a pure function of ``(seed, index)``: the same sample gets the
    same numbers whichever batch, position or device it is drawn in."""
    key = torch.tensor(derive_seed(seed) & _MASK32, dtype=torch.int64, device=indices.device)
    x = _pcg(indices.long() & _MASK32 ^ key)
    columns = []
    for _ in range(count):
        x = _pcg(x ^ key)
        columns.append(x)
    return torch.stack(columns, dim=1).double().div(2.0**32).float()


@dataclass(frozen=True)
class BatchAugment:
    """What ``augment_batch`` does. ``shift``: the digits' light augmentation (degrees, scale, max shift in
    pixels); ``crop``: timm's random resized crop and flip (an image folder's); ``reprob``: random erasing."""

    shift: tuple[float, float, int] | None = None
    crop: bool = False
    hflip: float = 0.5
    reprob: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)


def _shift_theta(u: Tensor, aug: BatchAugment, size: int) -> Tensor:
    """Per sample: rotate by up to ``degrees``, scale by ``1 ± scale``, translate by whole pixels (as
    ``RandomShiftAffine``), as the inverse map ``affine_grid`` wants (output -> input, normalised coordinates)."""
    degrees, scale, max_shift = aug.shift  # type: ignore[misc]
    angle = torch.deg2rad((u[:, 0] * 2 - 1) * degrees)
    zoom = 1 + (u[:, 1] * 2 - 1) * scale
    shift = (torch.floor(u[:, 2:4] * (2 * max_shift + 1)) - max_shift) * (2.0 / size)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    inverse = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (R S)^-1
    offset = -(inverse @ shift.unsqueeze(-1))
    return torch.cat([inverse, offset], dim=2)


def _crop_theta(u: Tensor, aug: BatchAugment) -> Tensor:
    """Per sample: a crop of area fraction in ``crop_scale`` and aspect ratio in ``crop_ratio`` (log-uniform), its
    sides capped at the image's, placed uniformly, flipped with probability ``hflip``."""
    area = aug.crop_scale[0] + u[:, 0] * (aug.crop_scale[1] - aug.crop_scale[0])
    low, high = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    ratio = torch.exp(low + u[:, 1] * (high - low))
    w, h = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
    cx, cy = (u[:, 2] * 2 - 1) * (1 - w), (u[:, 3] * 2 - 1) * (1 - h)
    flip = torch.where(u[:, 4] < aug.hflip, -1.0, 1.0)
    zero = torch.zeros_like(w)
    return torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)


def _erase_mask(shape: torch.Size, u: Tensor) -> Tensor:
    """timm's random erasing rectangle per sample, batched: 2-33 % of the area, aspect ratio log-uniform in
    (0.3, 3.3), placed uniformly; a bool mask ``[B, 1, H, W]``."""
    height, width = shape[-2:]
    area = (0.02 + u[:, 1] * (1 / 3 - 0.02)) * height * width
    ratio = torch.exp(math.log(0.3) + u[:, 2] * (math.log(1 / 0.3) - math.log(0.3)))
    h = torch.sqrt(area * ratio).round().clamp(1, height)
    w = torch.sqrt(area / ratio).round().clamp(1, width)
    top = torch.floor(u[:, 3] * (height - h + 1))
    left = torch.floor(u[:, 4] * (width - w + 1))
    rows = torch.arange(height, device=u.device).view(1, -1, 1)
    cols = torch.arange(width, device=u.device).view(1, 1, -1)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
    return inside.unsqueeze(1)


def augment_batch(images: Tensor, indices: Tensor, seed: int, aug: BatchAugment | None, *, size: int,
                  mean: Tensor, std: Tensor, in_chans: int) -> Tensor:
    """uint8 ``[B, c, H, W]`` -> normalised float ``[B, in_chans, size, size]`` on the images' device, each
    sample augmented by the numbers of ``(seed, index)`` (``aug=None``: resized only, for evaluation)."""
    x = images.float().div_(255.0)
    b = x.shape[0]
    if aug is not None and (aug.shift or aug.crop):
        u = sample_uniforms(seed, indices, 5)
        theta = _crop_theta(u, aug) if aug.crop else _shift_theta(u, aug, size)
        grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    elif x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return finish_batch(x, indices, seed, aug, mean=mean, std=std, in_chans=in_chans)


def finish_batch(x: Tensor, indices: Tensor, seed: int, aug: BatchAugment | None, *, mean: Tensor, std: Tensor,
                 in_chans: int) -> Tensor:
    """The augmented batch in [0, 1] (a fresh tensor: normalised in place) -> normalised, then randomly erased by
    the numbers of ``(seed, index)``: the last steps of every device path (in-memory sets here, image folders in
    ``device_folder``)."""
    if x.shape[1] != in_chans:
        x = x.expand(-1, in_chans, -1, -1).contiguous()
    x = x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))  # in place: x is the caller's fresh batch
    if aug is not None and aug.reprob > 0:
        u = sample_uniforms(seed + 1, indices, 5)
        rows = torch.nonzero(u[:, 0] < aug.reprob).flatten()
        if len(rows):  # timm's "pixel" mode: normal noise, hashed only where it lands (the hash is the cost)
            mask = _erase_mask(x.shape, u[rows]).expand(-1, x.shape[1], -1, -1)
            row, channel, top, left = mask.nonzero(as_tuple=True)
            element = (channel * x.shape[2] + top) * x.shape[3] + left
            x[rows[row], channel, top, left] = _normals(seed + 2, indices[rows][row], element)
    return x


def sample_normals(seed: int, indices: Tensor, shape: torch.Size) -> Tensor:
    """``[len(indices), *shape]`` standard normals (Box-Muller), a pure function of ``(seed, index, element)``."""
    element = torch.arange(math.prod(shape), dtype=torch.int64, device=indices.device).view(shape)
    return _normals(seed, indices.view(-1, *([1] * len(shape))), element)


def _normals(seed: int, indices: Tensor, element: Tensor) -> Tensor:
    """Standard normals of the (broadcast) sample ``indices`` and flat ``element`` positions."""
    key = derive_seed(seed) & _MASK32
    per_sample = _pcg((indices.long() & _MASK32) ^ key)
    first = _pcg(_pcg(per_sample ^ element) ^ key)
    second = _pcg(first ^ key)
    u1 = (first.double() + 1).div(2.0**32 + 1)  # in (0, 1): the log stays finite
    u2 = second.double().div(2.0**32)
    return (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).float()


def batch_augment_for(dataset: TensorImageDataset) -> BatchAugment | None:
    """The batched form of what ``dataset`` does per image on the CPU: its ``RandomShiftAffine`` (the same
    ranges) and its random erasing (the same probability); None when it does neither."""
    from monomod.data import RandomShiftAffine

    shift = dataset.augment
    reprob = float(getattr(dataset.erase, "probability", 0.0)) if dataset.erase is not None else 0.0
    if shift is None and not reprob:
        return None
    if shift is not None and not isinstance(shift, RandomShiftAffine):
        raise MonomodError(f"the device input path has no batched form of {type(shift).__name__}",
                           "use --input-path cpu for this data set")
    return BatchAugment(shift=(shift.degrees, shift.scale, shift.max_shift) if shift is not None else None,
                        reprob=reprob)


class DeviceImages:
    """An in-memory data set's uint8 images and labels, moved to ``device`` once."""

    def __init__(self, dataset: TensorImageDataset, device: torch.device | str) -> None:
        if not isinstance(dataset, TensorImageDataset):
            raise MonomodError(f"DeviceImages needs an in-memory data set, got {type(dataset).__name__}",
                               "give image folders to monomod.runtime.device_folder.folder_loader")
        self.images = dataset.images.to(device)
        self.labels = dataset.labels.to(device)
        self.mean, self.std = dataset.mean.flatten().to(device), dataset.std.flatten().to(device)
        self.in_chans, self.size = dataset.in_chans, int(dataset.images.shape[-1])

    def __len__(self) -> int:
        return len(self.labels)


class DeviceLoader:
    """The batches of one epoch on the device: ``make_loader``'s order, each sample augmented by its own numbers.
    Iterating it twice gives the same batches."""

    def __init__(self, data: DeviceImages, *, batch_size: int, shuffle: bool, seed: int, epoch: int = 0,
                 drop_last: bool = False, augment: BatchAugment | None = None) -> None:
        self.data, self.batch_size, self.drop_last, self.augment = data, batch_size, drop_last, augment
        self.shuffle, self.epoch_seed = shuffle, derive_seed(seed, epoch, 1)
        self.order_seed = derive_seed(seed, epoch, 0)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.data)
        if self.shuffle:  # the permutation make_loader's sampler draws, on the CPU, then moved
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.order_seed))
        else:
            order = torch.arange(n)
        order = order.to(self.data.labels.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            indices = order[start:start + self.batch_size]
            d = self.data
            x = augment_batch(d.images[indices], indices, self.epoch_seed, self.augment, size=d.size, mean=d.mean,
                              std=d.std, in_chans=d.in_chans)
            yield x, d.labels[indices]


def resolve_input_path(path: str, *data: str | None, device: torch.device | str | None = None) -> str:
    """``cpu``, ``device`` or ``cached`` for the data sets given (``--data``, ``--distill-data``): ``input_path_for``."""
    from monomod.data import parse_data_spec

    folder = any(parse_data_spec(spec).kind == "imagefolder" for spec in data if spec)
    return input_path_for(path, in_memory=not folder, device=device)


# ``--input-path auto`` takes the device path on CUDA for these kinds of data. Image folders keep the CPU path under
# auto until decoding on the GPU is measured faster there (benchmarks/RESULTS.md): one entry flips them.
AUTO_DEVICE_INPUT = {"in_memory": True, "imagefolder": False}


def input_path_for(path: str, *, in_memory: bool, device: torch.device | str | None = None) -> str:
    """The one rule behind ``resolve_input_path``, for data already loaded (``in_memory``: no image folder):
    ``auto`` is the device path on CUDA where ``AUTO_DEVICE_INPUT`` says so, the CPU path elsewhere; ``cpu`` and
    ``device`` are taken as asked (the device path decodes image folders there: ``device_folder``); ``cached`` is
    the device path, from a pre-resized copy for an image folder (an in-memory set is one already)."""
    if path == "cached" and in_memory:
        return "device"
    if path != "auto":
        return path
    on_cuda = torch.device(device if device is not None else resolve_device("auto")).type == "cuda"
    return "device" if on_cuda and AUTO_DEVICE_INPUT["in_memory" if in_memory else "imagefolder"] else "cpu"


def device_loader(dataset: TensorImageDataset, batch_size: int, *, shuffle: bool, seed: int,
                  device: torch.device) -> Callable[[int], DeviceLoader]:
    """``make_loader(epoch)`` of the device path (``RunContext.loader``): the data set moved to ``device`` once,
    its augmentation in batched form."""
    data, augment = DeviceImages(dataset, device), batch_augment_for(dataset)
    return lambda epoch: DeviceLoader(data, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                      drop_last=shuffle and len(data) > batch_size, augment=augment)
