import pytest
import torch
from torch import nn

import monomod


def test_vit_cuts_are_single_residual_stream_tensors(traced_models):
    part = monomod.partition(traced_models["vit"], 4)
    assert part.k == 4 and part.method == "mincut"
    for cut in part.cuts:
        assert len(cut) == 1 and cut[0].shape == ["B", 5, 192]
    assert part.balance <= 1.10
    assert part.modules[0].covers[:3] == ("patch_embed", "cls_token", "pos_embed")
    assert part.modules[-1].covers[-2:] == ("norm", "head")


def test_vit_base_eight_modules_is_balanced_by_half_block_cuts():
    model = monomod.load_model("vit_base", device="meta")
    traced = monomod.trace(model, torch.randn(1, 3, 224, 224, device="meta"), name="vit_base")
    part = monomod.partition(traced, 8)
    assert all(len(cut) == 1 and cut[0].shape == ["B", 197, 768] for cut in part.cuts)
    assert part.balance <= 1.10
    assert any("(norm1, attn)" in label for m in part.modules for label in m.covers)  # a cut between halves


def test_partition_is_deterministic(traced_models):
    first = monomod.partition(traced_models["swin"], 4)
    second = monomod.partition(traced_models["swin"], 4)
    assert first.assignment == second.assignment
    assert first.to_json() == second.to_json()


@pytest.mark.parametrize("family", ["vit", "resnet", "convnext", "swin", "deit"])
@pytest.mark.parametrize("cost", ["flops", "params"])
def test_parts_are_contiguous_closed_and_cover_everything(traced_models, family, cost):
    traced = traced_models[family]
    part = monomod.partition(traced, 3, cost=cost)
    for node in traced.graph_module.graph.nodes:
        for user in node.users:  # no edge runs backwards: every module only reads from earlier ones
            assert part.assignment[node.name] <= part.assignment[user.name]
    assert sum(m.flops for m in part.modules) >= traced.flops
    assert sum(m.params for m in part.modules) == traced.params
    assert all(m.nodes for m in part.modules)


def test_params_cost_balances_parameters(traced_models):
    part = monomod.partition(traced_models["vit"], 2, cost="params")
    assert part.cost == "params"
    assert part.balance == pytest.approx(max(m.params for m in part.modules) * 2 / traced_models["vit"].params)
    assert part.balance <= 1.10


def test_manual_cuts_by_module_name(traced_models):
    part = monomod.partition(traced_models["vit"], cuts=["blocks.4", "blocks.8"])
    assert part.method == "manual" and part.k == 3
    assert part.modules[0].covers[-1] == "blocks.0-3"
    assert part.modules[1].covers == ("blocks.4-7",)
    assert part.modules[2].covers[0] == "blocks.8-11"


def test_bad_partition_requests(traced_models):
    traced = traced_models["vit"]
    with pytest.raises(monomod.MonomodError, match="positive integer"):
        monomod.partition(traced, 0)
    with pytest.raises(monomod.MonomodError, match="more modules than .* places to cut"):
        monomod.partition(traced, 10_000)
    with pytest.raises(monomod.MonomodError, match="matches no module.*did you mean"):
        monomod.partition(traced, cuts=["blocks.40"])
    with pytest.raises(monomod.MonomodError, match="not in forward order"):
        monomod.partition(traced, cuts=["blocks.6", "blocks.3"])
    with pytest.raises(monomod.MonomodError, match="make 3 modules, not 4"):
        monomod.partition(traced, 4, cuts=["blocks.4", "blocks.8"])
    with pytest.raises(monomod.MonomodError, match="unknown cost"):
        monomod.partition(traced, 2, cost="bytes")


class _LateShapeUse(nn.Module):
    """Reads the batch size at the very start and uses it at the very end (a common timm idiom)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])

    def forward(self, x):
        batch = x.shape[0]
        h = self.layers(x.flatten(1))
        return h.reshape(batch, 8, 8)


def test_non_tensor_values_never_force_a_bad_cut():
    traced = monomod.trace(_LateShapeUse(), torch.randn(1, 8, 8))
    part = monomod.partition(traced, 3)
    for cut in part.cuts:  # one activation per cut; the int travels for free or is recomputed
        assert sum(1 for v in cut if v.shape is not None) == 1
        assert sum(v.bytes for v in cut) == 64 * 4
    chain = monomod.Chain(monomod.extract(part))
    for batch in (2, 5):
        x = torch.randn(batch, 8, 8)
        torch.testing.assert_close(chain(x), traced.model(x))
