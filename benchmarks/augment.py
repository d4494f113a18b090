"""Batched augmentation on the training device: monomod's own ops against the libraries issue 26 named.

One batch of uint8 images -> normalised float images, with timm's training augmentation: a random resized crop
(area 0.08-1, ratio 3/4-4/3, bilinear), a horizontal flip (p 0.5) and random erasing (p 0.25). Every sample must get
its own random numbers, as the CPU path's per-image transforms give it:

* ``monomod``: ``runtime.device_data.augment_batch``, one ``affine_grid`` + ``grid_sample`` for the whole batch,
  numbers hashed from ``(seed, index)`` (what makes a resumed job see exactly its batches);
* ``kornia``: ``kornia.augmentation`` (per-sample parameters, its own generator), when kornia is installed (it is not
  a dependency: ``pip install kornia`` to measure it);
* ``torchvision v2, per sample``: ``transforms.v2`` called once per image, since one call draws one set of
  parameters;
* ``torchvision v2, per batch``: one call for the whole batch, every image cropped alike. Not a valid augmentation;
  the row is the speed a shared draw would buy.

Settings: the digits' size (32 px from 32x32, batch 128) and ImageNet's (224 px from 256x256, batch 64). Median
images/s over interleaved rounds. ``python -m benchmarks.run --only augment``.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from monomod.runtime.device_data import BatchAugment, augment_batch

SETTINGS = {"32 px from 32x32": (32, 32, 128), "224 px from 256x256": (256, 224, 64)}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REPROB = 0.25


def run(quick: bool = False) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rounds, batches = (2, 2) if quick else (5, 8)
    rows = []
    for setting, (source, size, batch) in SETTINGS.items():
        images = torch.randint(0, 256, (batch, 3, source, source), dtype=torch.uint8, device=device)
        ways = _ways(size, device)
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, augment in ways.items():
                seconds[name].append(_time(augment, images, batches, device))
        rows += [{"setting": setting, "library": name, "batch": batch, "device": device.type,
                  "images_per_s": round(batch / statistics.median(s), 1)} for name, s in seconds.items()]
    return {"rows": rows, "threads": torch.get_num_threads()}


def _ways(size: int, device: torch.device) -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    mean, std = torch.tensor(MEAN, device=device), torch.tensor(STD, device=device)
    ours = BatchAugment(crop=True, reprob=REPROB)

    def monomod(images: torch.Tensor, step: int) -> torch.Tensor:
        indices = torch.arange(len(images), device=device) + step * len(images)
        return augment_batch(images, indices, 0, ours, size=size, mean=mean, std=std, in_chans=3)

    ways = {"monomod (one grid_sample per batch, hashed numbers)": monomod}
    kornia = _kornia(size, device)
    if kornia is not None:
        ways["kornia.augmentation (per-sample parameters)"] = kornia
    one = _torchvision(size)
    ways["torchvision v2, one call per image"] = lambda images, step: torch.stack([one(image) for image in images])
    ways["torchvision v2, one call per batch (one crop for all: not valid)"] = lambda images, step: one(images)
    return ways


def _kornia(size: int, device: torch.device) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    pipeline = K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)), K.RandomHorizontalFlip(),
        K.Normalize(torch.tensor(MEAN), torch.tensor(STD)), K.RandomErasing(p=REPROB)).to(device)
    return lambda images, step: pipeline(images.float().div(255.0))


def _torchvision(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD),
                       v2.RandomErasing(p=REPROB, value="random")])


def _time(augment: Callable[[torch.Tensor, int], torch.Tensor], images: torch.Tensor, batches: int,
          device: torch.device) -> float:
    """Seconds per batch over ``batches`` calls, after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    augment(images, 0)
    sync()
    started = time.perf_counter()
    for step in range(batches):
        augment(images, step + 1)
    sync()
    return (time.perf_counter() - started) / batches


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['threads']} torch threads. The same augmentation on every row (random resized crop, flip, "
             "normalise, random erasing p 0.25; kornia erases with zeros, the others with normal noise), from uint8 "
             "batches already on the device to normalised float batches.", "",
             "| setting | library | device | batch | images/s (median) |", "|---|---|---|---:|---:|"]
    lines += [f"| {r['setting']} | {r['library']} | {r['device']} | {r['batch']} | {r['images_per_s']} |"
              for r in result["rows"]]
    return "\n".join(lines) + "\n"
