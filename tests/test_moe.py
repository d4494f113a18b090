"""V-MoE student: routing, capacity, auxiliary loss, layer placement, staging and upcycling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from monomod.students.moe import MoELayer, build_moe, is_moe, moe_block_indices, student_blocks, upcycle_experts


def expert(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e applied to one token, written out independently of the batched path."""
    return F.gelu(x @ layer.w1[e] + layer.b1[e, 0]) @ layer.w2[e] + layer.b2[e, 0]


def router_with_identity(layer: MoELayer) -> None:
    """Router logits = the first E features of each token, so tests can dictate the routing."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, : layer.num_experts].copy_(torch.eye(layer.num_experts))


def test_forward_backward_and_stage_chain() -> None:
    torch.manual_seed(0)
    model = build_moe(modules=3, num_classes=10, img_size=32, preset="small", gate="vmoe")
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 10)
    aux = model.aux_loss()
    assert aux is not None and aux.ndim == 0 and torch.isfinite(aux)
    per_layer = [b.mlp.last_aux_loss for b in student_blocks(model)]
    assert torch.allclose(aux, torch.stack(per_layer).sum())
    (logits.square().mean() + aux).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(b.mlp.router.weight.grad.abs().sum() > 0 for b in student_blocks(model))

    model.eval()
    with torch.no_grad():
        h = x
        for stage in model.stages:
            h = stage(h)
        torch.testing.assert_close(h, model(x), rtol=0, atol=0)


def test_interfaces_contiguous_stages_and_any_token_count() -> None:
    model = build_moe(modules=3, num_classes=10, img_size=32, preset="small")
    assert [(i.kind, i.width_in, i.width_out) for i in model.interfaces] == [
        ("image->tokens", None, 64), ("tokens->tokens", 64, 64), ("tokens->logits", 64, None)]
    assert [len(s.blocks) for s in model.stages] == [2, 1, 1]  # depth 4 over K=3: remainder to the first stages
    tokens = torch.randn(2, 7, 64)  # not the 65 tokens the image path produces
    assert model.stages[1](tokens).shape == (2, 7, 64)
    assert model.stages[2](tokens).shape == (2, 10)


def test_bad_stage_counts() -> None:
    with pytest.raises(ValueError, match=r"depth=4.*K=5"):
        build_moe(modules=5, num_classes=10, img_size=32, preset="small")
    with pytest.raises(ValueError, match=r"K >= 2"):
        build_moe(modules=1, num_classes=10, img_size=32, preset="small")
    with pytest.raises(ValueError, match="unknown MoEConfig field"):
        build_moe(modules=2, num_classes=10, img_size=32, preset="small", num_expert=3)


def test_unlimited_capacity_matches_per_token_reference() -> None:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, num_experts=4, top_k=2, gate="vmoe", capacity_factor=None)
    with torch.no_grad():
        layer.b1.normal_()
        layer.b2.normal_()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y = layer(x)
        expected = torch.zeros_like(x)
        for b in range(2):
            for t in range(5):
                probs = torch.softmax(layer.router(x[b, t]), -1)
                gates, chosen = probs.topk(2)
                for g, e in zip(gates, chosen):
                    expected[b, t] += g * expert(layer, int(e), x[b, t])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    assert layer.last_drop_fraction == 0


def test_capacity_drops_exactly_the_overflow() -> None:
    torch.manual_seed(0)
    # N=4 tokens, E=4, k=2, factor 0.5 -> C = ceil(0.5 * 2 * 4 / 4) = 1 slot per expert.
    layer = MoELayer(8, 16, num_experts=4, top_k=2, gate="vmoe", capacity_factor=0.5)
    assert layer.capacity(4) == 1
    router_with_identity(layer)
    x = torch.randn(1, 4, 8)
    x[0, :, :4] = torch.tensor([
        [3.0, 2.0, 0.0, 0.0],  # t0: 1st e0, 2nd e1
        [3.0, 0.0, 2.0, 0.0],  # t1: 1st e0, 2nd e2
        [2.0, 3.0, 0.0, 0.0],  # t2: 1st e1, 2nd e0
        [0.0, 0.0, 3.0, 2.0],  # t3: 1st e2, 2nd e3
    ])
    # First choices go first, in token order: t0->e0, t1->e0 (full: dropped), t2->e1, t3->e2.
    # Then second choices: t0->e1 (full: t2's first choice came first), t1->e2 (full), t2->e0 (full), t3->e3.
    kept = {(0, 0), (2, 1), (3, 2), (3, 3)}
    with torch.no_grad():
        y = layer(x)[0]
        probs = torch.softmax(x[0, :, :4], -1)
        for t in range(4):
            expected = sum((probs[t, e] * expert(layer, e, x[0, t]) for (tt, e) in kept if tt == t),
                           torch.zeros(8))
            torch.testing.assert_close(y[t], expected, rtol=0, atol=1e-6)
        assert torch.equal(y[1], torch.zeros(8))  # both of t1's choices overflowed
        assert layer.last_drop_fraction == 0.5

        # Tokens that lost nothing match the same layer without capacity limit; the others do not.
        layer.capacity_factor = None
        y_free = layer(x)[0]
    assert torch.allclose(y[3], y_free[3], atol=1e-6)
    assert not torch.allclose(y[0], y_free[0], atol=1e-4)


def test_capacity_formula() -> None:
    layer = MoELayer(8, 16, num_experts=8, top_k=2, gate="vmoe", capacity_factor=1.25)
    assert layer.capacity(197) == math.ceil(1.25 * 2 * 197 / 8) == 62
    layer.capacity_factor = 100.0
    assert layer.capacity(197) == 197  # never more than N
    layer.capacity_factor = None
    assert layer.capacity(197) == 197


def test_aux_loss_matches_formula_on_hand_built_routing() -> None:
    layer = MoELayer(4, 8, num_experts=2, top_k=1, gate="vmoe", aux_loss_weight=0.5)
    router_with_identity(layer)
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    x = torch.zeros(1, 3, 4)
    x[0, :, :2] = probs.log()  # softmax(log p) = p
    layer(x)
    # importance = [1.8, 1.2]: CV^2 = var / mean^2 = 0.09 / 2.25 = 0.04
    # top-1 fractions f = [2/3, 1/3], mean probs P = [0.6, 0.4]: Switch term = 2 * (0.4 + 0.4/3) = 16/15
    expected = 0.5 * (0.04 + 16 / 15)
    assert layer.last_aux_loss.item() == pytest.approx(expected, abs=1e-6)
    layer.last_aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0

    layer(torch.zeros(1, 5, 4))  # uniform router: CV^2 = 0 and the Switch term is exactly 1
    assert layer.last_aux_loss.item() == pytest.approx(0.5, abs=1e-6)

    layer.aux_loss_weight = 0.0
    layer(x)
    assert layer.last_aux_loss is None


@pytest.mark.parametrize("spec, expected", [
    ("every", [0, 1, 2, 3]),
    ("every_other", [1, 3]),
    ("last:1", [3]),
    ("last:3", [1, 2, 3]),
    ("last:0", []),
])
def test_moe_layer_placement(spec: str, expected: list[int]) -> None:
    model = build_moe(modules=2, num_classes=10, img_size=32, preset="tiny", depth=4, moe_layers=spec)
    assert [i for i, b in enumerate(student_blocks(model)) if is_moe(b)] == expected
    assert moe_block_indices("every_other", 12) == [1, 3, 5, 7, 9, 11]


@pytest.mark.parametrize("spec", ["every_third", "last:", "last:x", "last:5", "last:-1", "Every"])
def test_bad_moe_layers(spec: str) -> None:
    with pytest.raises(ValueError, match="moe_layers"):
        build_moe(modules=2, num_classes=10, img_size=32, preset="tiny", depth=4, moe_layers=spec)


def test_vmoe_base_parameter_count() -> None:
    with torch.device("meta"):  # shapes only: no 2 GB allocation on a shared CPU box
        model = build_moe(modules=4, num_classes=1000, img_size=224, preset="vmoe_base")
    count = sum(p.numel() for p in model.parameters())
    d, h, e, layers = 768, 3072, 8, 12
    dense_vit_b16 = 86_567_656  # timm vit_base_patch16_224, 1000 classes
    mlp = d * h + h + h * d + d
    assert count == dense_vit_b16 + layers * ((e - 1) * mlp + d * e) == 483_325_672
    assert [len(s.blocks) for s in model.stages] == [3, 3, 3, 3]
    assert all(is_moe(b) and b.mlp.num_experts == 8 and b.mlp.top_k == 2 for b in student_blocks(model))


def _teacher(width: int, depth: int) -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=width, depth=depth, num_heads=4, num_classes=10)


def test_upcycling_copies_teacher_mlps() -> None:
    torch.manual_seed(0)
    teacher = _teacher(64, 6)
    student = build_moe(modules=2, num_classes=10, img_size=32, preset="small")
    assert upcycle_experts(student, teacher) == 4
    # Student block i <- teacher block round(i * 5 / 3): 0, 2, 3, 5.
    for block, j in zip(student_blocks(student), [0, 2, 3, 5]):
        fc1, fc2 = teacher.blocks[j].mlp.fc1, teacher.blocks[j].mlp.fc2
        for e in range(block.mlp.num_experts):
            assert torch.equal(block.mlp.w1[e], fc1.weight.t()) and torch.equal(block.mlp.b1[e, 0], fc1.bias)
            assert torch.equal(block.mlp.w2[e], fc2.weight.t()) and torch.equal(block.mlp.b2[e, 0], fc2.bias)

    # Identical experts behind the reference gate (k gates summing to 1): the layer is the teacher MLP.
    moe = student_blocks(student)[0].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), teacher.blocks[0].mlp(x), rtol=1e-5, atol=1e-5)

    sparse = build_moe(modules=2, num_classes=10, img_size=32, preset="small", moe_layers="every_other")
    assert upcycle_experts(sparse, teacher) == 2


def test_upcycling_skips_mismatched_shapes() -> None:
    student = build_moe(modules=2, num_classes=10, img_size=32, preset="small")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert upcycle_experts(student, _teacher(32, 4)) == 0
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    with pytest.raises(ValueError, match="no .blocks"):
        upcycle_experts(student, torch.nn.Linear(2, 2))


# --- gates -----------------------------------------------------------------------------------------------------------
def test_reference_gate_renormalises_the_top_k_logits() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 16, num_experts=4, top_k=2, gate="reference", capacity_factor=0.25)
    assert layer.router.bias is not None
    x = torch.randn(3, 5, 8)
    gates, experts, probs = layer.scores(x.reshape(-1, 8))
    assert probs is None and torch.allclose(gates.sum(-1), torch.ones(15))
    logits = layer.router(x.reshape(-1, 8))
    torch.testing.assert_close(gates, logits.topk(2).values.softmax(-1))
    assert layer.capacity(15) == 15  # no capacity limit, whatever capacity_factor says
    with torch.no_grad():
        y = layer(x)
    assert layer.last_drop_fraction.item() == 0.0 and layer.last_aux_loss is None
    # per-token check: the gated sum of the two chosen experts
    for n, token in enumerate(x.reshape(-1, 8)):
        want = sum(gates[n, j] * expert(layer, int(experts[n, j]), token) for j in range(2))
        torch.testing.assert_close(y.reshape(-1, 8)[n], want, rtol=1e-5, atol=1e-5)


def test_gate_setting_reaches_every_layer_and_keeps_the_vmoe_option() -> None:
    ref = build_moe(modules=2, num_classes=10, img_size=32, preset="small")
    assert ref.config.gate == "reference" and all(b.mlp.gate == "reference" for b in student_blocks(ref))
    ref(torch.randn(2, 3, 32, 32))
    assert ref.aux_loss() is None
    vmoe = build_moe(modules=2, num_classes=10, img_size=32, preset="small", gate="vmoe", capacity_factor=0.5)
    vmoe(torch.randn(2, 3, 32, 32))
    layer = student_blocks(vmoe)[0].mlp
    assert layer.router.bias is None and layer.capacity(100) == 25
    assert vmoe.aux_loss() is not None and vmoe.aux_loss() > 0
    with pytest.raises(ValueError, match="gate"):
        build_moe(modules=2, num_classes=10, img_size=32, preset="small", gate="switch")


def test_moe_and_vit_students_share_their_stages() -> None:
    from monomod.students.vit import ViTBlocksStage, ViTStudent

    model = build_moe(modules=3, num_classes=10, img_size=32, preset="small")
    assert isinstance(model, ViTStudent) and isinstance(model.stages[1], ViTBlocksStage)
