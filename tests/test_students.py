"""build_student: one entry point over the NAC, MoE and ViT families (small CPU presets, 32 px, 10 classes)."""
from __future__ import annotations

import pytest
import torch

from monomod import STUDENT_KINDS, MonomodError, StagedModel, build_student

IMG, NC, B, K = 32, 10, 2, 4


@pytest.fixture(scope="module", params=STUDENT_KINDS)
def student(request):
    torch.manual_seed(0)
    return request.param, build_student(request.param, modules=K, num_classes=NC, img_size=IMG)


@pytest.fixture(scope="module")
def images():
    return torch.randn(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_kinds():
    assert STUDENT_KINDS == ("nac", "moe", "vit")


def test_forward_backward(student, images):
    _, model = student
    assert isinstance(model, StagedModel) and len(model.stages) == K
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(images)
    assert out.shape == (B, NC)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    model.zero_grad(set_to_none=True)


def test_chaining_stages_equals_forward(student, images):
    _, model = student
    model.eval()
    with torch.no_grad():
        x = images
        for stage in model.stages:
            x = stage(x)
        torch.testing.assert_close(x, model(images), rtol=0, atol=0)


def test_interfaces(student):
    _, model = student
    kinds = [i.kind for i in model.interfaces]
    assert kinds == ["image->tokens"] + ["tokens->tokens"] * (K - 2) + ["tokens->logits"]
    assert model.interfaces[0].width_in is None and model.interfaces[-1].width_out is None


def test_default_preset_is_recorded(student):
    kind, model = student
    assert model.preset == {"nac": "small", "moe": "small", "vit": "micro"}[kind]


def test_explicit_preset_and_override():
    model = build_student("moe", modules=2, num_classes=NC, img_size=IMG, preset="tiny", num_experts=2)
    assert model.preset == "tiny" and model.config.num_experts == 2


def test_unknown_kind_names_the_allowed_kinds():
    with pytest.raises(MonomodError, match="unknown student kind 'resnet'.*nac, moe, vit"):
        build_student("resnet", modules=K, num_classes=NC, img_size=IMG)


def test_family_errors_become_monomod_errors():
    with pytest.raises(MonomodError, match="NAC needs at least 3 modules"):
        build_student("nac", modules=2, num_classes=NC, img_size=IMG)
    with pytest.raises(MonomodError, match="unknown ViT preset"):
        build_student("vit", modules=K, num_classes=NC, img_size=IMG, preset="gigantic")
