"""ViT student: timm model cut into stages that reference (not copy) its modules."""
from __future__ import annotations

import pytest
import torch

from monomod.students.vit import build_vit, split_depth


def chain(model, x: torch.Tensor) -> torch.Tensor:
    for stage in model.stages:
        x = stage(x)
    return x


def test_forward_backward() -> None:
    torch.manual_seed(0)
    model = build_vit(modules=2, num_classes=10, img_size=32)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    logits.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.aux_loss() is None


@pytest.mark.parametrize("modules", [2, 3, 4])
def test_stages_chain_equals_timm_forward(modules: int) -> None:
    torch.manual_seed(0)
    model = build_vit(modules=modules, num_classes=10, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(chain(model, x), model.vit(x), rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [
    dict(global_pool="avg", class_token=False),
    dict(reg_tokens=2, no_embed_class=True),
    dict(global_pool="map", pre_norm=True),
    dict(pos_embed="none"),
])
def test_chain_equals_timm_forward_for_timm_variants(overrides: dict) -> None:
    torch.manual_seed(0)
    model = build_vit(modules=2, num_classes=10, img_size=32, **overrides).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(chain(model, x), model.vit(x), rtol=0, atol=0)


def test_parameters_shared_not_duplicated() -> None:
    model = build_vit(modules=3, num_classes=10, img_size=32)
    vit = model.vit
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in vit.parameters())
    assert {id(p) for p in model.parameters()} == {id(p) for p in vit.parameters()}
    assert len(model.state_dict()) == len(vit.state_dict())  # the timm model is not a registered submodule
    assert all(k.startswith("stages.") for k in model.state_dict())

    # An update through the student is seen by the timm model (same tensors).
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), rtol=0, atol=0)


def test_contiguous_groups_and_interfaces() -> None:
    model = build_vit(modules=3, num_classes=10, img_size=32)
    stage_blocks = [b for s in model.stages for b in s.blocks]
    assert len(stage_blocks) == 4 and all(a is b for a, b in zip(stage_blocks, model.vit.blocks))
    assert [len(s.blocks) for s in model.stages] == [2, 1, 1]
    assert model.stages[0].patch_embed is model.vit.patch_embed
    assert model.stages[0].pos_embed is model.vit.pos_embed and model.stages[-1].head is model.vit.head
    assert [(i.kind, i.width_in, i.width_out) for i in model.interfaces] == [
        ("image->tokens", None, 64), ("tokens->tokens", 64, 64), ("tokens->logits", 64, None)]

    tokens = torch.randn(2, 9, 64)  # any token count
    assert model.stages[1](tokens).shape == (2, 9, 64)
    assert model.stages[2](tokens).shape == (2, 10)


def test_split_depth_and_errors() -> None:
    assert split_depth(12, 4) == [3, 3, 3, 3]
    assert split_depth(32, 10) == [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]
    with pytest.raises(ValueError, match=r"depth=4.*K=5"):
        build_vit(modules=5, num_classes=10, img_size=32)
    with pytest.raises(ValueError, match=r"K >= 2"):
        build_vit(modules=1, num_classes=10, img_size=32)
    with pytest.raises(ValueError, match="preset"):
        build_vit(modules=2, num_classes=10, img_size=32, preset="huge")
    with pytest.raises(ValueError, match="dynamic_img_size"):
        build_vit(modules=2, num_classes=10, img_size=32, dynamic_img_size=True)


def test_presets_shapes() -> None:
    with torch.device("meta"):
        tiny = build_vit(modules=4, num_classes=1000, img_size=224, preset="tiny")
    assert sum(p.numel() for p in tiny.parameters()) == 5_717_416  # timm vit_tiny_patch16_224
