"""Neural Attentive Circuits (NAC, Rahaman et al., 2022) as the m2mKD reference trains it, cut into K stages.

Layout of the K stages (``build_nac(modules=K, ...)``):

* stage 0, ``image->tokens``: patch tokenizer + read-in. The ``L_in`` input latents cross-attend to the image
  tokens with keys and values modulated by each latent's own code; the stage returns the states of all
  ``n_cells = L_in + L_med`` cells (input latents, then the mediators' learned initial states).
* stages 1..K-2, ``tokens->tokens``: one propagator iteration each. Only the mediators receive: they attend to
  every cell through the signature kernel; the input latents send and pass through unchanged.
* stage K-1, ``tokens->logits``: read-out through the kernel (no residual), then the output latents are pooled
  with learned confidence weights (Gumbel-softmax in training, softmax at eval) and classified.

Every linear layer inside the cells is code-modulated (:class:`ModLinear`, PyTorch's Linear init as the reference's
ModFC), every residual branch carries a LayerScale (0.1; the read-in's attention 1.0 and feed-forward 1e-6, as the
reference's read-in) and DropPath, and the feed-forwards are GEGLU (timm's ``GluMlp``). Cell links come from the
kernel over signatures (:class:`SignatureKernel`); the mediators' signatures start from a graph prior. End to end,
the full student (:class:`NACStudent`) adds the signature regulariser to the task loss through ``aux_loss()``.

During m2mKD a stage is distilled alone on the meta model's tokens. The reference then simplifies it: dense
attention and one fixed, random code shared by every token. That form is switched on explicitly with
``stage.distillation_mode(True)`` (the m2mKD job does it); outside it, a token stage refuses anything but its
``n_cells`` cells. Signatures, codes and the kernel bandwidth are learned in the end-to-end phase.

Each propagator and the read-out own their copy of the cells' signatures and codes (the reference shares them
across iterations): m2mKD trains every stage on its own, so a stage's state dict must be self-contained.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, GluMlp, LayerNorm, LayerNorm2d, LayerScale, trunc_normal_
from timm.models.convnext import ConvNeXtStage
from timm.models.vision_transformer import Block
from torch import nn

from monomod.students.base import Stage, StagedModel, StageInterface, preset_config
from monomod.students.nac_graph import GRAPH_PRIORS, check_graph_fields, fit_signatures, prior_fit_loss
from monomod.students.nac_graph import prior_adjacency as graph_adjacency
from monomod.students.nac_simple import SIMPLE_PRESETS, build_simple_nac

TOKENIZERS = ("convnext", "vit", "patch")
CUT = -1e4  # log link weight of a truncated link: its exp is exactly 0 in float32, yet a fully cut row stays finite


@dataclass
class NACConfig:
    """Every hyper-parameter of a faithful NAC student. Defaults are the CPU-sized ``small`` preset."""

    dim: int = 64  # state width of image tokens and of every cell
    num_heads: int = 4
    head_dim: int = 16
    ffn_capacity: float = 2.0  # GEGLU hidden width = ffn_capacity * dim
    layer_scale: float = 0.1  # LayerScale initial value on the propagators' residual branches
    read_in_layer_scale: float = 1.0  # the read-in's attention branch (the reference's AttentiveReadIn default)
    read_in_ffn_layer_scale: float = 1e-6  # the read-in's feed-forward branch (likewise)
    latent_std: float = 0.6  # initial states of the input latents and mediators: the reference seeder's scale
    # m2mKD read-in receivers: the L_in latents, or "random", one randn state per sample as the reference (its
    # module-0 hybrid reached 11.9 % against 70.6 % on the demo's seed 0, and it trains no state assembly keeps)
    distill_receivers: str = "latents"
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    patch_size: int = 4  # stride from pixels to tokens; img_size must be a multiple
    tokenizer: str = "convnext"  # "convnext": the reference's ConvNeXt; "vit": patch conv + blocks; "patch": conv only
    tokenizer_depths: tuple[int, int] = (3, 3)  # ConvNeXt blocks per tokenizer stage (the reference's "tiny")
    tokenizer_blocks: int = 2  # transformer blocks over the patch tokens of the "vit" tokenizer
    num_input_latents: int = 8
    num_mediator_latents: int = 16
    num_output_latents: int = 8
    code_dim: int = 32
    code_noise: float = 0.05  # Gaussian noise added to the codes in training
    mod_gain: float = 0.1  # initial (learnable) gain of the code modulation
    sig_dim: int = 32
    kernel_truncation: float = 0.9  # links whose distance 1 - cos exceeds this are cut
    kernel_bandwidth: float = 1.0  # initial (learnable) bandwidth: log link = -distance / bandwidth
    link_temperature: float = 0.5  # relaxed-Bernoulli temperature of the link sampling in training
    sparsity_hinge: float = 0.4  # signature regulariser: pushes apart cells closer than this distance
    sparsity_weight: float = 0.1
    prior_weight: float = 0.0  # weight of the graph-prior hinge in the loss (reference: 0, the prior seeds only)
    graph_prior: str = "scale_free"  # one of GRAPH_PRIORS, over the mediators
    graph_seed: int = 0
    scale_free_m: int = 2
    erdos_renyi_degree: float = 6.0
    partition_group_size: int = 8
    partition_p_in: float = 0.6
    partition_p_out: float = 0.01
    clique_size: int = 6
    signature_fit_steps: int = 200
    signature_fit_lr: float = 0.05
    signature_fit_margin: float = 0.15

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer_depths, list):  # as YAML and JSON give it
            self.tokenizer_depths = tuple(self.tokenizer_depths)

    @property
    def n_cells(self) -> int:
        return self.num_input_latents + self.num_mediator_latents

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def link_cos(self) -> float:
        """Cosine similarity above which a link survives truncation."""
        return 1.0 - self.kernel_truncation

    def validate(self) -> None:
        """Raise ValueError on inconsistent values, so a bad config fails at build time, not mid-training."""
        check_graph_fields(self)
        if not 0.0 < self.kernel_truncation <= 2.0:
            raise ValueError(f"kernel_truncation is a distance 1 - cos in (0, 2]; got {self.kernel_truncation}")
        if self.kernel_bandwidth <= 0 or self.link_temperature <= 0:
            raise ValueError("kernel_bandwidth and link_temperature must be > 0")
        if self.distill_receivers not in ("latents", "random"):
            raise ValueError(f"distill_receivers must be 'latents' or 'random'; got {self.distill_receivers!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}; got {self.tokenizer!r}")
        depths = self.tokenizer_depths
        if not (isinstance(depths, tuple) and len(depths) == 2 and all(isinstance(d, int) and d >= 0 for d in depths)):
            raise ValueError(f"tokenizer_depths must be two integers >= 0 (blocks per ConvNeXt stage); got {depths!r}")
        if self.tokenizer == "convnext" and (self.patch_size % 2 or self.dim % 2):
            raise ValueError(f"the convnext tokenizer halves patch_size and dim; got patch_size={self.patch_size}, "
                             f"dim={self.dim} (use even values or tokenizer='patch')")


NAC_PRESETS: dict[str, NACConfig] = {
    # CPU-sized, for tests and the demo (32 px images -> 8x8 tokens). Its tokenizer keeps the reference's three
    # ConvNeXt blocks at the token grid but none at twice its resolution: on this CPU those cost the whole NAC 2x
    # its step time (depthwise convolutions) for module 0's hybrid 78.3 % against 70.6 % (teacher hybrid 86.4 %).
    "small": NACConfig(tokenizer_depths=(0, 3)),
    # The reference Tiny-ImageNet config: 64 px, an 8x8 token grid, state 384, 6 heads of 64, code dim 384.
    "tinyimagenet": NACConfig(
        dim=384, num_heads=6, head_dim=64, patch_size=8, num_input_latents=64, num_mediator_latents=256,
        num_output_latents=64, code_dim=384, sig_dim=64, drop_path=0.1,
    ),
    # ImageNet scale (224 px, patch 16 -> 14x14 tokens); the latent counts are monomod's choice.
    "imagenet": NACConfig(
        dim=512, num_heads=8, head_dim=64, patch_size=16, num_input_latents=192, num_mediator_latents=768,
        num_output_latents=64, code_dim=512, sig_dim=64, drop_path=0.1,
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# Cells: signatures, codes, links
# ---------------------------------------------------------------------------------------------------------------
def cell_signatures(cfg: NACConfig) -> torch.Tensor:
    """``[n_cells, sig_dim]`` unit signatures: random for the input latents, fitted to the prior for the mediators.

    Seeded by ``graph_seed`` (every stage gets the same cells) and cached on the config's values, since the
    pipeline builds the same student once per module.
    """
    return _cell_signatures_cached(dataclasses.astuple(cfg)).clone()


@functools.lru_cache(maxsize=4)
def _cell_signatures_cached(values: tuple) -> torch.Tensor:
    cfg = NACConfig(*values)
    gen = torch.Generator().manual_seed(cfg.graph_seed + 1)
    inputs = F.normalize(torch.randn(cfg.num_input_latents, cfg.sig_dim, generator=gen), dim=-1)
    return torch.cat([inputs, F.normalize(_mediator_fit(cfg), dim=-1)])


def _mediator_fit(cfg: NACConfig) -> torch.Tensor:
    """Mediator signatures whose truncated kernel reproduces the graph prior."""
    return fit_signatures(prior_adjacency(cfg), cfg, cfg.link_cos)


def prior_adjacency(cfg: NACConfig) -> torch.Tensor:
    """``[L_med, L_med]`` 0/1 adjacency of the graph prior over the mediators."""
    return graph_adjacency(cfg, cfg.num_mediator_latents)


def fixed_shared_code(cfg: NACConfig) -> torch.Tensor:
    """The one random code every token uses in distillation mode (``[1, code_dim]``, seeded, same in every stage)."""
    return torch.randn(1, cfg.code_dim, generator=torch.Generator().manual_seed(cfg.graph_seed + 2))


def signature_repulsion(signatures: torch.Tensor, hinge: float) -> torch.Tensor:
    """The reference's sparsity regulariser: minus the sum of the pair distances ``1 - cos`` below ``hinge``."""
    sig = F.normalize(signatures, dim=-1)
    distance = 1.0 - sig @ sig.t()
    pairs = torch.tril(torch.ones_like(distance, dtype=torch.bool), diagonal=-1)
    close = pairs & (distance.detach() < hinge)
    return -(distance * close).sum()


def relaxed_bernoulli_log(log_p: torch.Tensor, temperature: float, batch: int | None = None) -> torch.Tensor:
    """Log of a relaxed-Bernoulli sample with probabilities ``exp(log_p)``, computed in log space (no 0 * inf).

    With ``batch``, one independent sample per batch element (``[batch, *log_p.shape]``), as the reference draws
    them. Computed in float32 whatever the autocast: in bf16, ``1 - 1e-6`` rounds to 1 and the noise's tail is lost.
    """
    log_p = log_p.float().clamp(max=-1e-6)
    logits = log_p - torch.log(-torch.expm1(log_p))
    shape = log_p.shape if batch is None else (batch, *log_p.shape)
    u = torch.rand(shape, device=log_p.device, dtype=torch.float32).clamp(1e-6, 1.0 - 1e-6)
    return F.logsigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


class SignatureKernel(nn.Module):
    """Links between cells: ``log K = -(1 - cos(s_i, s_j)) / bandwidth``, cut above the truncation distance.

    The cut is straight-through (the forward sees the cut, the backward the uncut distance), the bandwidth is
    learnable, and in training each link is sampled from a relaxed Bernoulli of probability K, independently for
    each batch element. At eval the links are the deterministic kernel, so exported graphs hold no sampling. The
    kernel runs in float32 under autocast: bf16 cosines move distances across the truncation.
    """

    def __init__(self, cfg: NACConfig) -> None:
        super().__init__()
        self.bandwidth = nn.Parameter(torch.tensor(float(cfg.kernel_bandwidth)))
        self.truncation = cfg.kernel_truncation
        self.temperature = cfg.link_temperature

    def forward(self, receivers: torch.Tensor, senders: torch.Tensor, batch: int = 1) -> torch.Tensor:
        """Log link weights from receiver and sender signatures, added to attention logits: ``[R, S]`` at eval,
        ``[batch, R, S]`` (one sample per element) in training."""
        with torch.autocast(receivers.device.type, enabled=False):
            receivers, senders = receivers.float(), senders.float()
            distance = 1.0 - F.normalize(receivers, dim=-1) @ F.normalize(senders, dim=-1).t()
            log_k = -distance / self.bandwidth.float().clamp_min(1e-3)
            cut = torch.where(distance.detach() > self.truncation, torch.full_like(log_k, CUT), log_k)
            log_k = log_k + (cut - log_k).detach()
            return relaxed_bernoulli_log(log_k, self.temperature, batch) if self.training else log_k


# ---------------------------------------------------------------------------------------------------------------
# Code-modulated layers
# ---------------------------------------------------------------------------------------------------------------
class CodeModulation(nn.Module):
    """The per-cell input scale ``1 + gain * LN(W_c c)`` (LayerNorm without affine, ``W_c`` without bias).

    At gain 0 it is exactly 1, so a modulated layer starts close to its plain counterpart.
    """

    def __init__(self, features: int, code_dim: int, gain: float) -> None:
        super().__init__()
        self.proj = nn.Linear(code_dim, features, bias=False)
        self.norm = nn.LayerNorm(features, elementwise_affine=False)
        self.gain = nn.Parameter(torch.tensor(float(gain)))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return 1.0 + self.gain * self.norm(self.proj(code))


class ModLinear(nn.Linear):
    """Code-modulated linear layer ``W(x * (1 + gain * LN(W_c c))) + b``: cells share W yet compute different maps.

    ``code`` is ``[T, code_dim]`` (one per token) or ``[1, code_dim]`` (shared); it broadcasts over the batch.
    """

    def __init__(self, in_features: int, out_features: int, code_dim: int, *, gain: float, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.mod = CodeModulation(in_features, code_dim, gain)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.linear(x * self.mod(code), self.weight, self.bias)


class ModGEGLU(GluMlp):
    """timm's GEGLU feed-forward with both linear layers code-modulated."""

    def __init__(self, cfg: NACConfig) -> None:
        hidden = int(cfg.ffn_capacity * cfg.dim)
        super().__init__(cfg.dim, 2 * hidden, act_layer=nn.GELU)
        self.mod1 = CodeModulation(cfg.dim, cfg.code_dim, cfg.mod_gain)
        self.mod2 = CodeModulation(hidden, cfg.code_dim, cfg.mod_gain)

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        value, gate = self.fc1(x * self.mod1(code)).chunk(2, dim=-1)
        hidden = self.drop1(value * self.act(gate))
        return self.drop2(self.fc2(hidden * self.mod2(code)))


class ModAttention(nn.Module):
    """Receivers attend to senders; q/k/v/out are code-modulated (no qkv bias); ``links`` is an additive log bias."""

    def __init__(self, cfg: NACConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        kw = dict(gain=cfg.mod_gain)
        self.q = ModLinear(cfg.dim, cfg.inner_dim, cfg.code_dim, bias=False, **kw)
        self.k = ModLinear(cfg.dim, cfg.inner_dim, cfg.code_dim, bias=False, **kw)
        self.v = ModLinear(cfg.dim, cfg.inner_dim, cfg.code_dim, bias=False, **kw)
        self.proj = ModLinear(cfg.inner_dim, cfg.dim, cfg.code_dim, **kw)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, receivers: torch.Tensor, senders: torch.Tensor, receiver_code: torch.Tensor,
                sender_code: torch.Tensor, links: torch.Tensor | None = None) -> torch.Tensor:
        """``links`` is ``[R, S]`` or ``[B, R, S]`` (log link weights), or None for dense attention."""
        q = self._heads(self.q(receivers, receiver_code))
        k, v = self._heads(self.k(senders, sender_code)), self._heads(self.v(senders, sender_code))
        if links is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # written out (it exports cleanly, unlike SDPA with a float mask); logits + links in float32
            links = links.unsqueeze(1) if links.dim() == 3 else links
            logits = (q @ k.transpose(-2, -1)).float() * self.head_dim ** -0.5 + links.float()
            out = logits.softmax(-1).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).flatten(2), receiver_code)


class CodeConditionedReadIn(ModAttention):
    """Latents attend to image tokens with keys and values modulated by *each latent's* code.

    Materialising ``k[l, t] = W_k(x_t * m_l)`` costs ``[B, L, T, inner]``. Since ``W_k`` and ``W_v`` have no
    bias, the modulation folds into the query side instead: ``q_l . k[l, t] = (m_l * W_k^T q_l) . x_t`` and
    ``sum_t a[l, t] v[l, t] = W_v(m_l * sum_t a[l, t] x_t)``. Same numbers, ``[B, H, L, D]`` memory.
    """

    def forward(self, latents: torch.Tensor, tokens: torch.Tensor, code: torch.Tensor,  # type: ignore[override]
                sender_code: torch.Tensor | None = None, links: torch.Tensor | None = None) -> torch.Tensor:
        q = self._heads(self.q(latents, code))  # [B, H, L, dh]
        w_k = self.k.weight.unflatten(0, (self.num_heads, self.head_dim))  # [H, dh, D]
        w_v = self.v.weight.unflatten(0, (self.num_heads, self.head_dim))
        q_in = torch.einsum("bhld,hde->bhle", q, w_k) * self.k.mod(code)  # [B, H, L, D]
        logits = (q_in @ tokens.unsqueeze(1).transpose(-2, -1)).float() * self.head_dim ** -0.5
        context = logits.softmax(-1).to(tokens.dtype) @ tokens.unsqueeze(1)  # [B, H, L, D]
        out = torch.einsum("bhle,hde->bhld", context * self.v.mod(code), w_v)
        return self.proj(out.transpose(1, 2).flatten(2), code)


class ConfidencePooling(nn.Module):
    """Pools the output latents with learned confidence weights instead of a mean.

    Gumbel-softmax over the latents in training (a stochastic pick that still trains every score), softmax at
    eval; the weights sum to 1 either way.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.score = nn.Linear(dim, 1)

    def weights(self, latents: torch.Tensor) -> torch.Tensor:
        scores = self.score(self.norm(latents)).squeeze(-1)
        return F.gumbel_softmax(scores, tau=1.0, dim=-1) if self.training else scores.softmax(-1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.weights(latents).unsqueeze(-1) * self.norm(latents)).sum(1)


class MapBlocks(nn.Module):
    """timm ViT blocks over the tokens of a ``[B, C, H, W]`` map, returned as a map: the ``vit`` tokenizer's body."""

    def __init__(self, cfg: NACConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(cfg.dim, cfg.num_heads, mlp_ratio=4.0, init_values=1e-6,
                                            norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps))
                                      for _ in range(cfg.tokenizer_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return self.blocks(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


def tokenizer(cfg: NACConfig, in_chans: int) -> nn.Module:
    """Pixels -> a ``[B, dim, H/patch, W/patch]`` map.

    ``convnext`` is the reference's tokenizer (timm's ConvNeXt stages): a stem to half the grid's resolution at
    ``dim/2`` channels, one stage there, a downsampling stage to the grid at ``dim`` channels. A single patch conv
    (``patch``) gives the read-in only linear features of each patch to attend to.
    """
    if cfg.tokenizer != "convnext":
        patches = nn.Conv2d(in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        if cfg.tokenizer == "patch":
            return patches
        return nn.Sequential(patches, MapBlocks(cfg))
    half, stride = cfg.dim // 2, cfg.patch_size // 2
    kw = dict(ls_init_value=1e-6, norm_layer=LayerNorm2d, norm_layer_cl=LayerNorm)
    return nn.Sequential(
        nn.Conv2d(in_chans, half, kernel_size=stride, stride=stride), LayerNorm2d(half),
        ConvNeXtStage(half, half, stride=1, depth=cfg.tokenizer_depths[0], **kw),
        ConvNeXtStage(half, cfg.dim, stride=2, depth=cfg.tokenizer_depths[1], **kw),
    )


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------
class _CellStage(Stage):
    """What every NAC stage shares: codes (noisy in training), the fixed shared code, the GEGLU branch."""

    def __init__(self, cfg: NACConfig, num_codes: int, ffn_layer_scale: float | None = None) -> None:
        super().__init__()
        ffn_layer_scale = cfg.layer_scale if ffn_layer_scale is None else ffn_layer_scale
        self.code_noise = cfg.code_noise
        self.codes = nn.Parameter(torch.randn(num_codes, cfg.code_dim))
        self.register_buffer("shared_code", fixed_shared_code(cfg))
        self.ffn = ModGEGLU(cfg)
        self.norm_ffn = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ls_ffn = LayerScale(cfg.dim, init_values=ffn_layer_scale)
        self.drop_path = DropPath(cfg.drop_path) if cfg.drop_path > 0 else nn.Identity()

    def cell_codes(self) -> torch.Tensor:
        """This stage's codes (``[N, code_dim]``), or the shared code (``[1, code_dim]``) in distillation mode."""
        if self.distilling:
            return self.shared_code
        if self.training and self.code_noise > 0:
            return self.codes + self.code_noise * torch.randn_like(self.codes)
        return self.codes

    def feed_forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls_ffn(self.ffn(self.norm_ffn(x), code)))

    def _check_cells(self, x: torch.Tensor, n_cells: int) -> None:
        if x.shape[1] != n_cells:
            raise ValueError(f"{type(self).__name__} expects its {n_cells} cells, got {x.shape[1]} tokens; a stage "
                             "run on other tokens (m2mKD) must be put in distillation_mode(True)")

    def _init_weights(self) -> None:
        """Plain linear layers (pooling score, head) get timm's trunc-normal 0.02. The code-modulated layers keep
        PyTorch's Linear init (kaiming-uniform), as the reference's ModFC does: with 0.02 the read-in's queries are
        so small that its attention starts uniform and stage 0 starts close to a constant."""
        modulated = {id(m) for layer in self.modules() if isinstance(layer, (ModLinear, ModGEGLU, CodeModulation))
                     for m in layer.modules()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in modulated:
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class NACReadIn(_CellStage):
    """Stage 0: patch tokenizer + code-conditioned read-in. Image -> cell states ``[B, L_in + L_med, D]``.

    As the reference's read-in student: LayerScale 1.0 on the read-in attention and 1e-6 on its feed-forward, and
    initial states at the scale of the reference's latent seeder (``latent_std``). In distillation mode the stage
    emits only the ``L_in`` read-in latents, the tokens that carry the image: the mediators' initial states are
    constants, and handing them to the meta model would drown the image in them.
    """

    def __init__(self, cfg: NACConfig, *, img_size: int, in_chans: int) -> None:
        super().__init__(cfg, cfg.num_input_latents, ffn_layer_scale=cfg.read_in_ffn_layer_scale)
        if img_size % cfg.patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={cfg.patch_size}")
        self.interface = StageInterface("image->tokens", None, cfg.dim)
        grid = img_size // cfg.patch_size
        self.patch_embed = tokenizer(cfg, in_chans)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.dim))
        self.latents = nn.Parameter(torch.zeros(cfg.num_input_latents, cfg.dim))
        self.mediator_init = nn.Parameter(torch.zeros(cfg.num_mediator_latents, cfg.dim))
        self.norm_q = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm_kv = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = CodeConditionedReadIn(cfg)
        self.ls_attn = LayerScale(cfg.dim, init_values=cfg.read_in_layer_scale)
        self.random_receivers = cfg.distill_receivers == "random"
        self._init_weights()
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.latents, std=cfg.latent_std)
        nn.init.normal_(self.mediator_init, std=cfg.latent_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        code = self.cell_codes()
        lat = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        if self.distilling and self.random_receivers:  # the reference's m2mKD read-in: one random state per sample
            lat = torch.randn(x.shape[0], 1, lat.shape[-1], device=x.device, dtype=lat.dtype)
        lat = lat + self.drop_path(self.ls_attn(self.attn(self.norm_q(lat), self.norm_kv(tokens), code)))
        lat = self.feed_forward(lat, code)
        if self.distilling:
            return lat
        return torch.cat([lat, self.mediator_init.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)


class NACPropagator(_CellStage):
    """One propagator iteration: the mediators attend to every cell through the kernel; input latents only send.

    In distillation mode every token attends to every token (dense) with the shared code.
    """

    def __init__(self, cfg: NACConfig, signatures: torch.Tensor | None = None) -> None:
        super().__init__(cfg, cfg.n_cells)
        self.interface = StageInterface("tokens->tokens", cfg.dim, cfg.dim)
        self.num_inputs, self.n_cells = cfg.num_input_latents, cfg.n_cells
        signatures = cell_signatures(cfg) if signatures is None else signatures
        if signatures.shape != (cfg.n_cells, cfg.sig_dim):
            raise ValueError(f"signatures must be {(cfg.n_cells, cfg.sig_dim)}; got {tuple(signatures.shape)}")
        self.signatures = nn.Parameter(signatures.detach().clone().float())
        self.kernel = SignatureKernel(cfg)
        self.norm_attn = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = ModAttention(cfg)
        self.ls_attn = LayerScale(cfg.dim, init_values=cfg.layer_scale)
        self.register_buffer("prior", prior_adjacency(cfg), persistent=False)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.distilling:
            return self._update(x, 0, self.shared_code, self.shared_code, None)
        self._check_cells(x, self.n_cells)
        code = self.cell_codes()
        links = self.kernel(self.signatures[self.num_inputs:], self.signatures, x.shape[0])
        return self._update(x, self.num_inputs, code[self.num_inputs:], code, links)

    def _update(self, x: torch.Tensor, first: int, receiver_code: torch.Tensor, sender_code: torch.Tensor,
                links: torch.Tensor | None) -> torch.Tensor:
        """Tokens ``first:`` receive from all tokens; tokens before ``first`` pass through unchanged."""
        h = self.norm_attn(x)
        recv = x[:, first:]
        recv = recv + self.drop_path(self.ls_attn(self.attn(h[:, first:], h, receiver_code, sender_code, links)))
        return torch.cat([x[:, :first], self.feed_forward(recv, receiver_code)], dim=1)

    def signature_loss(self, cfg: NACConfig) -> torch.Tensor:
        """Weighted sparsity repulsion over all cells, plus (when weighted) the prior hinge over the mediators."""
        loss = cfg.sparsity_weight * signature_repulsion(self.signatures, cfg.sparsity_hinge)
        if cfg.prior_weight > 0:
            mediators = self.signatures[self.num_inputs:]
            loss = loss + cfg.prior_weight * prior_fit_loss(mediators, self.prior, cfg.link_cos,
                                                            cfg.signature_fit_margin)
        return loss


class NACReadOut(_CellStage):
    """Last stage: output latents read the cells through the kernel (no residual), confidence pooling, head."""

    def __init__(self, cfg: NACConfig, *, num_classes: int) -> None:
        super().__init__(cfg, cfg.num_output_latents)
        self.interface = StageInterface("tokens->logits", cfg.dim, None)
        self.n_cells = cfg.n_cells
        gen = torch.Generator().manual_seed(cfg.graph_seed + 3)
        self.latents = nn.Parameter(torch.randn(cfg.num_output_latents, cfg.dim, generator=gen))
        out_signatures = torch.randn(cfg.num_output_latents, cfg.sig_dim, generator=gen)
        self.signatures = nn.Parameter(F.normalize(out_signatures, dim=-1))
        self.cell_signatures = nn.Parameter(cell_signatures(cfg))
        self.sender_codes = nn.Parameter(torch.randn(cfg.n_cells, cfg.code_dim))
        self.kernel = SignatureKernel(cfg)
        self.norm_q = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm_kv = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = ModAttention(cfg)
        self.pool = ConfidencePooling(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, num_classes)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lat = self.norm_q(self.latents).unsqueeze(0).expand(x.shape[0], -1, -1)
        if self.distilling:
            code = senders = self.shared_code
            links = None
        else:
            self._check_cells(x, self.n_cells)
            code, senders = self.cell_codes(), self.sender_codes
            links = self.kernel(self.signatures, self.cell_signatures, x.shape[0])
        lat = self.feed_forward(self.attn(lat, self.norm_kv(x), code, senders, links), code)
        return self.head(self.pool(lat))

    def signature_loss(self, cfg: NACConfig) -> torch.Tensor:
        """Weighted sparsity repulsion over the cells' and the output latents' signatures (as the reference)."""
        return cfg.sparsity_weight * signature_repulsion(torch.cat([self.cell_signatures, self.signatures]),
                                                         cfg.sparsity_hinge)


class NACStudent(StagedModel):
    """A staged NAC whose ``aux_loss()`` also carries the signature regulariser, for end-to-end training.

    The regulariser lives here, not on a stage, so a stage distilled alone (m2mKD) never sees it.
    """

    def __init__(self, stages: list[Stage], cfg: NACConfig, **kwargs) -> None:
        super().__init__(stages, **kwargs)
        self.nac_config = cfg

    def regularizer(self) -> torch.Tensor | None:
        """The weighted signature regulariser, averaged over the stages that own a copy of the signatures (the
        reference has one shared set), or None when its weights are 0."""
        cfg = self.nac_config
        owners = [m for m in self.modules() if isinstance(m, (NACPropagator, NACReadOut))]
        if not owners or (cfg.sparsity_weight == 0 and cfg.prior_weight == 0):
            return None
        return torch.stack([m.signature_loss(cfg) for m in owners]).mean()

    def aux_loss(self) -> torch.Tensor | None:
        losses = [loss for loss in (super().aux_loss(), self.regularizer()) if loss is not None]
        return torch.stack(losses).sum() if losses else None


# ---------------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------------
def nac_config(preset: str = "small", **overrides) -> NACConfig:
    """The faithful preset's config with ``overrides`` applied and validated."""
    return preset_config(NAC_PRESETS, preset, overrides, family="NAC", also=(*SIMPLE_PRESETS,))


def build_nac(*, modules: int, num_classes: int, img_size: int, in_chans: int = 3, preset: str = "small",
              **overrides) -> StagedModel:
    """A NAC student in ``modules`` = K stages: read-in, K-2 propagator iterations, read-out.

    ``preset="simple"`` builds monomod's earlier, simplified NAC (``nac_simple.py``); every other preset the
    faithful one. The config used is kept as ``model.nac_config``.
    """
    if modules < 3:
        raise ValueError(
            f"NAC needs at least 3 modules (tokenizer+read-in, >=1 propagator, read-out); got K={modules}"
        )
    if preset in SIMPLE_PRESETS:
        return build_simple_nac(modules=modules, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                                preset=preset, **overrides)
    cfg = nac_config(preset, **overrides)
    signatures = cell_signatures(cfg)
    stages: list[Stage] = [NACReadIn(cfg, img_size=img_size, in_chans=in_chans)]
    stages += [NACPropagator(cfg, signatures) for _ in range(modules - 2)]
    stages.append(NACReadOut(cfg, num_classes=num_classes))
    return NACStudent(stages, cfg, num_classes=num_classes, img_size=img_size, in_chans=in_chans)


__all__ = [
    "CUT", "CodeConditionedReadIn", "CodeModulation", "ConfidencePooling", "GRAPH_PRIORS", "ModAttention",
    "ModGEGLU", "ModLinear", "NACConfig", "NACPropagator", "NACReadIn", "NACReadOut", "NACStudent", "NAC_PRESETS",
    "SignatureKernel", "build_nac", "cell_signatures", "fixed_shared_code", "nac_config", "prior_adjacency",
    "relaxed_bernoulli_log", "signature_repulsion",
]
