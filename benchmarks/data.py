"""Training-loader throughput on real JPEGs: monomod's ``make_loader`` against timm's ``create_loader``.

The benchmark writes its own ImageFolder: 256x320 crops (ImageNet-like) of scikit-learn's two sample photographs,
saved as JPEG (quality 90), no download. Both loaders decode, apply the ``paper`` preset's augmentation (random
resized crop to 224, flip, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25 in pixel mode, bicubic,
ImageNet mean/std) and collate batches of 32, on the CPU, at 0, 1 and 2 loader workers. One epoch is timed from
creating the loader to its last batch (worker start-up included, as a training epoch pays it); monomod and timm
alternate, and the table gives the median images/s of the repeats.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

WORKERS = (0, 1, 2)
IMG_SIZE, BATCH = 224, 32
AUTO_AUGMENT, REPROB, COLOR_JITTER = "rand-m9-mstd0.5-inc1", 0.25, 0.4


def write_folder(root: Path, per_class: int, classes: int = 4) -> Path:
    """``root/train/<class>/*.jpg``: random 256x320 crops of the sample photos (427x640), flipped at random."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo = photos[(c + i) % len(photos)]
            top, left = rng.integers(0, photo.shape[0] - 256), rng.integers(0, photo.shape[1] - 320)
            crop = photo[top:top + 256, left:left + 320]
            Image.fromarray(crop[:, ::-1] if rng.random() < 0.5 else crop).save(folder / f"{i}.jpg", quality=90)
    return root


def monomod_epoch(root: Path, workers: int) -> Callable[[], int]:
    from monomod.data import Augment, load_data, make_loader

    bundle = load_data(f"imagefolder:{root}", img_size=IMG_SIZE, in_chans=3, ood=None,
                       data_config={"interpolation": "bicubic"})
    train = bundle.train_with(Augment(auto_augment=AUTO_AUGMENT, color_jitter=COLOR_JITTER, reprob=REPROB))

    def epoch() -> int:
        loader = make_loader(train, batch_size=BATCH, shuffle=True, seed=0, epoch=0, num_workers=workers)
        return sum(len(x) for x, _ in loader)

    return epoch


def timm_epoch(root: Path, workers: int) -> Callable[[], int]:
    import torch
    from timm.data import create_dataset, create_loader

    from monomod.data import cap_rand_augment

    dataset = create_dataset("", root=str(root / "train"), is_training=True)

    def epoch() -> int:
        loader = create_loader(
            dataset, input_size=(3, IMG_SIZE, IMG_SIZE), batch_size=BATCH, is_training=True, re_prob=REPROB,
            re_mode="pixel", auto_augment=AUTO_AUGMENT, color_jitter=COLOR_JITTER, interpolation="bicubic",
            num_workers=workers, use_prefetcher=False, device=torch.device("cpu"), persistent_workers=False,
        )
        cap_rand_augment(loader.dataset.transform)  # the same Pillow 13 fix monomod applies
        return sum(len(x) for x, _ in loader)

    return epoch


def run(quick: bool = False) -> dict[str, Any]:
    per_class, repeats = (16, 1) if quick else (96, 5)
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine takes cores the workers would use
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp), per_class)
        (root / "val").symlink_to(root / "train")  # monomod's image folders need a val/ split
        images = 4 * per_class
        for workers in WORKERS:
            epochs = {"monomod": monomod_epoch(root, workers), "timm": timm_epoch(root, workers)}
            times: dict[str, list[float]] = {name: [] for name in epochs}
            for _ in range(repeats):
                for name, epoch in epochs.items():  # alternate, so load on the machine hits both alike
                    started = time.perf_counter()
                    assert epoch() == images
                    times[name].append(time.perf_counter() - started)
            row = {"workers": workers, **{name: round(images / statistics.median(t), 1) for name, t in times.items()}}
            rows.append(row)
            print(f"  workers={workers}: monomod {row['monomod']} img/s, timm {row['timm']} img/s", flush=True)
    for row in rows:
        row["monomod_vs_timm"] = round(row["monomod"] / row["timm"], 2)
        row["monomod_vs_0_workers"] = round(row["monomod"] / rows[0]["monomod"], 2)
    return {"rows": rows, "images": images, "repeats": repeats, "img_size": IMG_SIZE, "batch_size": BATCH,
            "load_average": [load_before, round(os.getloadavg()[0], 2)]}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['images']} JPEGs of 256x320 -> {result['img_size']} px, batch {result['batch_size']}, paper "
             f"augmentation (RandAugment m9, erasing 0.25, bicubic); median of {result['repeats']} epochs.", "",
             "| loader workers | monomod (img/s) | timm (img/s) | monomod / timm | monomod vs 0 workers |",
             "|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['workers']} | {r['monomod']} | {r['timm']} | {r['monomod_vs_timm']} | "
                     f"{r['monomod_vs_0_workers']} |")
    rows = result["rows"]
    at_par = all(r["monomod_vs_timm"] >= 1.0 for r in rows)
    lines += ["", f"Goals: monomod >= timm at every worker count: {'met' if at_par else 'not met'} "
              f"(ratios {', '.join(str(r['monomod_vs_timm']) for r in rows)}); >= 1.7x from 0 to 2 workers: "
              f"{rows[-1]['monomod_vs_0_workers']}x. Each epoch includes starting its workers, as in training. "
              f"1-minute load average before / after: {result.get('load_average', '?')} on this many cores: "
              f"{os.cpu_count()}."]
    return "\n".join(lines) + "\n"
