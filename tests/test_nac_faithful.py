"""The faithful NAC (monomod.students.nac, the default presets): one test per feature of the reference network."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monomod.students.stitching import stitch
from monomod.students.nac import (
    CUT, CodeConditionedReadIn, ConfidencePooling, ModLinear, NACPropagator, NACReadOut, NACStudent, SignatureKernel,
    build_nac, nac_config,
)

IMG, NC, B = 32, 10, 2


@pytest.fixture(scope="module")
def model() -> NACStudent:
    torch.manual_seed(0)
    return build_nac(modules=4, num_classes=NC, img_size=IMG)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_forward_backward_and_stage_chain(model, images):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(images)
    assert out.shape == (B, NC)
    out.square().mean().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        x = images
        for stage in model.stages:
            x = stage(x)
        torch.testing.assert_close(x, model(images), rtol=0, atol=0)


def test_modulation_is_identity_at_gain_zero():
    layer = ModLinear(8, 5, 4, gain=0.1)
    assert layer.mod.gain.item() == pytest.approx(0.1)
    assert layer.mod.proj.bias is None and not layer.mod.norm.elementwise_affine
    with torch.no_grad():
        layer.mod.gain.zero_()
    x, code = torch.randn(2, 3, 8), torch.randn(3, 4)
    torch.testing.assert_close(layer(x, code), F.linear(x, layer.weight, layer.bias))


def test_propagator_leaves_input_latents_unchanged():
    cfg = nac_config("small")
    prop = NACPropagator(cfg).train()
    x = torch.randn(B, cfg.n_cells, cfg.dim)
    y = prop(x)
    n_in = cfg.num_input_latents
    assert torch.equal(y[:, :n_in], x[:, :n_in])
    assert not torch.allclose(y[:, n_in:], x[:, n_in:])


def test_eval_links_are_deterministic_and_training_samples():
    cfg = nac_config("small")
    kernel = SignatureKernel(cfg)
    sig = torch.randn(6, cfg.sig_dim, generator=torch.Generator().manual_seed(2))
    kernel.eval()
    assert torch.equal(kernel(sig, sig), kernel(sig, sig))
    kernel.train()
    assert not torch.equal(kernel(sig, sig), kernel(sig, sig))


def test_kernel_truncates_far_links_with_a_straight_through_gradient():
    cfg = nac_config("small")
    kernel = SignatureKernel(cfg).eval()
    sig = torch.randn(12, cfg.sig_dim, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    links = kernel(sig, sig)
    unit = F.normalize(sig.detach(), dim=-1)
    distance = 1 - unit @ unit.t()
    far = distance > cfg.kernel_truncation
    assert far.any() and (~far).any()
    assert (links[far] == CUT).all()
    torch.testing.assert_close(links[~far], -distance[~far] / cfg.kernel_bandwidth)
    links[far].sum().backward()  # the cut value is constant, yet the gradient reaches the signatures
    assert sig.grad is not None and sig.grad.abs().sum() > 0 and kernel.bandwidth.grad.abs() > 0


def test_read_in_conditions_keys_and_values_on_each_latents_code():
    cfg = nac_config("small")
    attn = CodeConditionedReadIn(cfg)
    for lin in (attn.k, attn.v):
        torch.nn.init.normal_(lin.mod.proj.weight)
    latents, tokens = torch.randn(B, 3, cfg.dim), torch.randn(B, 7, cfg.dim)
    code = torch.randn(3, cfg.code_dim)
    # the explicit form: latent l sees keys/values W(x_t * m_l), materialised per latent
    rows = []
    for l in range(3):
        k = attn._heads(attn.k(tokens, code[l:l + 1]))
        v = attn._heads(attn.v(tokens, code[l:l + 1]))
        q = attn._heads(attn.q(latents[:, l:l + 1], code[l:l + 1]))
        rows.append(F.scaled_dot_product_attention(q, k, v))
    explicit = attn.proj(torch.cat(rows, dim=2).transpose(1, 2).flatten(2), code)
    torch.testing.assert_close(attn(latents, tokens, code), explicit, rtol=1e-4, atol=1e-5)


def test_confidence_pooling_weights_sum_to_one():
    pool = ConfidencePooling(16, 1e-6)
    latents = torch.randn(B, 5, 16)
    for training in (True, False):
        pool.train(training)
        w = pool.weights(latents)
        assert w.shape == (B, 5) and torch.allclose(w.sum(-1), torch.ones(B))
    assert torch.equal(pool.weights(latents), pool.weights(latents))  # eval: softmax, no noise


def test_layer_scale_and_geglu(model):
    prop = model.stages[1]
    assert torch.allclose(prop.ls_attn.gamma, torch.full_like(prop.ls_attn.gamma, 0.1))
    assert isinstance(prop.ffn.act, torch.nn.GELU) and prop.ffn.fc1.out_features == 2 * prop.ffn.fc2.in_features


def test_regulariser_is_in_the_full_models_aux_loss_only():
    torch.manual_seed(0)
    m = build_nac(modules=3, num_classes=NC, img_size=IMG)
    with torch.no_grad():  # pull two cells close together so the hinge (distance < 0.4) is active
        for stage in m.stages[1:]:
            sig = stage.signatures if isinstance(stage, NACPropagator) else stage.cell_signatures
            sig[1].copy_(sig[0] + 0.01)
    reg = m.regularizer()
    assert reg is not None and reg < 0
    m(torch.randn(B, 3, IMG, IMG))
    torch.testing.assert_close(m.aux_loss(), reg)
    stitched = stitch(m.stages[1], 32, 32).distillation_mode(True)
    stitched(torch.randn(B, 5, 32))
    assert stitched.aux_loss() is None and m.stages[1].aux_loss() is None
    assert build_nac(modules=3, num_classes=NC, img_size=IMG, sparsity_weight=0.0).regularizer() is None
    prior_only = build_nac(modules=3, num_classes=NC, img_size=IMG, sparsity_weight=0.0, prior_weight=1.0)
    assert prior_only.regularizer() == 0  # the build fits the mediators to the prior
    with torch.no_grad():
        prior_only.stages[1].signatures.normal_()
    assert prior_only.regularizer() > 0


def test_distillation_mode_is_explicit_dense_and_shared(model):
    cfg = model.nac_config
    prop = model.stages[1]
    with pytest.raises(ValueError, match="distillation_mode"):
        prop(torch.randn(B, 5, cfg.dim))
    prop.distillation_mode(True)
    try:
        assert prop.distilling and prop.cell_codes().shape == (1, cfg.code_dim)
        prop.train().zero_grad(set_to_none=True)
        prop(torch.randn(B, 5, cfg.dim)).sum().backward()
        # dense attention and the fixed shared code: signatures, codes and bandwidth take no part
        assert prop.signatures.grad is None and prop.codes.grad is None and prop.kernel.bandwidth.grad is None
        x = torch.randn(B, cfg.n_cells, cfg.dim)
        y = prop.eval()(x)
        assert not torch.equal(y[:, :cfg.num_input_latents], x[:, :cfg.num_input_latents])  # every token receives
    finally:
        prop.distillation_mode(False)
        prop.zero_grad(set_to_none=True)
    readout = model.stages[-1]
    readout.distillation_mode(True)
    try:
        assert readout(torch.randn(B, 5, cfg.dim)).shape == (B, NC)
    finally:
        readout.distillation_mode(False)


def test_shared_code_is_fixed_and_saved(model):
    a, b = build_nac(modules=3, num_classes=NC, img_size=IMG), build_nac(modules=3, num_classes=NC, img_size=IMG)
    assert torch.equal(a.stages[1].shared_code, b.stages[1].shared_code)
    assert "stages.1.shared_code" in a.state_dict()


@pytest.mark.parametrize("k", [3, 5])
def test_module_counts_and_interfaces(k):
    m = build_nac(modules=k, num_classes=NC, img_size=IMG)
    assert len(m.stages) == k and isinstance(m.stages[-1], NACReadOut)
    assert [i.kind for i in m.interfaces] == ["image->tokens"] + ["tokens->tokens"] * (k - 2) + ["tokens->logits"]


def test_tinyimagenet_preset_sizes():
    cfg = nac_config("tinyimagenet")
    assert (cfg.num_input_latents, cfg.num_mediator_latents, cfg.num_output_latents) == (64, 256, 64)
    assert (cfg.dim, cfg.num_heads, cfg.head_dim, cfg.code_dim, cfg.sig_dim) == (384, 6, 64, 384, 64)
    assert (cfg.kernel_truncation, cfg.link_temperature, cfg.mod_gain, cfg.layer_scale) == (0.9, 0.5, 0.1, 0.1)
    assert (cfg.sparsity_hinge, cfg.sparsity_weight, cfg.scale_free_m) == (0.4, 0.1, 2)
    m = build_nac(modules=3, num_classes=200, img_size=64, preset="tinyimagenet").eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 200)
