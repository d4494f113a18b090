"""The shared training loop and its checkpoints: optimisation, schedule, logging, crash safety, bitwise resume."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from monomod.errors import MonomodError
from monomod.runtime import checkpoint as ckpt
from monomod.io import atomic_write_json
from monomod.runtime.checkpoint import (
    capture_rng_state,
    checkpoint_exists,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    restore_rng_state,
    save_checkpoint,
)
from monomod.runtime.config import TrainConfig, resolve_precision
from monomod.runtime.losses import soft_cross_entropy
from monomod.runtime.train import evaluate, learning_rate, make_mixer, param_groups, train

# ------------------------------------------------------------------------------------------------ toy problem

N, DIM, CLASSES, BATCH = 96, 8, 3, 16  # 6 batches per epoch


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, DIM, generator=g)
    w = torch.randn(DIM, CLASSES, generator=g)
    return x, (x @ w).argmax(dim=1)


def toy_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(DIM, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, CLASSES))


def seeded_loader(epoch: int):
    """Deterministic per epoch through its own generator."""
    x, y = toy_data()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1000 + epoch))
    return [(x[perm[i:i + BATCH]], y[perm[i:i + BATCH]]) for i in range(0, N, BATCH)]


def global_rng_loader(epoch: int):
    """The hard case for resume: shuffles and augments from the *global* torch RNG, lazily, batch by batch."""
    x, y = toy_data()
    perm = torch.randperm(N)
    for i in range(0, N, BATCH):
        idx = perm[i:i + BATCH]
        yield x[idx] + 0.05 * torch.randn(len(idx), DIM), y[idx]


class NoisyToy(torch.utils.data.Dataset):
    """The toy data with per-sample noise from the *global* torch RNG, as a torchvision transform would draw it."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        x, y = toy_data()
        return x[i] + 0.05 * torch.randn(DIM), y[i]


def workers_loader(epoch: int, workers: int = 2):
    """monomod's own loader with worker processes: order and noise from (seed, epoch, index)."""
    from monomod.data import make_loader

    return make_loader(NoisyToy(), batch_size=BATCH, shuffle=True, seed=11, epoch=epoch, num_workers=workers)


def ce_loss(model: nn.Module, smoothing: float = 0.0):
    def loss_fn(x, y):
        logits = model(x)
        return soft_cross_entropy(logits, y, smoothing), logits
    return loss_fn


def run_job(job_dir: Path, *, steps: int = 20, stop_at: int | None = None, how: str = "interrupt",
            loader=seeded_loader, dropout: float = 0.0, **overrides) -> tuple[nn.Module, object]:
    """Train the toy MLP; at call ``stop_at`` of the loss the run dies (KeyboardInterrupt, or a real SIGKILL)."""
    model = toy_model(dropout)
    inner = ce_loss(model)
    calls = 0

    def loss_fn(x, y):
        nonlocal calls
        calls += 1
        if calls == stop_at:
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt
        return inner(x, y)

    cfg = dict(steps=steps, lr=1e-2, warmup_steps=3, checkpoint_every=5, log_every=2, seed=3)
    cfg.update(overrides)
    result = train(model, loss_fn, loader, TrainConfig(**cfg), job_dir=job_dir, label="toy")
    return model, result


def assert_bitwise_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def read_metrics(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- the loop


def test_loss_goes_down_and_evaluate(tmp_path: Path) -> None:
    model = toy_model()
    cfg = TrainConfig(steps=60, lr=2e-2, warmup_steps=5, log_every=6, grad_clip=1.0)
    result = train(model, ce_loss(model), seeded_loader, cfg, job_dir=tmp_path, label="toy")
    lines = read_metrics(tmp_path)
    assert result.steps == 60 and result.resumed_from == 0
    assert result.final_loss < 0.5 * lines[0]["loss"]
    assert result.train_acc is not None and result.train_acc > 0.85
    assert result.samples_per_second > 0 and result.seconds > 0

    model.train()
    model[2].eval()  # a submodule in its own mode must come back that way
    acc = evaluate(model, seeded_loader(0))
    assert acc > 0.85 and acc == pytest.approx(
        (model(toy_data()[0]).argmax(1) == toy_data()[1]).float().mean().item())
    assert model.training and model[0].training and not model[2].training
    model.eval()
    evaluate(model, seeded_loader(0))
    assert not model.training


def test_learning_rate_schedule(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)             # warm-up start: peak / W
    assert learning_rate(4, cfg) == pytest.approx(5e-4)             # warm-up middle
    assert learning_rate(9, cfg) == pytest.approx(1e-3)             # warm-up end reaches the peak
    assert learning_rate(10, cfg) == pytest.approx(1e-3)            # cosine start
    assert learning_rate(55, cfg) == pytest.approx((1e-3 + 1e-5) / 2)  # cosine middle
    assert learning_rate(100, cfg) == pytest.approx(1e-5)           # end: min_lr
    q = 10 + 90 // 4 + 0.5  # a quarter of the way through the cosine
    expected = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (q - 10) / 90))
    assert learning_rate(q, cfg) == pytest.approx(expected)
    cosine = [learning_rate(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert learning_rate(0, TrainConfig(steps=10, lr=1e-3)) == pytest.approx(1e-3)  # no warm-up: peak at once

    # The loop really uses it: with log_every=1 every metrics line reports the lr of its step.
    model = toy_model()
    cfg = TrainConfig(steps=8, lr=1e-2, min_lr=1e-4, warmup_steps=3, log_every=1)
    train(model, ce_loss(model), seeded_loader, cfg, job_dir=tmp_path)
    assert [m["lr"] for m in read_metrics(tmp_path)] == pytest.approx([learning_rate(s, cfg) for s in range(8)])


class Decays(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)                             # "encoder" contains "code" but must decay
        self.norm = nn.LayerNorm(4)
        self.cls_token = nn.Parameter(torch.ones(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.ones(1, 5, 4))
        self.signatures = nn.Parameter(torch.ones(6, 4))
        self.cell_codes = nn.Parameter(torch.ones(6, 4))
        self.table = nn.Embedding(10, 4)
        self.frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)


def test_no_weight_decay_on_1d_tokens_embeddings(tmp_path: Path) -> None:
    m = Decays()
    groups = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    kept = {names[id(p)] for p in groups[1]["params"]}
    assert decayed == {"encoder.weight"}
    assert kept == {"encoder.bias", "norm.weight", "norm.bias", "cls_token", "pos_embed", "signatures",
                    "cell_codes", "table.weight"}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0

    # Behaviour: with zero gradients AdamW's only update is the decoupled decay p -= lr * wd * p.
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    loss_fn = lambda x, y: (sum((p * 0).sum() for p in m.parameters() if p.requires_grad) + x.sum() * 0, None)
    cfg = TrainConfig(steps=1, lr=0.1, weight_decay=0.5, grad_clip=None, log_every=1)
    result = train(m, loss_fn, seeded_loader, cfg, job_dir=tmp_path)
    assert result.train_acc is None
    for n, p in m.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if n == "encoder.weight" else before[n]
        assert torch.allclose(p.detach(), expected), n


def test_grad_clipping_bounds_the_norm(tmp_path: Path) -> None:
    norms: list[float] = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        for clip, sub in ((0.5, "clipped"), (None, "free")):
            model = toy_model()
            loss_fn = lambda x, y: (1000.0 * model(x).square().mean(), None)
            train(model, loss_fn, seeded_loader, TrainConfig(steps=4, grad_clip=clip), job_dir=tmp_path / sub)
    finally:
        handle.remove()
    clipped, free = norms[:4], norms[4:]
    assert max(clipped) <= 0.5 + 1e-5 and min(clipped) > 0.4
    assert min(free) > 5.0


def test_mixup_soft_targets_and_training(tmp_path: Path) -> None:
    x, y = torch.randn(16, DIM), torch.arange(16) % CLASSES
    y[-1] = 2  # sample 0 (class 0) is mixed with sample 15 (class 2)
    mix = make_mixer(TrainConfig(steps=1, mixup=0.8, num_classes=CLASSES, seed=5))
    numpy_before = np.random.get_state()[1].copy()
    mx, my = mix(x.clone(), y, 3)
    assert np.array_equal(np.random.get_state()[1], numpy_before)  # timm's numpy draws are seeded, then undone
    assert my.shape == (16, CLASSES) and my.dtype == torch.float32
    assert torch.allclose(my.sum(1), torch.ones(16))
    lam = my[0, 0].item()
    assert 0 < lam < 1 and my[0, 2].item() == pytest.approx(1 - lam) and torch.allclose(mx[0], lam * x[0] + (1 - lam) * x[-1], atol=1e-6)
    again, _ = mix(x.clone(), y, 3)
    other, _ = mix(x.clone(), y, 4)
    assert torch.equal(again, mx) and not torch.equal(other, mx)  # a pure function of (seed, step)
    assert make_mixer(TrainConfig(steps=1)) is None
    with pytest.raises(MonomodError, match="num_classes"):
        make_mixer(TrainConfig(steps=1, mixup=0.8))
    # CutMix pastes a box of the partner image: pixels are either one image's or the other's
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    cut, target = make_mixer(TrainConfig(steps=1, cutmix=1.0, num_classes=2, seed=1))(images.clone(), torch.tensor([0, 1]), 0)
    assert set(cut.unique().tolist()) <= {0.0, 1.0} and torch.allclose(target.sum(1), torch.ones(2))

    # soft CE with one-hot targets == hard CE, label smoothing included
    logits = torch.randn(16, CLASSES)
    onehot = F.one_hot(y, CLASSES).float()
    assert torch.allclose(soft_cross_entropy(logits, onehot, 0.1), F.cross_entropy(logits, y, label_smoothing=0.1))
    assert torch.allclose(soft_cross_entropy(logits, y, 0.1), F.cross_entropy(logits, y, label_smoothing=0.1))

    model = toy_model()
    seen = []

    def loss_fn(xb, yb):
        seen.append(yb)
        logits = model(xb)
        return soft_cross_entropy(logits, yb, 0.1), logits

    cfg = TrainConfig(steps=60, lr=2e-2, warmup_steps=5, mixup=0.2, num_classes=CLASSES, log_every=10)
    result = train(model, loss_fn, seeded_loader, cfg, job_dir=tmp_path)
    assert all(t.is_floating_point() and t.shape[1] == CLASSES for t in seen)
    assert any(((t > 0) & (t < 1)).any() for t in seen)          # really soft
    assert math.isfinite(result.final_loss) and evaluate(model, seeded_loader(0)) > 0.8


def test_metrics_and_result_files(tmp_path: Path) -> None:
    model = toy_model()
    cfg = TrainConfig(steps=12, log_every=5)
    result = train(model, ce_loss(model), seeded_loader, cfg, job_dir=tmp_path, label="meta")
    lines = read_metrics(tmp_path)
    assert [m["step"] for m in lines] == [5, 10, 12]
    for m in lines:
        assert set(m) == {"step", "loss", "acc", "lr", "samples_per_second", "seconds"}
        assert math.isfinite(m["loss"]) and 0 <= m["acc"] <= 1 and m["samples_per_second"] > 0
    assert lines[0]["seconds"] <= lines[-1]["seconds"]
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["label"] == "meta" and saved["steps"] == 12 and saved["final_loss"] == result.final_loss
    assert saved["resumed_from"] == 0
    tensors, state = load_checkpoint(tmp_path / "checkpoint")
    assert state["step"] == 12 and state["config"] == cfg.to_json()
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in tensors)
    assert TrainConfig.from_json(state["config"]) == cfg
    with pytest.raises(MonomodError, match="unknown training config keys"):
        TrainConfig.from_json({"steps": 3, "learning_rate": 1.0})
    with pytest.raises(MonomodError, match="precision"):
        TrainConfig(steps=3, precision="fp8")
    with pytest.raises(MonomodError, match="compile"):
        TrainConfig(steps=3, compile="yes")


def test_nan_loss_stops_with_label_and_step(tmp_path: Path) -> None:
    model = toy_model()
    calls = 0

    def loss_fn(x, y):
        nonlocal calls
        calls += 1
        loss, logits = ce_loss(model)(x, y)
        return (loss * float("nan") if calls == 8 else loss), logits

    with pytest.raises(MonomodError) as info:
        train(model, loss_fn, seeded_loader, TrainConfig(steps=20, checkpoint_every=5), job_dir=tmp_path,
              label="m2mkd-module-2")
    message = str(info.value)
    assert "m2mkd-module-2" in message and "step 8" in message and "learning rate" in message
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no NaN step was taken
    tensors, state = load_checkpoint(tmp_path / "checkpoint")
    assert state["step"] == 5 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


# --------------------------------------------------------------------------------------------------- resume


def test_resume_after_interrupt_is_bitwise_identical(tmp_path: Path) -> None:
    # dropout + mixup + a loader drawing from the global RNG: every source of randomness must line up
    kw = dict(loader=global_rng_loader, dropout=0.2, mixup=0.4, num_classes=CLASSES)
    reference, ref_result = run_job(tmp_path / "ref", **kw)

    with pytest.raises(KeyboardInterrupt):
        run_job(tmp_path / "job", stop_at=13, **kw)
    assert load_checkpoint(tmp_path / "job" / "checkpoint")[1]["step"] == 10
    assert max(m["step"] for m in read_metrics(tmp_path / "job")) == 12  # logged beyond the checkpoint

    resumed, result = run_job(tmp_path / "job", **kw)
    assert result.resumed_from == 10 and result.steps == 20
    assert_bitwise_equal(resumed, reference)
    assert result.final_loss == ref_result.final_loss
    steps = [m["step"] for m in read_metrics(tmp_path / "job")]
    assert steps == [m["step"] for m in read_metrics(tmp_path / "ref")] == list(range(2, 21, 2))

    # A finished job returns at once with its weights loaded; nothing is trained again.
    again, result = run_job(tmp_path / "job", stop_at=1, **kw)
    assert result.resumed_from == 20
    assert_bitwise_equal(again, reference)

    # A different config does not resume from a stale checkpoint.
    _, result = run_job(tmp_path / "job", steps=6, **kw)
    assert result.resumed_from == 0 and [m["step"] for m in read_metrics(tmp_path / "job")] == [2, 4, 6]


def test_resume_after_real_sigkill_is_bitwise_identical(tmp_path: Path) -> None:
    reference, _ = run_job(tmp_path / "ref", dropout=0.1)
    script = (
        "import sys, importlib.util, torch\n"
        "from pathlib import Path\n"
        "torch.set_num_threads(int(sys.argv[3]))\n"
        "spec = importlib.util.spec_from_file_location('toy_train', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "mod.run_job(Path(sys.argv[2]), stop_at=13, how='sigkill', dropout=0.1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, __file__, str(tmp_path / "job"), str(torch.get_num_threads())],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(tmp_path / "job" / "checkpoint")[1]["step"] == 10

    resumed, result = run_job(tmp_path / "job", dropout=0.1)
    assert result.resumed_from == 10
    assert_bitwise_equal(resumed, reference)


def test_resume_mid_epoch_with_loader_workers_is_bitwise_identical(tmp_path: Path) -> None:
    # killed at step 13 (mid-epoch: 6 batches per epoch), checkpoint at 10; two loader workers, mixup and dropout on
    kw = dict(loader=workers_loader, dropout=0.2, mixup=0.4, num_classes=CLASSES)
    reference, ref_result = run_job(tmp_path / "ref", **kw)
    script = (
        "import sys, importlib.util, torch\n"
        "from pathlib import Path\n"
        "spec = importlib.util.spec_from_file_location('toy_train', sys.argv[1])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "mod.run_job(Path(sys.argv[2]), stop_at=13, how='sigkill', loader=mod.workers_loader, dropout=0.2, "
        "mixup=0.4, num_classes=mod.CLASSES)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, __file__, str(tmp_path / "job")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(tmp_path / "job" / "checkpoint")[1]["batch_in_epoch"] == 4

    resumed, result = run_job(tmp_path / "job", **kw)
    assert result.resumed_from == 10
    assert_bitwise_equal(resumed, reference)
    assert result.final_loss == ref_result.final_loss
    # and the same batches when the main process loads them
    in_process, _ = run_job(tmp_path / "main", dropout=0.2, mixup=0.4, num_classes=CLASSES,
                            loader=lambda epoch: workers_loader(epoch, workers=0))
    assert_bitwise_equal(in_process, reference)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_save_over_existing_checkpoint_and_shared_storage(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint"
    base = torch.arange(12.0)
    save_checkpoint(path, {"a": base, "b": base, "t": base.view(3, 4).t(), "part": base[2:5]}, {"v": 1})
    tensors, state = load_checkpoint(path)
    assert state == {"v": 1} and torch.equal(tensors["t"], base.view(3, 4).t()) and torch.equal(tensors["b"], base)
    assert torch.equal(tensors["part"], base[2:5])

    save_checkpoint(path, {"a": torch.zeros(2)}, {"v": 2})
    tensors, state = load_checkpoint(path)
    assert state == {"v": 2} and set(tensors) == {"a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no siblings left behind

    # A failure while swapping leaves the previous checkpoint in place and complete.
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".checkpoint.tmp-"):
            raise OSError("disk full")
        return real_replace(src, dst)

    ckpt.os.replace = failing_replace
    try:
        with pytest.raises(OSError):
            save_checkpoint(path, {"a": torch.ones(2)}, {"v": 3})
    finally:
        ckpt.os.replace = real_replace
    assert load_checkpoint(path)[1] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_stray_directories_of_killed_writers(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint"
    # A writer killed before its rename: a half-written temporary sibling, no checkpoint.
    stray = tmp_path / ".checkpoint.tmp-999-deadbeef"
    stray.mkdir()
    (stray / "tensors.safetensors").write_bytes(b"\x00" * 5)
    assert not checkpoint_exists(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(path)

    save_checkpoint(path, {"w": torch.ones(3)}, {"step": 5})
    assert not stray.exists()
    (stray).mkdir()
    (stray / "state.json").write_text('{"step": 9')
    assert load_checkpoint(path)[1] == {"step": 5}

    # A writer killed between moving the old checkpoint aside and moving the new one in: the aside copy is used,
    # and the next save puts things right.
    os.replace(path, tmp_path / ".checkpoint.old-999-cafebabe")
    assert checkpoint_exists(path) and load_checkpoint(path)[1] == {"step": 5}
    save_checkpoint(path, {"w": torch.zeros(3)}, {"step": 10})
    assert load_checkpoint(path)[1] == {"step": 10}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_sigkill_during_saves_never_leaves_a_torn_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint"
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from monomod.runtime.checkpoint import save_checkpoint\n"
        "path = Path(sys.argv[1])\n"
        "for i in range(100000):\n"
        "    save_checkpoint(path, {'w': torch.full((20000,), float(i))}, {'i': i})\n"
        "    if i == 0: print('ready', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_exists(path)
    tensors, state = load_checkpoint(path)
    assert state["i"] >= 1 and torch.equal(tensors["w"], torch.full((20000,), float(state["i"])))


def test_optimizer_and_rng_round_trip(tmp_path: Path) -> None:
    model = toy_model()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.8, 0.95))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, DIM)).square().mean().backward()
        opt.step()
    tensors, meta = optimizer_state_to_tensors(opt.state_dict())
    atomic_write_json(tmp_path / "meta.json", meta)
    save_checkpoint(tmp_path / "c", tensors, {"optimizer": meta})
    loaded, state = load_checkpoint(tmp_path / "c")
    fresh = torch.optim.AdamW(param_groups(model, 0.05), lr=1.0)
    fresh.load_state_dict(optimizer_state_from_tensors(loaded, state["optimizer"]))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"] and b["param_groups"][0]["betas"] == (0.8, 0.95)
    for pid in a["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][pid][key], b["state"][pid][key])

    import random
    rng_tensors, rng_meta = capture_rng_state()
    first = (torch.rand(3), random.random())
    torch.rand(5), random.random()
    restore_rng_state(rng_tensors, json.loads(json.dumps(rng_meta)))
    second = (torch.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and first[1] == second[1]


# ------------------------------------------------------------------------------------------ precision, compile


def test_precision_auto_is_bf16_only_where_it_is_native(monkeypatch) -> None:
    import monomod.runtime.config as config_module

    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert config_module.native_bf16("meta") is False


def test_bf16_job_runs_under_autocast_and_its_loss_is_finite(tmp_path: Path) -> None:
    model = toy_model()
    dtypes = []

    def loss_fn(x, y):
        logits = model(x)
        dtypes.append(logits.dtype)
        return soft_cross_entropy(logits, y), logits

    cfg = TrainConfig(steps=12, lr=1e-2, warmup_steps=2, log_every=4, precision="bf16", device="cpu")
    result = train(model, loss_fn, seeded_loader, cfg, job_dir=tmp_path / "bf16", label="toy")
    assert set(dtypes) == {torch.bfloat16}  # the forward ran in bf16; weights and AdamW stay fp32
    assert math.isfinite(result.final_loss) and all(math.isfinite(m["loss"]) for m in read_metrics(tmp_path / "bf16"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = toy_model()
    train(reference, ce_loss(reference), seeded_loader, TrainConfig(steps=12, lr=1e-2, warmup_steps=2, log_every=4,
          precision="fp32", device="cpu"), job_dir=tmp_path / "fp32", label="toy")
    assert not torch.equal(model[0].weight, reference[0].weight)  # bf16 really changed the arithmetic


def test_compiled_job_trains_checkpoints_plain_keys_and_resumes(tmp_path: Path) -> None:
    """torch.compile wraps the loss function, never the module: checkpoint keys stay plain, and a compiled run
    resumes an eager one's checkpoint (and back) as any run does."""
    torch._dynamo.reset()
    model, result = run_job(tmp_path / "job", steps=10, compile=True)
    assert result.steps == 10 and math.isfinite(result.final_loss)
    tensors, state = load_checkpoint(tmp_path / "job" / "checkpoint")
    assert state["config"]["compile"] is True
    assert not any("_orig_mod" in k for k in tensors) and set(model.state_dict()) == {
        k[len("model."):] for k in tensors if k.startswith("model.")}
    eager, _ = run_job(tmp_path / "eager", steps=10)
    torch.testing.assert_close(model.state_dict(), eager.state_dict(), rtol=1e-4, atol=1e-5)
    with pytest.raises(KeyboardInterrupt):
        run_job(tmp_path / "mixed", steps=10, stop_at=8)  # eager, killed after its step-5 checkpoint
    resumed, result = run_job(tmp_path / "mixed", steps=10, compile=True)
    assert result.resumed_from == 5 and result.steps == 10
    torch.testing.assert_close(resumed.state_dict(), eager.state_dict(), rtol=1e-4, atol=1e-5)
