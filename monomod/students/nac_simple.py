"""The ``simple`` NAC preset: monomod's first, simplified NAC network, kept so that earlier results stay comparable.

The faithful NAC (the reference's network) is ``nac.py``; ``build_student("nac", preset="simple")`` builds this
one. Its classes carry a ``Simple`` prefix so that neither network's names shadow the other's. What it simplifies, against the reference: ModLin is ``1 + LN_affine(W_c c + b)`` at scale 1, every cell
receives in the propagator, the read-in and read-out are plain cross-attention with mean pooling, no LayerScale,
GELU feed-forwards, no regulariser, and the m2mKD simplification is inferred from the token count.

Layout of the K stages (``build_simple_nac(modules=K, ...)``):

* stage 0, ``image->tokens``: patch tokenizer + read-in. The ``L_in`` input latents cross-attend to the image
  tokens; the stage returns the states of all ``n_cells = L_in + L_med`` cells (read-in latents followed by the
  mediator latents' learned initial states).
* stages 1..K-2, ``tokens->tokens``: one propagator iteration each, over the cells.
* stage K-1, ``tokens->logits``: read-out (output latents cross-attend to the incoming tokens), mean pooling over
  the output latents, LayerNorm and a linear head.

Cells and their wiring. Every cell owns a learned *code* (which modulates every linear layer it goes through, see
:class:`ModLin`) and a learned unit *signature*. Attention between cells is gated by a kernel over signatures,
``K_ij = exp(-(1 - cos(s_i, s_j)) / bandwidth)``, truncated to exactly 0 below ``truncation`` (self-links always
kept). That gives sparse, input-independent connectivity. The signatures are initialised from a graph prior (see
:func:`prior_graph` and :func:`fit_signatures`).

Two modes of a token stage (stages 1..K-1). The propagator is *cell-wise* only when it sees exactly ``n_cells``
tokens and its ``simplified`` attribute is False: then every token uses its own cell's code and attention is
modulated by the signature kernel. Otherwise (``T != n_cells``, e.g. when it is spliced between ViT layers of a
meta model or teacher with T = 65 tokens, or ``simplified = True``) it uses dense attention and one shared code,
the mean of the cell codes. This mirrors the m2mKD reference, which distils simplified NAC modules (dense
attention, fixed shared code) and only learns signatures, codes and the sparse kernel in the end-to-end phase.
The read-out cross-attends to any number of tokens, so it needs no special mode.

Parameter sharing: in the original NAC the cells' codes and signatures are shared by all propagator iterations.
Here each propagator stage owns its own copy (initialised identically from the prior), because m2mKD trains every
stage independently and in parallel, and a stage's state dict must be self-contained.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from monomod.students.base import Stage, StagedModel, StageInterface, preset_config
from monomod.students.nac_graph import GRAPH_PRIORS, check_graph_fields, fit_signatures, prior_adjacency, prior_graph


@dataclass
class SimpleNACConfig:
    """Every hyper-parameter of the simple NAC. Defaults are the CPU-sized ``simple`` preset."""

    # --- widths -------------------------------------------------------------------------------------------------
    dim: int = 64  # state width D of image tokens and of every latent / cell
    num_heads: int = 4  # attention heads (read-in, propagator, read-out)
    head_dim: int | None = None  # per-head width; None -> dim // num_heads
    mlp_ratio: float = 4.0  # FFN hidden width = mlp_ratio * dim
    norm_eps: float = 1e-6  # LayerNorm epsilon
    # --- tokenizer ----------------------------------------------------------------------------------------------
    patch_size: int = 4  # patch conv kernel = stride; img_size must be a multiple
    # --- latents ------------------------------------------------------------------------------------------------
    num_input_latents: int = 8  # L_in: read-in latents (cells that see the image)
    num_mediator_latents: int = 16  # L_med: cells that only talk to other cells
    num_output_latents: int = 8  # L_out: read-out latents, mean-pooled before the head
    # --- cells: codes, signatures, kernel -----------------------------------------------------------------------
    code_dim: int = 32  # width of each cell's code (input of ModLin's modulation projection)
    mod_scale_init: float = 1.0  # initial gain of the modulation LayerNorm (1.0 = the paper's 1 + LN(.))
    sig_dim: int = 32  # width of each cell's unit signature
    kernel_bandwidth: float = 0.5  # K_ij = exp(-d_ij / bandwidth), d_ij = 1 - cos(s_i, s_j)
    kernel_truncation: float = 0.25  # K_ij < truncation is set to exactly 0 (self-links excepted)
    gumbel_temperature: float = 0.5  # temperature of the relaxed-Bernoulli link sampling in train mode
    # --- graph prior that initialises the signatures ------------------------------------------------------------
    graph_prior: str = "scale_free"  # one of GRAPH_PRIORS
    graph_seed: int = 0  # seed of the prior graph and of the signature fit (deterministic init)
    scale_free_m: int = 3  # Barabasi-Albert: edges attached from each new cell
    erdos_renyi_degree: float = 6.0  # Erdos-Renyi: expected degree (p = degree / (n_cells - 1))
    partition_group_size: int = 8  # planted partition: cells per group (last group takes the remainder)
    partition_p_in: float = 0.6  # planted partition: link probability inside a group
    partition_p_out: float = 0.01  # planted partition: link probability across groups
    clique_size: int = 6  # ring of cliques: cells per clique (last clique takes the remainder)
    signature_fit_steps: int = 200  # Adam steps fitting signatures to the prior's adjacency
    signature_fit_lr: float = 0.05  # Adam learning rate of that fit
    signature_fit_margin: float = 0.15  # cosine margin around the truncation threshold targeted by the fit

    @property
    def n_cells(self) -> int:
        """Cells the propagator runs over: read-in latents + mediator latents."""
        return self.num_input_latents + self.num_mediator_latents

    @property
    def inner_dim(self) -> int:
        """Total attention width, num_heads * head_dim."""
        return self.num_heads * (self.head_dim or self.dim // self.num_heads)

    def validate(self) -> None:
        """Raise ValueError on inconsistent values, so a bad config fails at build time, not mid-training."""
        check_graph_fields(self)
        if self.head_dim is None and self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}; set head_dim")
        if not 0.0 < self.kernel_truncation <= 1.0:
            raise ValueError(f"kernel_truncation must be in (0, 1]; got {self.kernel_truncation}")
        if self.kernel_bandwidth <= 0 or self.gumbel_temperature <= 0:
            raise ValueError("kernel_bandwidth and gumbel_temperature must be > 0")


SIMPLE_PRESETS: dict[str, SimpleNACConfig] = {
    # The first monomod NAC at CPU size (32 px images -> 8x8 tokens); was the ``small`` preset before the
    # faithful NAC.
    "simple": SimpleNACConfig(),
}


def kernel_cos_threshold(cfg: SimpleNACConfig) -> float:
    """Cosine similarity above which the kernel survives truncation: cos >= 1 + bandwidth * ln(truncation)."""
    return 1.0 + cfg.kernel_bandwidth * math.log(cfg.kernel_truncation)


def prior_signatures(cfg: SimpleNACConfig) -> torch.Tensor:
    """``[n_cells, sig_dim]`` unit signatures fitted to the config's graph prior (a fresh tensor each call).

    Cached on the config's values: the pipeline builds the same student many times (one hybrid per module, then
    the assembled student) and the fit is the slow part of a build at ImageNet scale.
    """
    return _prior_signatures_cached(dataclasses.astuple(cfg)).clone()


@functools.lru_cache(maxsize=4)
def _prior_signatures_cached(values: tuple) -> torch.Tensor:
    cfg = SimpleNACConfig(*values)  # the config is unhashable; its field values are the cache key
    return fit_signatures(prior_adjacency(cfg), cfg, kernel_cos_threshold(cfg))


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------
def _init_linear(module: nn.Module) -> None:
    """ViT-style init: truncated normal weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ModLin(nn.Module):
    """Code-modulated linear layer: ``y = W (x * (1 + LN(W_c code))) + b``.

    The code picks a per-cell rescaling of the input features, so cells share ``W`` yet compute different
    functions. ``code`` is ``[T, code_dim]`` (one code per token/cell) or ``[1, code_dim]`` (one shared code);
    it broadcasts over the batch of ``x: [B, T, in_features]``.
    """

    def __init__(self, in_features: int, out_features: int, code_dim: int, *, eps: float = 1e-6,
                 mod_scale_init: float = 1.0) -> None:
        super().__init__()
        self.code_proj = nn.Linear(code_dim, in_features)
        self.code_norm = nn.LayerNorm(in_features, eps=eps)
        self.fc = nn.Linear(in_features, out_features)
        self._mod_scale_init = mod_scale_init

    def reset_modulation(self) -> None:
        nn.init.constant_(self.code_norm.weight, self._mod_scale_init)
        nn.init.zeros_(self.code_norm.bias)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.code_norm(self.code_proj(code))
        return self.fc(x * scale)


class SimpleModAttention(nn.Module):
    """Multi-head self-attention with ModLin q/k/v/out projections and an optional additive log-link bias."""

    def __init__(self, cfg: SimpleNACConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.inner_dim // cfg.num_heads
        kw = dict(eps=cfg.norm_eps, mod_scale_init=cfg.mod_scale_init)
        self.q = ModLin(cfg.dim, cfg.inner_dim, cfg.code_dim, **kw)
        self.k = ModLin(cfg.dim, cfg.inner_dim, cfg.code_dim, **kw)
        self.v = ModLin(cfg.dim, cfg.inner_dim, cfg.code_dim, **kw)
        self.proj = ModLin(cfg.inner_dim, cfg.dim, cfg.code_dim, **kw)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, code: torch.Tensor, link_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``link_bias`` is ``[T, T]`` = log of the link weights (-inf for cut links), or None for dense attention.

        Adding log K to the logits before the softmax gives ``a_ij = K_ij exp(l_ij) / sum_k K_ik exp(l_ik)``
        without ever dividing by a possibly tiny sum.
        """
        b, n, _ = x.shape
        q, k, v = self._heads(self.q(x, code)), self._heads(self.k(x, code)), self._heads(self.v(x, code))
        if link_bias is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # Written out rather than SDPA with a float mask: same maths, but it exports cleanly (the decomposed
            # SDPA-with-mask breaks torch.export's view of the output) and the bias gradient is plain autograd.
            logits = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5 + link_bias.to(q.dtype)
            out = logits.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1), code)


class ModFFN(nn.Module):
    """Two-layer GELU FFN whose layers are both ModLin."""

    def __init__(self, cfg: SimpleNACConfig) -> None:
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        kw = dict(eps=cfg.norm_eps, mod_scale_init=cfg.mod_scale_init)
        self.fc1 = ModLin(cfg.dim, hidden, cfg.code_dim, **kw)
        self.act = nn.GELU()
        self.fc2 = ModLin(hidden, cfg.dim, cfg.code_dim, **kw)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x, code)), code)


class FFN(nn.Module):
    """Plain two-layer GELU FFN (read-in and read-out latents carry no code)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LatentCrossAttention(nn.Module):
    """Learned latents attend to a token set of any length; pre-norm residual cross-attention + FFN."""

    def __init__(self, cfg: SimpleNACConfig, num_latents: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.inner_dim // cfg.num_heads
        self.latents = nn.Parameter(torch.zeros(num_latents, cfg.dim))
        self.norm_q = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm_kv = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.q = nn.Linear(cfg.dim, cfg.inner_dim)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.inner_dim)
        self.proj = nn.Linear(cfg.inner_dim, cfg.dim)
        self.norm_ffn = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = FFN(cfg.dim, int(cfg.dim * cfg.mlp_ratio))
        self.reset_attention()

    def reset_attention(self) -> None:
        """Unit-scale latents and Xavier q/k/v. With ViT's 0.02 init the latents attend uniformly, so each sees
        only the mean token (no spatial layout) and learning to focus is slow: on digits, 27 % validation
        accuracy after 300 steps against 66 % with this init (small preset, same seed)."""
        nn.init.normal_(self.latents, std=1.0)
        nn.init.xavier_uniform_(self.q.weight)
        nn.init.xavier_uniform_(self.kv.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` tokens -> ``[B, num_latents, D]`` latent states."""
        b, t, _ = tokens.shape
        lat = self.latents.unsqueeze(0).expand(b, -1, -1)
        q = self.q(self.norm_q(lat)).reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(self.norm_kv(tokens)).reshape(b, t, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])
        lat = lat + self.proj(out.transpose(1, 2).reshape(b, lat.shape[1], -1))
        return lat + self.ffn(self.norm_ffn(lat))


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------
class SimpleNACReadIn(Stage):
    """Stage 0: patch tokenizer + read-in. Image ``[B, C, H, W]`` -> cell states ``[B, L_in + L_med, D]``."""

    def __init__(self, cfg: SimpleNACConfig, *, img_size: int, in_chans: int) -> None:
        super().__init__()
        if img_size % cfg.patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={cfg.patch_size}")
        self.interface = StageInterface("image->tokens", None, cfg.dim)
        grid = img_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.dim))
        self.read_in = LatentCrossAttention(cfg, cfg.num_input_latents)
        self.mediator_init = nn.Parameter(torch.zeros(cfg.num_mediator_latents, cfg.dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.mediator_init, std=0.02)
        self.read_in.apply(_init_linear)
        self.read_in.reset_attention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        inputs = self.read_in(tokens)
        mediators = self.mediator_init.unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([inputs, mediators], dim=1)


class SimpleNACPropagator(Stage):
    """One propagator iteration: ``x += KernelModAttn(LN(x)); x += ModFFN(LN(x))`` over the cells.

    Cell-wise (per-cell codes + signature kernel) when ``T == n_cells`` and not ``simplified``; otherwise dense
    attention with one shared code, the mean of the cell codes (see the module docstring).
    """

    def __init__(self, cfg: SimpleNACConfig, signatures: torch.Tensor | None = None) -> None:
        super().__init__()
        self.interface = StageInterface("tokens->tokens", cfg.dim, cfg.dim)
        self.n_cells = cfg.n_cells
        self.bandwidth = cfg.kernel_bandwidth
        self.truncation = cfg.kernel_truncation
        self.temperature = cfg.gumbel_temperature
        self.simplified = False  # True: dense attention + shared code even when T == n_cells (m2mKD stage)
        if signatures is None:
            signatures = prior_signatures(cfg)
        if signatures.shape != (cfg.n_cells, cfg.sig_dim):
            raise ValueError(f"signatures must be {(cfg.n_cells, cfg.sig_dim)}; got {tuple(signatures.shape)}")
        self.signatures = nn.Parameter(signatures.detach().clone().float())  # normalised where used
        self.codes = nn.Parameter(torch.randn(cfg.n_cells, cfg.code_dim))
        self.register_buffer("self_links", torch.eye(cfg.n_cells, dtype=torch.bool), persistent=False)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = SimpleModAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = ModFFN(cfg)
        self.apply(_init_linear)
        for m in self.modules():
            if isinstance(m, ModLin):
                m.reset_modulation()

    def _distance(self) -> torch.Tensor:
        sig = F.normalize(self.signatures, dim=-1)
        return (1.0 - sig @ sig.t()).clamp_min(0.0)

    def _keep(self, log_kernel: torch.Tensor) -> torch.Tensor:
        """Links that survive truncation; self-links always do."""
        return (log_kernel >= math.log(self.truncation)) | self.self_links

    def kernel(self) -> torch.Tensor:
        """Deterministic truncated kernel ``[n_cells, n_cells]``: exactly 0 where ``K_ij < truncation``."""
        log_k = -self._distance() / self.bandwidth
        return torch.where(self._keep(log_k), log_k.exp(), torch.zeros_like(log_k))

    def link_bias(self, sample: bool) -> torch.Tensor:
        """Log link weights added to the attention logits: ``[n, n]``, -inf on truncated links, 0 on self-links.

        ``sample=False``: log K_ij. ``sample=True``: log of a relaxed-Bernoulli (Gumbel-sigmoid) link with
        probability K_ij, drawn from the global torch RNG (one draw per forward, shared by batch and heads), so
        gradients reach the signatures through the relaxation.
        """
        log_k = -self._distance() / self.bandwidth
        keep = self._keep(log_k)
        if sample:
            # logit(p) with p = exp(log_k); clamp keeps log(1 - p) finite so no NaN leaks through torch.where.
            log_k_c = log_k.clamp(max=-1e-6)
            logit_p = log_k_c - torch.log(-torch.expm1(log_k_c))
            u = torch.rand_like(log_k).clamp(1e-6, 1.0 - 1e-6)
            noise = torch.log(u) - torch.log1p(-u)
            log_w = F.logsigmoid((logit_p + noise) / self.temperature)
        else:
            log_w = log_k
        log_w = torch.where(self.self_links, torch.zeros_like(log_w), log_w)
        return torch.where(keep, log_w, torch.full_like(log_w, float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == self.n_cells and not self.simplified:
            code = self.codes
            bias = self.link_bias(sample=self.training)
        else:
            code = self.codes.mean(dim=0, keepdim=True)
            bias = None
        x = x + self.attn(self.norm1(x), code, bias)
        return x + self.ffn(self.norm2(x), code)


class SimpleNACReadOut(Stage):
    """Last stage: output latents cross-attend to the incoming tokens (any T), mean-pool, LayerNorm, linear head."""

    def __init__(self, cfg: SimpleNACConfig, *, num_classes: int) -> None:
        super().__init__()
        self.interface = StageInterface("tokens->logits", cfg.dim, None)
        self.read_out = LatentCrossAttention(cfg, cfg.num_output_latents)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, num_classes)
        self.apply(_init_linear)
        self.read_out.reset_attention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.read_out(x).mean(dim=1)))


# ---------------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------------
def simple_nac_config(preset: str = "simple", **overrides) -> SimpleNACConfig:
    """The preset's config with ``overrides`` applied and validated."""
    return preset_config(SIMPLE_PRESETS, preset, overrides, family="simple-NAC")


def build_simple_nac(*, modules: int, num_classes: int, img_size: int, in_chans: int = 3, preset: str = "simple",
              **overrides) -> StagedModel:
    """A NAC student split into ``modules`` = K stages: read-in, K-2 propagator iterations, read-out.

    ``overrides`` are SimpleNACConfig fields replacing the preset's values. The config used is kept as
    ``model.nac_config``.
    """
    if modules < 3:
        raise ValueError(
            f"NAC needs at least 3 modules (tokenizer+read-in, >=1 propagator, read-out); got K={modules}"
        )
    cfg = simple_nac_config(preset, **overrides)
    signatures = prior_signatures(cfg)  # fitted once, copied into every propagator
    stages: list[Stage] = [SimpleNACReadIn(cfg, img_size=img_size, in_chans=in_chans)]
    stages += [SimpleNACPropagator(cfg, signatures) for _ in range(modules - 2)]
    stages.append(SimpleNACReadOut(cfg, num_classes=num_classes))
    model = StagedModel(stages, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    model.nac_config = cfg
    return model


__all__ = [
    "GRAPH_PRIORS", "SIMPLE_PRESETS", "ModLin", "SimpleNACConfig", "SimpleNACPropagator", "SimpleNACReadIn",
    "SimpleNACReadOut", "build_simple_nac", "fit_signatures", "kernel_cos_threshold", "prior_graph",
    "prior_signatures", "simple_nac_config",
]
