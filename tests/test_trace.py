import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import monomod
from conftest import FAMILIES, make_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_total_flops_agree_with_flop_counter_mode(traced_models, family):
    traced = traced_models[family]
    model, size = make_model(family)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    reference = counter.get_total_flops()
    # We also count element-wise work (norms, activations, adds) that FlopCounterMode ignores: a little above.
    assert reference <= traced.flops <= 1.05 * reference


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parameters_are_counted_once(traced_models, family):
    traced = traced_models[family]
    assert traced.params == sum(p.numel() for p in traced.model.parameters())


def test_node_annotations(traced_models):
    traced = traced_models["vit"]
    info = traced.nodes["blocks_0_attn_qkv"]
    assert info.op == "call_module" and info.module == "blocks.0.attn.qkv"
    assert info.shape == (1, 5, 576) and info.symbolic_shape() == ["B", 5, 576]
    assert info.dtype == "float32" and info.bytes == 5 * 576 * 4
    assert info.flops == 2 * 5 * 192 * 576 + 5 * 576  # matmul + bias
    assert info.params == 192 * 576 + 576
    sdpa = next(n for n in traced.nodes.values() if n.target == "scaled_dot_product_attention")
    assert sdpa.flops == 2 * 3 * 5 * 5 * 64 * 2 + 3 * 3 * 5 * 5  # QK^T, AV, softmax
    # Non-tensor values (shape ints) hold no bytes and can be recomputed anywhere.
    shape_node = next(n for n in traced.nodes.values() if n.target == "getattr")
    assert shape_node.bytes == 0 and shape_node.rematerializable


def test_optional_forward_arguments_are_fixed_not_traced(traced_models):
    # timm's VisionTransformer.forward(x, attn_mask=None, is_causal=False): only x may enter the graph.
    placeholders = [n.name for n in traced_models["vit"].nodes.values() if n.op == "placeholder"]
    assert placeholders == ["x"]


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace control flow on tensor values
            return self.fc(x)
        return x


def test_untraceable_model_names_the_construct():
    with pytest.raises(monomod.MonomodError, match=r"cannot trace _DataDependent.*control flow.*test_trace.py:\d+"):
        monomod.trace(_DataDependent(), torch.randn(1, 4))


def test_leaf_modules_make_such_models_traceable():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _DataDependent()

        def forward(self, x):
            return self.inner(x) * 2

    traced = monomod.trace(Wrapper(), torch.randn(1, 4), leaf_modules=[_DataDependent])
    assert any(n.target == "inner" for n in traced.nodes.values())


def test_image_size_the_model_cannot_take():
    model = monomod.load_model("vit_tiny", img_size=32)
    with pytest.raises(monomod.MonomodError, match=r"cannot take an input of shape \(1, 3, 8, 8\)"):
        monomod.trace(model, torch.randn(1, 3, 8, 8))


def test_meta_device_trace_matches_real_trace(traced_models):
    model = monomod.load_model("vit_tiny", img_size=32, num_classes=10, device="meta")
    traced = monomod.trace(model, torch.randn(1, 3, 32, 32, device="meta"))
    real = traced_models["vit"]
    assert traced.flops == real.flops and traced.params == real.params


def test_parameter_views_do_not_break_flop_counting():
    # NAC's read-in expands learned latents over the batch: a view of a parameter. Counting FLOPs under
    # torch.no_grad() used to trip FlopCounterMode's module tracker on exactly this.
    stage = monomod.build_student("nac", modules=3, num_classes=10, img_size=32).stages[0].eval()
    traced = monomod.trace(stage, torch.randn(1, 3, 32, 32))
    assert traced.flops > 0 and traced.params == sum(p.numel() for p in stage.parameters())
    assert all(p.requires_grad for p in stage.parameters())  # tracing leaves the model as it found it
