import pytest
import torch

import monomod
from conftest import FAMILIES, make_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_composition_matches_the_model_at_any_batch_size(traced_models, family):
    traced = traced_models[family]
    model, size = make_model(family)
    modules = monomod.extract(monomod.partition(traced, 4))
    chain = monomod.Chain(modules)
    for batch in (2, 5):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            assert (chain(x) - model(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_modules_own_exactly_the_model_parameters(traced_models, family):
    traced = traced_models[family]
    modules = monomod.extract(monomod.partition(traced, 4))
    owned = [sum(p.numel() for p in m.parameters()) for m in modules]
    assert sum(owned) == sum(p.numel() for p in traced.model.parameters())
    assert all(n > 0 for n in owned)


def test_module_interfaces_chain_positionally(traced_models):
    traced = traced_models["vit"]
    part = monomod.partition(traced, 3)
    m0, m1, m2 = monomod.extract(part)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = m0(x)
        assert isinstance(h, torch.Tensor) and h.shape == (3, 5, 192)  # one tensor crosses: a bare tensor
        out = m2(m1(h))
        torch.testing.assert_close(out, traced.model(x))
    assert m0.input_names == ("x",) and m1.input_names == m0.output_names
    assert m0.index == 0 and m2.output_names == ("head",)


def test_multi_tensor_boundaries_are_tuples(traced_models):
    traced = traced_models["vit"]
    part = monomod.partition(traced, 40)  # fine enough that some cuts fall inside attention
    assert any(len(cut) > 1 for cut in part.cuts)
    modules = monomod.extract(part)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(monomod.Chain(modules)(x), traced.model(x))
    wide = next(i for i, cut in enumerate(part.cuts) if len(cut) > 1)
    values = modules[0](x)
    for m in modules[1:wide + 1]:
        values = m(*values) if isinstance(values, tuple) else m(values)
    assert isinstance(values, tuple) and len(values) == len(part.cuts[wide])


def test_extracted_modules_are_self_contained(traced_models):
    traced = traced_models["resnet"]
    modules = monomod.extract(monomod.partition(traced, 2))
    names0 = {n for n, _ in modules[0].named_parameters()}
    names1 = {n for n, _ in modules[1].named_parameters()}
    assert names0.isdisjoint(names1)
    assert any(n.startswith("conv1") for n in names0) and any(n.startswith("fc") for n in names1)
