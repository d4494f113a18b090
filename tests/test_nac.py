"""Tests of the ``simple`` NAC preset (monomod.students.nac_simple, the earlier network): 32 px, 10 classes, CPU.

The faithful NAC (the default) is tested in test_nac_faithful.py."""
from __future__ import annotations

import networkx as nx
import pytest
import torch

from monomod.students.nac import build_nac as build_any_nac
from monomod.students.nac_simple import (
    GRAPH_PRIORS, SimpleNACPropagator, SimpleNACReadIn, SimpleNACReadOut, simple_nac_config, prior_graph,
)

IMG, NC, B = 32, 10, 2


def build_nac(**kwargs):
    return build_any_nac(preset="simple", **kwargs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_nac(modules=4, num_classes=NC, img_size=IMG)


@pytest.fixture(scope="module")
def images():
    return torch.randn(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_forward_backward_reaches_every_parameter(model, images):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(images)
    assert out.shape == (B, NC)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    model.zero_grad(set_to_none=True)


def test_chaining_stages_equals_model(model, images):
    model.eval()
    with torch.no_grad():
        x = images
        for stage in model.stages:
            x = stage(x)
        torch.testing.assert_close(x, model(images), rtol=0, atol=1e-6)


def test_stage_layout_and_interfaces(model):
    kinds = [i.kind for i in model.interfaces]
    assert kinds == ["image->tokens", "tokens->tokens", "tokens->tokens", "tokens->logits"]
    d = model.nac_config.dim
    assert model.interfaces[0].width_in is None and model.interfaces[0].width_out == d
    assert model.interfaces[1].width_in == model.interfaces[1].width_out == d
    assert model.interfaces[-1].width_in == d and model.interfaces[-1].width_out is None
    cfg = model.nac_config
    with torch.no_grad():
        states = model.stages[0](torch.zeros(3, 3, IMG, IMG))
    assert states.shape == (3, cfg.num_input_latents + cfg.num_mediator_latents, d)


@pytest.mark.parametrize("k", [3, 8])
def test_module_counts(k):
    m = build_nac(modules=k, num_classes=NC, img_size=IMG)
    assert len(m.stages) == k
    assert isinstance(m.stages[0], SimpleNACReadIn) and isinstance(m.stages[-1], SimpleNACReadOut)
    assert sum(isinstance(s, SimpleNACPropagator) for s in m.stages) == k - 2
    # every propagator starts from the same prior-fitted signatures
    sigs = [s.signatures for s in m.stages[1:-1]]
    assert all(torch.equal(sigs[0], s) for s in sigs)


def test_too_few_modules_and_bad_names():
    with pytest.raises(ValueError, match=r"NAC needs at least 3 modules \(tokenizer\+read-in, >=1 propagator, "
                                         r"read-out\); got K=2"):
        build_nac(modules=2, num_classes=NC, img_size=IMG)
    with pytest.raises(ValueError, match="imagenet.*simple.*small.*tinyimagenet"):
        build_any_nac(modules=3, num_classes=NC, img_size=IMG, preset="huge")
    with pytest.raises(ValueError, match=r"not_a_field.*allowed.*graph_prior"):
        build_nac(modules=3, num_classes=NC, img_size=IMG, not_a_field=1)
    with pytest.raises(ValueError, match="scale_free"):
        build_nac(modules=3, num_classes=NC, img_size=IMG, graph_prior="lattice")


def test_kernel_is_truncated_to_exact_zeros():
    cfg = simple_nac_config("simple")
    stage = SimpleNACPropagator(cfg)
    with torch.no_grad():  # random signatures give a spread of similarities on both sides of the threshold
        stage.signatures.copy_(torch.randn(cfg.n_cells, cfg.sig_dim, generator=torch.Generator().manual_seed(3)))
    sig = torch.nn.functional.normalize(stage.signatures.detach(), dim=-1)
    raw = torch.exp(-(1 - sig @ sig.t()) / cfg.kernel_bandwidth)
    off = ~torch.eye(cfg.n_cells, dtype=torch.bool)
    k = stage.kernel().detach()
    below, above = (raw < cfg.kernel_truncation) & off, (raw >= cfg.kernel_truncation) & off
    assert below.any() and above.any()
    assert (k[below] == 0).all()
    assert (k[above] > 0).all() and torch.allclose(k[above], raw[above])
    assert (k.diagonal() > 0).all()
    # the sampled links are cut at exactly the same places (log weight -inf), self-links kept (log weight 0)
    torch.manual_seed(0)
    bias = stage.link_bias(sample=True).detach()
    assert torch.isneginf(bias[below]).all() and torch.isfinite(bias[above]).all()
    assert (bias.diagonal() == 0).all()


def test_truncated_links_carry_no_information():
    """With mutually orthogonal signatures only self-links survive, so a cell ignores every other cell."""
    cfg = simple_nac_config("simple")
    stage = SimpleNACPropagator(cfg).eval()
    with torch.no_grad():
        stage.signatures.copy_(torch.eye(cfg.n_cells, cfg.sig_dim))
    x = torch.randn(B, cfg.n_cells, cfg.dim)
    x2 = x.clone()
    x2[:, 1:] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(stage(x)[:, 0], stage(x2)[:, 0], rtol=0, atol=1e-6)


def test_eval_is_deterministic_and_train_samples(model, images):
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))
        model.train()
        torch.manual_seed(123)
        a = model(images)
        b = model(images)
        torch.manual_seed(123)
        a2 = model(images)
    model.eval()
    assert not torch.allclose(a, b)
    assert torch.equal(a, a2)


@pytest.mark.parametrize("prior", GRAPH_PRIORS)
def test_graph_prior_shapes_initial_kernel(prior):
    m = build_nac(modules=3, num_classes=NC, img_size=IMG, graph_prior=prior)
    cfg = m.nac_config
    adj = torch.from_numpy(nx.to_numpy_array(prior_graph(cfg), nodelist=range(cfg.n_cells))).bool()
    off = ~torch.eye(cfg.n_cells, dtype=torch.bool)
    edges, non_edges = adj & off, ~adj & off
    assert edges.any() and non_edges.any()
    k = m.stages[1].kernel().detach()
    assert k[edges].mean() > 0.2 and k[edges].mean() > 5 * k[non_edges].mean()
    # most edges survive truncation and most non-edges are cut
    assert (k[edges] > 0).float().mean() > 0.9
    assert (k[non_edges] == 0).float().mean() > 0.9


def test_token_stages_accept_any_token_count(model):
    d = model.nac_config.dim
    x = torch.randn(B, 65, d)
    model.eval()
    with torch.no_grad():
        assert model.stages[1](x).shape == (B, 65, d)
        assert model.stages[-1](x).shape == (B, NC)
    # T != n_cells in train mode: dense attention with the shared code, so signatures get no gradient
    prop = model.stages[1].train()
    prop.zero_grad(set_to_none=True)
    prop(x).sum().backward()
    assert prop.signatures.grad is None and prop.codes.grad is not None
    prop.zero_grad(set_to_none=True)


def test_simplified_flag_forces_dense_mode(model):
    cfg = model.nac_config
    prop = model.stages[1].eval()
    x = torch.randn(B, cfg.n_cells, cfg.dim)
    with torch.no_grad():
        cellwise = prop(x)
        prop.simplified = True
        try:
            dense = prop(x)
        finally:
            prop.simplified = False
    assert dense.shape == cellwise.shape and not torch.allclose(dense, cellwise)
