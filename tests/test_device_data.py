"""The device-resident input path, on CPU tensors (the same code runs on CUDA tensors): determinism per (seed,
epoch, index), resume exactness, shapes and ranges, and augmentations like the CPU path's."""
import math

import torch

from monomod.data import RandomShiftAffine, TensorImageDataset, make_loader
from monomod.runtime.device_data import (
    BatchAugment, DeviceImages, DeviceLoader, _crop_theta, augment_batch, batch_augment_for, sample_normals,
    sample_uniforms,
)

SIZE = 16


def _dataset(n: int = 40, reprob: float = 0.0) -> TensorImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8, generator=g)
    ds = TensorImageDataset(images, torch.arange(n) % 10, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                            augment=RandomShiftAffine(SIZE))
    if reprob:
        from timm.data.random_erasing import RandomErasing

        ds.erase = RandomErasing(reprob, mode="pixel", device="cpu")
    return ds


def _loader(ds, batch_size=8, epoch=0, seed=3):
    return DeviceLoader(DeviceImages(ds, "cpu"), batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch,
                        drop_last=True, augment=batch_augment_for(ds))


def test_numbers_are_a_pure_function_of_seed_and_index():
    indices = torch.tensor([5, 9, 2, 5])
    u = sample_uniforms(7, indices, 4)
    assert u.shape == (4, 4) and u.dtype == torch.float32 and 0 <= float(u.min()) and float(u.max()) < 1
    assert torch.equal(u[0], u[3]) and not torch.equal(u[0], u[1])
    assert torch.equal(sample_uniforms(7, indices[1:2], 4)[0], u[1])
    assert not torch.equal(sample_uniforms(8, indices, 4), u)
    many = sample_uniforms(1, torch.arange(20000), 2)
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float(many.std()) - math.sqrt(1 / 12)) < 0.01
    z = sample_normals(1, torch.arange(200), torch.Size([3, 8, 8]))
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert torch.equal(sample_normals(1, torch.tensor([4]), torch.Size([3, 8, 8]))[0], z[4])


def test_batches_are_make_loaders_order_with_shapes_and_ranges():
    ds = _dataset(reprob=0.5)
    ours = list(_loader(ds))
    theirs = list(make_loader(ds, batch_size=8, shuffle=True, seed=3, epoch=0, drop_last=True))
    assert len(ours) == len(theirs) == 5
    for (x, y), (_, y_cpu) in zip(ours, theirs):
        assert torch.equal(y, y_cpu)  # the same permutation of (seed, epoch)
        assert x.shape == (8, 3, SIZE, SIZE) and x.dtype == torch.float32 and torch.isfinite(x).all()
    plain = augment_batch(ds.images[:4], torch.arange(4), 0, None, size=SIZE, mean=ds.mean.flatten(),
                          std=ds.std.flatten(), in_chans=3)
    ds.augment, ds.erase = None, None  # un-augmented, both paths normalise the same way
    torch.testing.assert_close(plain, torch.stack([ds[i][0] for i in range(4)]))
    low, high = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert float(plain.min()) >= low - 1e-6 and float(plain.max()) <= high + 1e-6


def test_a_sample_is_augmented_the_same_in_any_batch_and_after_a_resume():
    ds = _dataset(reprob=0.5)
    by_index = {}
    for batch_size in (4, 8):
        loader = _loader(ds, batch_size=batch_size)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(loader.order_seed))
        for b, (x, _) in enumerate(loader):
            for row, index in enumerate(order[b * batch_size:(b + 1) * batch_size].tolist()):
                if index in by_index:
                    assert torch.equal(by_index[index], x[row]), index
                by_index[index] = x[row]
    first, again = list(_loader(ds, epoch=2)), list(_loader(ds, epoch=2))
    resumed = iter(_loader(ds, epoch=2))
    for _ in range(3):  # a resumed job skips the batches it consumed, then sees the rest unchanged
        next(resumed)
    for (x, y), (x2, y2) in zip(first[3:], resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], list(_loader(ds, epoch=3))[0][0])


def _centroid_shift(images: torch.Tensor) -> torch.Tensor:
    """Each image's centre of mass, in pixels from the frame's centre."""
    grid = torch.arange(SIZE, dtype=torch.float32) - (SIZE - 1) / 2
    mass = images.sum(dim=(-1, -2)).clamp_min(1e-6)
    return torch.stack([(images.sum(-2) * grid).sum(-1) / mass, (images.sum(-1) * grid).sum(-1) / mass], -1)


def test_the_batched_shift_moves_images_like_the_cpu_paths():
    """A centred blob under RandomShiftAffine (CPU, per image) and its batched form: the centre of mass moves by
    the same spread, within sampling noise."""
    n = 600
    blob = torch.zeros(1, SIZE, SIZE)
    blob[:, 6:10, 6:10] = 1.0
    shift = RandomShiftAffine(SIZE)
    torch.manual_seed(0)
    cpu = torch.stack([shift(blob) for _ in range(n)])
    aug = BatchAugment(shift=(shift.degrees, shift.scale, shift.max_shift))
    images = (blob * 255).to(torch.uint8).expand(n, 1, SIZE, SIZE)
    ours = augment_batch(images, torch.arange(n), 5, aug, size=SIZE, mean=torch.zeros(1), std=torch.ones(1),
                         in_chans=1)
    a, b = _centroid_shift(cpu[:, 0]), _centroid_shift(ours[:, 0])
    assert a.abs().max() <= shift.max_shift + 1 and b.abs().max() <= shift.max_shift + 1
    assert torch.allclose(a.std(0), b.std(0), rtol=0.15), (a.std(0), b.std(0))
    assert torch.allclose(cpu.sum((1, 2, 3)).mean(), ours.sum((1, 2, 3)).mean(), rtol=0.05)


def test_the_batched_crop_draws_timms_scale_and_ratio_ranges():
    aug = BatchAugment(crop=True)
    theta = _crop_theta(sample_uniforms(0, torch.arange(5000), 5), aug)
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    area = w * h
    assert float(area.min()) >= 0.08 * 0.75 and float(area.max()) <= 1.0
    assert abs(float((theta[:, 0, 0] < 0).float().mean()) - 0.5) < 0.03  # flipped half the time
    assert ((theta[:, 0, 2].abs() <= 1 - w + 1e-6) & (theta[:, 1, 2].abs() <= 1 - h + 1e-6)).all()  # inside
    x = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    out = augment_batch(x, torch.arange(6), 0, aug, size=SIZE, mean=torch.zeros(3), std=torch.ones(3), in_chans=3)
    assert out.shape == (6, 3, SIZE, SIZE) and float(out.min()) >= 0 and float(out.max()) <= 1


def test_erasing_replaces_a_rectangle_at_the_asked_rate():
    ds = _dataset(n=400)
    aug = BatchAugment(reprob=0.25)
    kept = augment_batch(ds.images, torch.arange(400), 0, None, size=SIZE, mean=ds.mean.flatten(),
                         std=ds.std.flatten(), in_chans=3)
    erased = augment_batch(ds.images, torch.arange(400), 0, aug, size=SIZE, mean=ds.mean.flatten(),
                           std=ds.std.flatten(), in_chans=3)
    changed = (kept != erased).flatten(1).any(1).float().mean()
    assert abs(float(changed) - 0.25) < 0.07
    fraction = (kept != erased).flatten(1).float().mean(1)
    assert float(fraction[fraction > 0].max()) <= 1 / 3 + 0.05


def test_input_path_option_resolves_and_a_device_plan_trains(tmp_path):
    from monomod.compiler import ConvertOptions, compile_options
    from monomod.runtime.device_data import resolve_input_path
    from monomod.runtime.execute import execute, prepare_run_dir

    assert resolve_input_path("auto", "digits", device="cpu") == "cpu"
    assert resolve_input_path("auto", "digits", None, device="cuda") == "device"
    assert resolve_input_path("auto", "digits", "imagefolder:/x", device="cuda") == "cpu"  # folders: not measured yet
    assert resolve_input_path("device", "imagefolder:/x") == "device"  # decoded there (tests/test_device_folder.py)

    def plan(path):
        p = compile_options(ConvertOptions(teacher="vit_tiny", student="vit", modules=2, data="synthetic", img_size=32,
                                           teacher_training="end-to-end", input_path=path, m2mkd="separate"))
        for job in p.jobs:
            if "train" in job.config:
                job.config["train"].update(steps=2, batch_size=16, warmup_steps=1)
        p.rehash()
        return p

    cpu, device = plan("auto"), plan("device")
    assert "input_path" not in cpu.settings and device.settings["input_path"] == "device"
    assert cpu.job("meta").hash != device.job("meta").hash and cpu.job("assemble").hash != device.job("assemble").hash
    run_dir = prepare_run_dir(device, tmp_path / "run")
    statuses = execute(device, run_dir, only=["meta"])
    assert [s.state for s in statuses] == ["done"]
