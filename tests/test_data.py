import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import monomod
from monomod.data import DATA_KINDS, DIGITS_CORRUPTIONS, IMAGENET_MEAN, IMAGENET_STD, DataBundle, load_data, make_loader


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data("digits", img_size=32, in_chans=3)


@pytest.fixture(scope="module")
def digits_plain() -> DataBundle:
    return load_data("digits", img_size=32, in_chans=1, augment=False, seed=7)


def _stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """All (normalised) images and labels of a dataset as two tensors."""
    pairs = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


# ----------------------------------------------------------------------------------------------------------- digits


def test_kinds():
    assert DATA_KINDS == ("digits", "synthetic", "imagefolder")


def test_digits_split_sizes_and_stratification(digits):
    n_train, n_val = len(digits.train), len(digits.val)
    assert n_train + n_val == 1797
    assert abs(n_val / 1797 - 0.2) < 0.01
    assert len(digits.ood) == n_val
    assert digits.num_classes == 10 and digits.classes == [str(i) for i in range(10)]
    train_counts, val_counts = Counter(digits.train.labels.tolist()), Counter(digits.val.labels.tolist())
    for c in range(10):
        assert abs(val_counts[c] / (train_counts[c] + val_counts[c]) - 0.2) < 0.02


@pytest.mark.parametrize("fixture, chans", [("digits", 3), ("digits_plain", 1)])
def test_digits_shapes(request, fixture, chans):
    b = request.getfixturevalue(fixture)
    assert (b.in_chans, b.img_size) == (chans, 32)
    assert len(b.mean) == len(b.std) == chans
    for ds in (b.train, b.val, b.ood):
        x, y = ds[0]
        assert x.shape == (chans, 32, 32) and x.dtype == torch.float32
        assert isinstance(y, int) and 0 <= y < 10
    if chans == 3:  # channels are the grayscale digit repeated
        x, _ = b.val[3]
        assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])


def test_digits_train_is_normalised(digits_plain, digits):
    x, _ = _stack(digits_plain.train)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(1), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(1), atol=1e-3)
    # the recorded stats undo the normalisation back to raw pixels in [0, 1]
    raw = digits.val.raw(5)
    x, _ = digits.val[5]
    mean, std = torch.tensor(digits.mean).view(-1, 1, 1), torch.tensor(digits.std).view(-1, 1, 1)
    assert torch.allclose(x * std + mean, raw, atol=1e-5)
    assert 0.0 <= raw.min() and raw.max() <= 1.0
    assert digits.mean[0] == pytest.approx(digits_plain.mean[0]) and digits.std[0] == pytest.approx(digits_plain.std[0])


def test_digits_split_fixed_across_calls_and_seeds(digits, digits_plain):
    assert torch.equal(digits.val.images, digits_plain.val.images)
    assert torch.equal(digits.val.labels, digits_plain.val.labels)
    assert torch.equal(digits.train.images, digits_plain.train.images)
    again = load_data("digits", img_size=32, seed=123)
    assert torch.equal(again.val.images, digits.val.images) and torch.equal(again.train.labels, digits.train.labels)
    assert again.mean == digits.mean


def test_digits_ood_is_deterministic_and_corrupted(digits, digits_plain):
    assert torch.equal(digits.ood.images, digits_plain.ood.images)  # other seed, other call: same OOD set
    assert digits.ood.tags == digits_plain.ood.tags
    assert torch.equal(digits.ood.labels, digits.val.labels)
    assert set(digits.ood.tags) == set(DIGITS_CORRUPTIONS)
    assert max(Counter(digits.ood.tags).values()) - min(Counter(digits.ood.tags).values()) <= 1
    changed = (digits.ood.images != digits.val.images).flatten(1).any(dim=1)
    assert changed.all()
    assert digits.describe()["ood_corruptions"] == dict(sorted(Counter(digits.ood.tags).items()))


def test_ood_none_and_auto(digits):
    assert load_data("digits", img_size=8, ood=None).ood is None
    assert load_data("digits", img_size=8, ood="none").ood is None
    assert digits.ood is not None


def test_augmentation_only_on_train(digits, digits_plain):
    torch.manual_seed(0)
    a = digits.train[0][0]
    b = digits.train[0][0]
    assert not torch.equal(a, b)  # fresh augmentation per draw
    torch.manual_seed(0)
    assert torch.equal(digits.train[0][0], a)  # deterministic given the torch RNG
    for ds in (digits.val, digits.ood, digits_plain.train):
        assert torch.equal(ds[1][0], ds[1][0])
    # augmentation is light: the augmented digit stays close to the original
    raw = digits.train.raw(0)
    aug = digits.train[0][0] * digits.train.std + digits.train.mean
    assert aug.shape == raw.shape and (aug - raw).abs().mean() < 0.3


def test_describe_is_json(digits):
    d = json.loads(json.dumps(digits.describe()))
    assert d["train"] + d["val"] == 1797 and d["ood"] == d["val"]
    assert d["name"] == "digits" and d["img_size"] == 32 and d["in_chans"] == 3 and len(d["mean"]) == 3


# ------------------------------------------------------------------------------------------------------ make_loader


def _order(loader) -> list[int]:
    return [int(i) for (batch,) in loader for i in batch]


def test_make_loader_order_from_seed_and_epoch():
    ds = torch.utils.data.TensorDataset(torch.arange(100))
    first = _order(make_loader(ds, batch_size=16, shuffle=True, seed=3, epoch=0))
    assert sorted(first) == list(range(100))
    assert _order(make_loader(ds, batch_size=16, shuffle=True, seed=3, epoch=0)) == first
    assert _order(make_loader(ds, batch_size=16, shuffle=True, seed=3, epoch=1)) != first
    assert _order(make_loader(ds, batch_size=16, shuffle=True, seed=4, epoch=0)) != first
    loader = make_loader(ds, batch_size=16, shuffle=True, seed=3, epoch=5)
    assert _order(loader) == _order(loader)  # re-iterating replays the epoch
    assert _order(make_loader(ds, batch_size=16, shuffle=False, seed=3, epoch=2)) == list(range(100))
    assert len(make_loader(ds, batch_size=16, shuffle=True, seed=0, drop_last=True)) == 6
    assert make_loader(ds, batch_size=16, shuffle=True, seed=0).num_workers == 0


def test_make_loader_replays_augmentations_and_leaves_global_rng_alone(digits):
    subset = torch.utils.data.Subset(digits.train, range(64))

    def batches(global_seed: int, epoch: int) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        out = [x for x, _ in make_loader(subset, batch_size=32, shuffle=True, seed=1, epoch=epoch)]
        assert torch.equal(torch.get_rng_state(), before)
        return out

    a, b, c = batches(0, 0), batches(99, 0), batches(0, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    with pytest.raises(monomod.MonomodError, match="batch_size"):
        make_loader(subset, batch_size=0, shuffle=True, seed=0)


# -------------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_any_shape_and_learnable():
    b = load_data("synthetic", img_size=20, in_chans=1, augment=False)
    assert (len(b.train), len(b.val), len(b.ood)) == (512, 128, 128)
    assert b.num_classes == 10 and len(b.classes) == 10 and len(b.mean) == 1
    xt, yt = _stack(b.train)
    assert xt.shape == (512, 1, 20, 20)
    assert torch.allclose(xt.mean(dim=(0, 2, 3)), torch.zeros(1), atol=1e-4)
    centroids = torch.stack([xt[yt == c].mean(0) for c in range(10)]).flatten(1)

    def accuracy(ds) -> float:
        x, y = _stack(ds)
        return (torch.cdist(x.flatten(1), centroids).argmin(1) == y).float().mean().item()

    val_acc, ood_acc = accuracy(b.val), accuracy(b.ood)
    assert val_acc > 0.9 and ood_acc < val_acc - 0.05  # learnable by a nearest-centroid rule; OOD is shifted
    same = load_data("synthetic", img_size=20, in_chans=1, augment=False)
    assert torch.equal(same.val.images, b.val.images)
    other = load_data("synthetic", img_size=20, in_chans=1, seed=1, augment=False)
    assert not torch.equal(other.val.images, b.val.images)
    odd = load_data("synthetic", img_size=12, in_chans=5, ood=None)
    assert odd.ood is None and odd.train[0][0].shape == (5, 12, 12) and len(odd.std) == 5


# ------------------------------------------------------------------------------------------------------ imagefolder

CLASSES = ("bird", "cat", "dog")  # sorted: bird=0, cat=1, dog=2


def _write_images(folder, n: int, colour: tuple[int, int, int], grayscale: bool = False, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = 20 + i, 24
        px = np.clip(np.array(colour) + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(px, "RGB")
        if grayscale and i == 0:
            img = img.convert("L")
        img.save(folder / f"img{i}.png")


@pytest.fixture
def folder(tmp_path):
    colours = {"bird": (200, 40, 40), "cat": (40, 200, 40), "dog": (40, 40, 200)}
    for split, n in (("train", 3), ("val", 2)):
        for k, c in enumerate(CLASSES):
            _write_images(tmp_path / "data" / split / c, n, colours[c], grayscale=(c == "cat"), seed=k)
    return tmp_path / "data"


@pytest.mark.parametrize("chans", [3, 1])
def test_imagefolder_loads_with_grayscale(folder, chans):
    b = load_data(f"imagefolder:{folder}", img_size=16, in_chans=chans)
    assert b.name == f"imagefolder:{folder.resolve()}"
    assert b.classes == list(CLASSES) and b.num_classes == 3
    assert (len(b.train), len(b.val), b.ood) == (9, 6, None)
    assert (b.mean, b.std) == ((IMAGENET_MEAN, IMAGENET_STD) if chans == 3 else ((0.5,), (0.5,)))
    for ds in (b.train, b.val):
        for i in range(len(ds)):  # includes the grayscale PNGs
            x, y = ds[i]
            assert x.shape == (chans, 16, 16) and x.dtype == torch.float32 and 0 <= y < 3
    assert [y for _, y in b.val] == [0, 0, 1, 1, 2, 2]
    assert torch.equal(b.val[0][0], b.val[0][0])  # val has no randomness
    if chans == 3:  # the colour survives, normalised with ImageNet's stats: bird is red
        x, _ = b.val[0]
        assert x[0].mean() > 0 > x[2].mean()
    assert json.loads(json.dumps(b.describe()))["train"] == 9


def test_imagefolder_train_augmentation(folder):
    aug = load_data(f"imagefolder:{folder}", img_size=16, in_chans=3)
    plain = load_data(f"imagefolder:{folder}", img_size=16, in_chans=3, augment=False)
    torch.manual_seed(0)
    assert not all(torch.equal(aug.train[i][0], aug.train[i][0]) for i in range(len(aug.train)))
    assert torch.equal(plain.train[0][0], plain.train[0][0])
    assert torch.equal(plain.train[0][0], plain.val[0][0])  # same pixels on disk; augment=False: eval transform


def test_imagefolder_ood_labels_follow_iid_classes(folder, tmp_path):
    ood_root = tmp_path / "rendition"
    _write_images(ood_root / "val" / "dog", 2, (10, 10, 250))
    _write_images(ood_root / "val" / "bird", 1, (250, 10, 10), grayscale=True)
    b = load_data(f"imagefolder:{folder}", img_size=16, ood=f"imagefolder:{ood_root}")
    assert len(b.ood) == 3
    labels = [y for _, y in b.ood]
    assert labels == [0, 2, 2]  # bird and dog keep their IID indices, not 0 and 1
    for path, target in b.ood.samples:
        assert b.classes[target] == path.replace("\\", "/").split("/")[-2]
    # without a val/ subfolder the folder itself is the OOD set; a val split with a class subset keeps train indices
    flat = tmp_path / "flat"
    _write_images(flat / "cat", 1, (0, 255, 0))
    b = load_data(f"imagefolder:{folder}", img_size=16, ood=f"imagefolder:{flat}")
    assert [y for _, y in b.ood] == [1]
    # digits can be paired with an image-folder OOD set whose folders are digit names
    _write_images(tmp_path / "digit_ood" / "7", 1, (255, 255, 255))
    b = load_data("digits", img_size=16, in_chans=1, ood=f"imagefolder:{tmp_path / 'digit_ood'}")
    x, y = b.ood[0]
    assert y == 7 and x.shape == (1, 16, 16)


# ----------------------------------------------------------------------------------------------------------- errors


def _raises(match: str, **kwargs):
    spec = kwargs.pop("spec")
    kwargs.setdefault("img_size", 16)
    with pytest.raises(monomod.MonomodError, match=match) as info:
        load_data(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "; " in message
    return message


@pytest.mark.parametrize("spec", ["mnist", "digits:extra", "", "synthetic:3", "Digits"])
def test_unknown_spec(spec):
    message = _raises("unknown data spec", spec=spec)
    assert "'digits', 'synthetic' or 'imagefolder:PATH'" in message


def test_imagefolder_errors(folder, tmp_path):
    import shutil

    _raises("imagefolder data needs a path", spec="imagefolder:")
    _raises(re.escape(f"data directory {tmp_path / 'nope'} does not exist"), spec=f"imagefolder:{tmp_path / 'nope'}")
    _raises("imagefolder data needs in_chans 1 or 3", spec=f"imagefolder:{folder}", in_chans=2)
    _raises("unknown OOD spec", spec=f"imagefolder:{folder}", ood="corrupt")
    _raises("img_size must be a positive integer", spec="digits", img_size=0)

    # OOD classes not in the IID set
    _write_images(tmp_path / "ood" / "val" / "zebra", 1, (0, 0, 0))
    _write_images(tmp_path / "ood" / "val" / "cat", 1, (0, 0, 0))
    message = _raises("OOD directory .* has classes not in the training set: zebra", spec=f"imagefolder:{folder}",
                      ood=f"imagefolder:{tmp_path / 'ood'}")
    assert "cat" not in message.split("set:")[1].split(";")[0]
    _raises("OOD directory .* does not exist", spec=f"imagefolder:{folder}", ood=f"imagefolder:{tmp_path / 'x'}")

    # empty split: class folders without images, then no class folders at all
    for c in CLASSES:
        shutil.rmtree(folder / "val" / c)
        (folder / "val" / c).mkdir()
    _raises(re.escape(f"no images in val directory {folder / 'val'}"), spec=f"imagefolder:{folder}")
    for c in CLASSES:
        (folder / "val" / c).rmdir()
    _raises(re.escape(f"no class folders in val directory {folder / 'val'}"), spec=f"imagefolder:{folder}")

    # val with a class the training set lacks
    _write_images(folder / "val" / "zebra", 1, (0, 0, 0))
    _raises("val directory .* has classes not in the training set: zebra", spec=f"imagefolder:{folder}")

    # missing val/ and train/
    shutil.rmtree(folder / "val")
    _raises(re.escape(f"no val/ directory in {folder}"), spec=f"imagefolder:{folder}")
    shutil.rmtree(folder / "train")
    _raises(re.escape(f"no train/ directory in {folder}"), spec=f"imagefolder:{folder}")


# --------------------------------------------------------------------------------------- workers, timm, file formats


def _batches(loader) -> list[torch.Tensor]:
    return [x for x, _ in loader]


def test_workers_give_the_same_batches_as_the_main_process(folder):
    from monomod.data import Augment

    b = load_data(f"imagefolder:{folder}", img_size=16, in_chans=3)
    paper = b.train_with(Augment(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, reprob=0.25))
    assert b.train.transform is not paper.transform and paper.samples is b.train.samples  # images shared
    assert "RandAugment" in repr(paper.transform) and "RandomErasing" in repr(paper.transform)
    main = _batches(make_loader(paper, batch_size=4, shuffle=True, seed=5, epoch=1, num_workers=0))
    loader = make_loader(paper, batch_size=4, shuffle=True, seed=5, epoch=1, num_workers=2)
    assert loader.num_workers == 2 and loader.persistent_workers
    for _ in range(2):  # persistent workers replay the epoch
        assert all(torch.equal(x, y) for x, y in zip(main, _batches(loader)))
    assert not torch.equal(main[0], _batches(make_loader(paper, batch_size=4, shuffle=True, seed=5, epoch=2,
                                                          num_workers=0))[0])


def test_default_workers(folder, digits):
    from monomod.data import default_workers

    b = load_data(f"imagefolder:{folder}", img_size=16, in_chans=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert default_workers(b.train) == 3 and default_workers(torch.utils.data.Subset(b.val, [0])) == 3
        torch.set_num_threads(32)
        assert default_workers(b.train) == 8
    finally:
        torch.set_num_threads(threads)
    assert default_workers(digits.train) == 0  # in memory: workers only cost
    with pytest.raises(monomod.MonomodError, match="loader workers"):
        make_loader(digits.train, batch_size=4, shuffle=True, seed=0, num_workers=-1)


def test_teacher_data_config_and_in_memory_erasing(folder, digits):
    from monomod.data import Augment

    cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic", "crop_pct": 0.9}
    b = load_data(f"imagefolder:{folder}", img_size=16, in_chans=3, data_config=cfg)
    assert (b.mean, b.std, b.interpolation, b.crop_pct) == (cfg["mean"], cfg["std"], "bicubic", 0.9)
    assert "bicubic" in repr(b.val.transform) and "Resize(size=17" in repr(b.val.transform)
    erased = digits.train_with(Augment(reprob=1.0))
    assert erased.images is digits.train.images and digits.train.erase is None
    assert digits.train_with(Augment()) is digits.train


def _save(path, mode: str, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (20, 24), {"L": 128, "CMYK": (10, 200, 30, 0), "RGB": (200, 10, 10)}[mode]).save(path, fmt)


@pytest.mark.parametrize("chans", [3, 1])
def test_grayscale_and_cmyk_jpegs(tmp_path, chans):
    for split in ("train", "val"):
        _save(tmp_path / split / "a" / "gray.jpg", "L")
        _save(tmp_path / split / "b" / "cmyk.jpg", "CMYK")
    b = load_data(f"imagefolder:{tmp_path}", img_size=16, in_chans=chans)
    for ds in (b.train, b.val):
        assert [ds[i][0].shape for i in range(2)] == [(chans, 16, 16)] * 2


def test_corrupt_image_is_skipped_with_one_warning(folder, caplog):
    bad = folder / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with caplog.at_level("WARNING", logger="monomod.data"):  # named once, when the folder is listed
        b = load_data(f"imagefolder:{folder}", img_size=16, in_chans=3)
        assert not any(path.endswith("broken.jpg") for path, _ in b.train.samples)
        for _ in range(3):
            assert all(b.train[i][0].shape == (3, 16, 16) for i in range(len(b.train)))
        batches = _batches(make_loader(b.train, batch_size=5, shuffle=True, seed=0, num_workers=0))
    assert sum(len(x) for x in batches) == len(b.train)
    warnings = [r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage()]
    assert len(warnings) == 1 and str(bad) in warnings[0]


def test_empty_class_folder_is_refused_by_name(folder):
    (folder / "train" / "zebra").mkdir()
    message = _raises(re.escape(f"class folder {folder / 'train' / 'zebra'} has no images"), spec=f"imagefolder:{folder}")
    assert "remove the folder" in message


@pytest.mark.slow
def test_imagefolder_convert_end_to_end(tmp_path):
    """The digits as PNG files in train/, val/ and a rotated OOD folder, through `monomod convert` at tiny budgets."""
    from sklearn.datasets import load_digits

    from monomod.api import convert
    from monomod.plan import BUDGET_KINDS

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images[:300], digits.target[:300])):
        split = "train" if i < 200 else "val"
        pixels = (image * 255 / 16).astype(np.uint8)
        for root, px in ((tmp_path / "digits" / split, pixels), (tmp_path / "ood", np.rot90(pixels))):
            if root.name == "ood" and split == "train":
                continue
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(px), "L").resize((32, 32)).save(root / str(label) / f"{i}.png")
    tiny = {"steps": 2, "batch_size": 16, "warmup_steps": 0}
    run = convert("vit_tiny", to="vit", modules=2, out=tmp_path / "run", data=f"imagefolder:{tmp_path / 'digits'}",
                  ood=f"imagefolder:{tmp_path / 'ood'}", img_size=32, in_chans=3, loader_workers=1,
                  budgets={kind: dict(tiny) for kind in BUDGET_KINDS})
    results = run.report["results"] if "results" in run.report else run.report
    text = json.dumps(results)
    assert "iid_acc" in text and "ood_acc" in text
    assert '"ood_acc": null' not in text
    assert "loader_workers" not in (tmp_path / "run" / "plan.yaml").read_text()  # a run-time setting only


def test_rand_augment_top_magnitude_runs_on_this_pillow():
    import random

    from monomod.data import Augment
    from monomod.data.folders import train_transform

    bundle = DataBundle("x", None, None, None, 2, 3, 16, IMAGENET_MEAN, IMAGENET_STD, ["a", "b"])
    transform = train_transform(bundle, Augment(auto_augment="rand-n4-m10-mstd0-inc1"))  # every op at magnitude 10
    image = Image.new("RGB", (20, 20), (120, 30, 200))
    for seed in range(20):  # posterize is drawn in some of them: timm asks Pillow for 0 bits there
        random.seed(seed)
        assert transform(image).shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------------------- few shots


def test_digits_shots_keep_n_per_class_the_same_for_every_run(digits_plain):
    few = load_data("digits:shots=5", img_size=32, in_chans=1, ood="auto")
    again = load_data("digits:shots=5", img_size=32, in_chans=1, ood="none", seed=7)
    assert sorted(Counter(few.train.labels.tolist()).values()) == [5] * 10
    assert torch.equal(few.train.images, again.train.images)  # fixed seed: runs pair up
    full = {tuple(img.flatten().tolist()) for img in digits_plain.train.images}
    assert all(tuple(img.flatten().tolist()) in full for img in few.train.images)  # a subset of the full train split
    assert len(few.val) == len(digits_plain.val) and few.ood is not None  # val and OOD untouched
    more = load_data("digits:shots=20", img_size=16, in_chans=1, ood="none")
    assert len(more.train) == 200 and few.name == "digits,shots=5"


def test_imagefolder_shots_and_refusals(folder):
    few = load_data(f"imagefolder:{folder},shots=2", img_size=16, ood=None)
    assert sorted(Counter(few.train.targets).values()) == [2, 2, 2]
    assert len(few.train.samples) == 6 and few.train[0][0].shape == (3, 16, 16)
    assert "class 0 has (3)" in _raises("more training images", spec=f"imagefolder:{folder},shots=4")
    assert "use e.g. digits:shots=5" in _raises("positive whole number", spec="digits:shots=0")
    assert "imagefolder:PATH,shots=N" in _raises("unknown data spec", spec=f"imagefolder:{folder}:shots=2")


def test_compound_ood_puts_three_corruptions_on_every_digit(digits):
    from monomod.data import DIGITS_COMPOUND

    compound = load_data("digits", img_size=32, ood="compound")
    assert compound.ood.tags == ["+".join(DIGITS_COMPOUND)] * len(digits.val)
    assert torch.equal(compound.ood.labels, digits.val.labels)
    assert (compound.ood.images != digits.val.images).flatten(1).any(dim=1).all()
    assert (compound.ood.images != digits.ood.images).flatten(1).any(dim=1).float().mean() > 0.9
    assert torch.equal(load_data("digits", img_size=32, ood="compound", seed=5).ood.images, compound.ood.images)
    with pytest.raises(monomod.MonomodError, match="compound.*digits"):
        load_data("synthetic", img_size=16, ood="compound")
