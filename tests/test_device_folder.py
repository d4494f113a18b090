"""Image folders on the device input path, with the CPU as the device (the same code decodes with nvJPEG on CUDA):
decoding like Pillow, crops drawn like timm's, batches a pure function of (seed, epoch, index) whatever the
workers, and the compile-time refusal of augmentation it has no form of."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from monomod.data import Augment, load_data
from monomod.errors import MonomodError
from monomod.runtime.device_data import BatchAugment
from monomod.runtime.device_folder import (
    FileBytes, collate_bytes, crop_and_resize, crop_boxes, decode_batch, folder_augment, folder_loader,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """The first 120 digits as JPEG (train) and PNG (val) files of varied sizes, 10 class folders."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images[:120], digits.target[:120])):
        split, suffix = ("train", "jpg") if i < 100 else ("val", "png")
        pixels = np.repeat((image * 255 / 16).astype(np.uint8)[..., None], 3, axis=2)
        size = (24 + 4 * (i % 5), 24 + 2 * (i % 3))  # not square, not all alike: a real folder's sizes
        (root / split / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize(size).save(root / split / str(label) / f"{i}.{suffix}")
    return root


def _blob(image: Image.Image, fmt: str) -> torch.Tensor:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def test_decoding_matches_pillow_for_jpeg_png_gray_and_cmyk():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    blobs = [_blob(rgb, "JPEG"), _blob(rgb, "PNG"), _blob(rgb.convert("L"), "JPEG"), _blob(rgb.convert("CMYK"), "JPEG"),
             _blob(rgb, "BMP")]
    images = decode_batch(blobs, CPU, in_chans=3)
    assert [tuple(i.shape) for i in images] == [(3, 20, 30)] * 5 and all(i.dtype == torch.uint8 for i in images)
    import io

    for image, blob in zip(images, blobs):
        pil = np.asarray(Image.open(io.BytesIO(blob.numpy().tobytes())).convert("RGB"))
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - pil.astype(int)).max() <= 2
    gray = decode_batch(blobs[:2], CPU, in_chans=1)
    assert [tuple(i.shape) for i in gray] == [(1, 20, 30)] * 2


def test_crops_are_drawn_as_timms_random_resized_crop():
    from timm.data.transforms import RandomResizedCropAndInterpolation

    sizes = [(60, 90)] * 4000
    u = torch.rand(len(sizes), 40, generator=torch.Generator().manual_seed(0))
    boxes = crop_boxes(u, sizes, (0.08, 1.0), (3 / 4, 4 / 3))
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
    random.seed(0)
    image = Image.new("RGB", (90, 60))
    timm_boxes = [RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                  for _ in range(4000)]
    for ours, theirs in ((boxes, timm_boxes),):
        area = np.array([h * w / (60 * 90) for _, _, h, w in ours])
        their_area = np.array([h * w / (60 * 90) for _, _, h, w in theirs])
        assert abs(area.mean() - their_area.mean()) < 0.02 and abs(area.std() - their_area.std()) < 0.02
        aspect = np.log([w / h for _, _, h, w in ours])
        assert aspect.min() >= math.log(3 / 4) - 0.1 and aspect.max() <= math.log(4 / 3) + 0.1
    # no try fits (a crop larger than the image): the centre, cut to the ratio bounds, as timm's fallback
    assert crop_boxes(torch.zeros(1, 40), [(10, 40)], (2.0, 3.0), (3 / 4, 4 / 3)) == [(0, 13, 10, 13)]


def test_whole_image_crop_matches_the_cpu_resize():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    ours = crop_and_resize([image], [(0, 0, 48, 48)], [False], 16, "bilinear")[0]
    assert ours.dtype == torch.uint8
    pil = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BILINEAR)).astype(np.float32)
    assert float(np.abs(ours.permute(1, 2, 0).numpy() - pil).mean()) < 5
    flipped = crop_and_resize([image], [(0, 0, 48, 48)], [True], 16, "bicubic")[0]
    assert torch.equal(flipped, crop_and_resize([image], [(0, 0, 48, 48)], [False], 16, "bicubic")[0].flip(-1))


def _epoch(bundle, workers, epoch=0, seed=5):
    augment = Augment(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)  # the paper's
    make = folder_loader(bundle.train, bundle, augment, 16, shuffle=True, seed=seed, device=CPU, workers=workers)
    return list(make(epoch))


def test_batches_are_a_pure_function_of_seed_epoch_and_index_whatever_the_workers(digits_folder):
    bundle = load_data(f"imagefolder:{digits_folder}", img_size=16, in_chans=3)
    first = _epoch(bundle, workers=0)
    assert len(first) == 100 // 16 and all(x.shape == (16, 3, 16, 16) and x.dtype == torch.float32 for x, _ in first)
    assert all(y.dtype == torch.int64 for _, y in first)
    for other in (_epoch(bundle, workers=0), _epoch(bundle, workers=2)):
        assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(first, other))
    assert not torch.equal(first[0][0], _epoch(bundle, workers=0, epoch=1)[0][0])
    # labels follow the files: the loader's order over FileBytes is make_loader's
    files = FileBytes(bundle.train.samples)
    assert collate_bytes([files[0], files[1]])[1].tolist() == [bundle.train.samples[0][1], bundle.train.samples[1][1]]


def test_jitter_alone_and_other_policies_are_refused_by_name():
    assert folder_augment(Augment(reprob=0.25)) == (BatchAugment(crop=True, reprob=0.25), None)
    crop, spec = folder_augment(Augment(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4))  # timm drops jitter
    assert spec.layers == 2 and spec.magnitude == 9 and spec.magnitude_std == 0.5 and len(spec.ops) == 15
    with pytest.raises(MonomodError, match="no form of colour jitter"):
        folder_augment(Augment(color_jitter=0.4))
    with pytest.raises(MonomodError, match="RandAugment only, not 'original'"):
        folder_augment(Augment(auto_augment="original"))


def test_a_folder_plan_on_the_device_path_compiles_trains_and_refuses_jitter_alone(digits_folder, tmp_path):
    from monomod.compiler import ConvertOptions, compile_options
    from monomod.runtime.execute import execute, prepare_run_dir

    base = dict(teacher="vit_tiny", student="vit", modules=2, data=f"imagefolder:{digits_folder}", img_size=32,
                in_chans=3, teacher_training="end-to-end", input_path="device", m2mkd="separate")
    compile_options(ConvertOptions(**base, preset="paper"))  # RandAugment, erasing and mixing: all on the device
    with pytest.raises(MonomodError, match="no form of colour jitter"):
        compile_options(ConvertOptions(**base, budgets={"meta": {"color_jitter": 0.4}}))
    plan = compile_options(ConvertOptions(**base, budgets={"meta": {"auto_augment": "rand-m9-mstd0.5-inc1"}}))
    assert plan.settings["input_path"] == "device"
    for job in plan.jobs:
        if "train" in job.config:
            job.config["train"].update(steps=2, batch_size=16, warmup_steps=1)
    plan.rehash()
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    statuses = execute(plan, run_dir, only=["meta"])
    assert [s.state for s in statuses] == ["done"]
    cached = compile_options(ConvertOptions(**{**base, "input_path": "cached"}))
    assert cached.settings["input_path"] == "cached"
    with pytest.raises(MonomodError, match="no form of colour jitter"):
        compile_options(ConvertOptions(**{**base, "input_path": "cached"}, budgets={"meta": {"color_jitter": 0.4}}))
    for job in cached.jobs:
        if "train" in job.config:
            job.config["train"].update(steps=2, batch_size=16, warmup_steps=1)
    cached.rehash()
    run_dir = prepare_run_dir(cached, tmp_path / "cached")
    assert [s.state for s in execute(cached, run_dir, only=["meta"])] == ["done"]
    assert len(list((tmp_path / "cached" / "cache").glob("images-*.safetensors"))) == 1


def test_the_cache_holds_each_image_as_timms_eval_resize_and_centre_crop(digits_folder, tmp_path):
    from timm.data.transforms import str_to_interp_mode
    from torchvision.transforms import CenterCrop, Compose, PILToTensor, Resize

    from monomod.runtime.device_folder import build_cache, cache_side

    bundle = load_data(f"imagefolder:{digits_folder}", img_size=16, in_chans=3)
    side = cache_side(bundle)
    assert side == math.floor(16 / bundle.crop_pct)
    images, labels = build_cache(bundle.train, bundle, side, workers=2)
    resize = Compose([Resize(side, interpolation=str_to_interp_mode(bundle.interpolation)), CenterCrop(side),
                      PILToTensor()])
    assert images.shape == (100, 3, side, side) and images.dtype == torch.uint8
    for k in (0, 37, 99):
        path, label = bundle.train.samples[k]
        assert torch.equal(images[k], resize(Image.open(path).convert("RGB"))) and labels[k] == label


def _cached_epoch(bundle, run_dir, epoch=0):
    from monomod.rundir import RunDir

    augment = Augment(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    make = folder_loader(bundle.train, bundle, augment, 16, shuffle=True, seed=5, device=CPU, workers=2,
                         cache_at=RunDir(run_dir).image_cache)
    return list(make(epoch))


def test_cached_batches_are_made_once_saved_and_follow_the_files(digits_folder, tmp_path):
    import shutil

    from monomod.runtime import device_folder

    folder = tmp_path / "digits"
    shutil.copytree(digits_folder, folder)
    bundle = load_data(f"imagefolder:{folder}", img_size=16, in_chans=3)
    device_folder._LOADED.clear()
    first = _cached_epoch(bundle, tmp_path / "run")
    files = list((tmp_path / "run" / "cache").iterdir())
    assert len(first) == 100 // 16 and len(files) == 1 and files[0].suffix == ".safetensors"
    assert all(x.shape == (16, 3, 16, 16) for x, _ in first)
    labels = torch.tensor([label for _, label in bundle.train.samples])
    assert all(set(y.tolist()) <= set(labels.tolist()) for _, y in first)
    device_folder._LOADED.clear()  # a new process: read back from the file, the same batches
    again = _cached_epoch(bundle, tmp_path / "run")
    assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(first, again))
    assert not torch.equal(first[0][0], _cached_epoch(bundle, tmp_path / "run", epoch=1)[0][0])
    path = bundle.train.samples[3][0]  # an edited image makes a new cache
    Image.open(path).convert("RGB").rotate(90).save(path, format="JPEG")
    _cached_epoch(load_data(f"imagefolder:{folder}", img_size=16, in_chans=3), tmp_path / "run")
    assert len(list((tmp_path / "run" / "cache").iterdir())) == 2


def test_a_cache_that_cannot_fit_is_refused_before_decoding(digits_folder, tmp_path, monkeypatch):
    from monomod.runtime import device_folder

    bundle = load_data(f"imagefolder:{digits_folder}", img_size=16, in_chans=3)
    monkeypatch.setattr(device_folder, "build_cache", lambda *a: pytest.fail("decoded before refusing"))
    monkeypatch.setattr(device_folder.os, "sysconf", lambda name: 1024 if "PAGES" in name else 1)
    device_folder._LOADED.clear()
    with pytest.raises(MonomodError, match="cache needs .* GiB, more than half"):
        _cached_epoch(bundle, tmp_path / "run")


# ------------------------------------------------------------------------------------ RandAugment, op by op


def _photo(seed: int = 0, size: int = 24) -> np.ndarray:
    """A smooth random colour image (a photograph's statistics more than white noise's)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((size, size), Image.BICUBIC))  # writable


@pytest.mark.parametrize("name, level, pil", [
    ("AutoContrast", 0.0, lambda im, _: __import__("PIL.ImageOps").ImageOps.autocontrast(im)),
    ("Equalize", 0.0, lambda im, _: __import__("PIL.ImageOps").ImageOps.equalize(im)),
    ("Invert", 0.0, lambda im, _: __import__("PIL.ImageOps").ImageOps.invert(im)),
    ("PosterizeIncreasing", 2.0, lambda im, v: __import__("PIL.ImageOps").ImageOps.posterize(im, int(v))),
    ("SolarizeIncreasing", 100.0, lambda im, v: __import__("PIL.ImageOps").ImageOps.solarize(im, v)),
    ("ColorIncreasing", 1.7, lambda im, v: __import__("PIL.ImageEnhance").ImageEnhance.Color(im).enhance(v)),
    ("ContrastIncreasing", 0.4, lambda im, v: __import__("PIL.ImageEnhance").ImageEnhance.Contrast(im).enhance(v)),
    ("BrightnessIncreasing", 1.6, lambda im, v: __import__("PIL.ImageEnhance").ImageEnhance.Brightness(im).enhance(v)),
    ("SharpnessIncreasing", 1.9, lambda im, v: __import__("PIL.ImageEnhance").ImageEnhance.Sharpness(im).enhance(v)),
    ("ShearX", 0.25, lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0), Image.BILINEAR,
                                                fillcolor=(124, 116, 104))),
    ("TranslateYRel", -0.3, lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1]),
                                                       Image.BILINEAR, fillcolor=(124, 116, 104))),
])
def test_each_op_is_the_pillow_op_timm_calls(name, level, pil):
    from monomod.runtime.device_randaugment import OPS

    pixels = _photo().copy()
    ours = OPS[name](torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous(), torch.tensor([level]),
                     torch.tensor([124.0, 116.0, 104.0]))[0].permute(1, 2, 0).numpy().astype(int)
    theirs = np.asarray(pil(Image.fromarray(pixels), level)).astype(int)
    tolerance = 2 if name in ("ShearX", "TranslateYRel") else 0.05  # resampling at slightly other sub-pixel points
    assert np.abs(ours - theirs).mean() < tolerance, np.abs(ours - theirs).mean()


def test_rand_augment_draws_like_timm_and_per_sample():
    from monomod.runtime.device_randaugment import parse_rand_augment, rand_augment_batch

    spec = parse_rand_augment("rand-m9-mstd0.5-inc1", 9.99)
    images = torch.from_numpy(_photo()).permute(2, 0, 1)[None].repeat(2000, 1, 1, 1).contiguous()
    u = torch.rand(2000, spec.draws, generator=torch.Generator().manual_seed(0))
    out = rand_augment_batch(images.clone(), u, spec, torch.tensor([124.0, 116.0, 104.0]))
    changed = float((out != images).flatten(1).any(1).float().mean())
    assert 0.65 < changed < 0.8  # two layers, each applied with p=0.5 (and a few ops that change nothing)
    again = rand_augment_batch(images[:7].clone(), u[:7], spec, torch.tensor([124.0, 116.0, 104.0]))
    assert torch.equal(again, out[:7])  # a sample's result is its own, whatever its batch
