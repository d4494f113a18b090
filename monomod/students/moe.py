"""V-MoE student: a pre-norm ViT whose MLPs are top-k Mixture-of-Experts layers, cut into K stages.

Routing (per MoE layer, over the N = B*T tokens of the batch, flattened batch-major):

* router: ``p = softmax(x @ W_r)`` (linear without bias, computed in float32), then top-k; the gate of a chosen
  expert is its softmax probability (no re-normalisation over the k choices, as in V-MoE).
* capacity: each expert processes at most ``C = min(N, ceil(capacity_factor * k * N / E))`` tokens
  (``capacity_factor=None``: ``C = N``, nothing is ever dropped). C is computed in exact integer arithmetic
  (``capacity_factor`` read as the fraction p/q with q <= 1000, e.g. 1.25 = 5/4) with ``torch.sym_min``, so it
  stays a symbolic function of the batch under ``torch.export`` / the ONNX exporter (int64 Mul/Div/Min on the
  input's shape, no float rounding that could differ between torch and the exported graph). Buffer positions are handed out in priority
  order: every token's 1st choice, in token order, then every token's 2nd choice, in token order, and so on. A
  (token, expert) assignment that finds the expert full is dropped: it contributes 0 and the block's residual
  connection carries the token. Token order favours earlier images of a batch when experts overflow (V-MoE's
  "batch prioritized routing", which sorts by gate value, is not implemented).
* dispatch is static-shaped: each expert gets a ``[C, D]`` buffer (empty slots hold zeros), all experts run as one
  batched matmul over stacked ``[E, D, H]`` / ``[E, H, D]`` weights, and results are gathered back per token.
  No Python loop over tokens or experts and no data-dependent control flow, so the layer can be traced/exported.
  Cost is ``E * C`` expert-token evaluations: with unlimited capacity that is E/k times the useful work.

Auxiliary load-balancing loss, stored by each MoE layer as ``last_aux_loss`` after every forward::

    importance_e = sum_n p[n, e]
    f_e          = (1/N) * #{n : top-1 expert of n is e}
    P_e          = (1/N) * sum_n p[n, e]
    aux = aux_loss_weight * ( Var_e(importance) / Mean_e(importance)^2      # CV^2, population variance (V-MoE)
                              + E * sum_e f_e * P_e )                       # load term, Switch Transformer form

Under perfect balance the CV^2 term is 0 and the Switch term is 1. Gradients flow through ``p`` only.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Attention, DropPath, Mlp, PatchEmbed, trunc_normal_

from .base import Stage, StagedModel, StageInterface
from .vit import split_depth


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing hyper-parameters of a V-MoE student."""

    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0  # expert hidden width = mlp_ratio * embed_dim (also for dense MLPs)
    patch_size: int = 4
    num_experts: int = 4
    top_k: int = 2
    capacity_factor: float | None = None  # None = unlimited (C = N)
    moe_layers: str = "every"  # "every" | "every_other" (odd 0-based blocks, V-MoE) | "last:N"
    aux_loss_weight: float = 0.01  # 0 disables the auxiliary loss (last_aux_loss stays None)
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout inside MLPs/experts and before the head
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None (unlimited), got {self.capacity_factor}")
        if self.aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        moe_block_indices(self.moe_layers, self.depth)


MOE_PRESETS: dict[str, MoEConfig] = {
    # m2mKD reference V-MoE-B/16: ViT-Base with an 8-expert top-2 MoE in every block. The capacity factor is our
    # choice (a common Switch/V-MoE value): with unlimited capacity every expert would run on every token.
    "vmoe_base": MoEConfig(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16, num_experts=8,
                           top_k=2, capacity_factor=1.25, moe_layers="every"),
    # CPU sizes: unlimited capacity keeps them exact and simple to reason about; compute is negligible here.
    "small": MoEConfig(embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0, patch_size=4, num_experts=4, top_k=2),
    "tiny": MoEConfig(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=8, num_experts=4, top_k=2),
}


def moe_block_indices(spec: str, depth: int) -> list[int]:
    """0-based indices of the blocks whose MLP is an MoE layer, for a ``moe_layers`` spec."""
    if spec == "every":
        return list(range(depth))
    if spec == "every_other":
        return list(range(1, depth, 2))  # V-MoE: the odd blocks, so the last block of an even depth is MoE
    if isinstance(spec, str) and spec.startswith("last:"):
        count = spec[len("last:"):]
        if count.isdigit() and int(count) <= depth:
            return list(range(depth - int(count), depth))
        raise ValueError(f"moe_layers={spec!r}: N in 'last:N' must be an integer in [0, depth={depth}]")
    raise ValueError(f"moe_layers={spec!r} is not one of 'every', 'every_other', 'last:N'")


class MoELayer(nn.Module):
    """Top-k softmax-routed mixture of 2-layer GELU MLP experts with expert capacity (see module docstring)."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, *,
                 capacity_factor: float | None = None, aux_loss_weight: float = 0.01, drop: float = 0.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.aux_loss_weight = aux_loss_weight
        self.router = nn.Linear(dim, num_experts, bias=False)
        # Stacked expert weights, laid out for x @ w: expert e computes gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e].
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, dim))
        self.act = nn.GELU()  # exact GELU, as timm's Mlp, so experts can be upcycled from ViT MLPs
        self.drop = nn.Dropout(drop)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_drop_fraction: torch.Tensor | None = None  # detached: share of (token, choice) pairs dropped
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.router.weight, self.w1, self.w2):
            trunc_normal_(w, std=0.02)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def capacity(self, num_tokens: int) -> int:
        """Buffer size per expert; never more than N, since a token picks an expert at most once.

        Integer-only, so a symbolic ``num_tokens`` (a SymInt while exporting) gives a symbolic capacity rather
        than a constant baked from the example batch.
        """
        if self.capacity_factor is None:
            return num_tokens
        ratio = Fraction(self.capacity_factor).limit_denominator(1000)
        numerator, denominator = ratio.numerator * self.top_k, ratio.denominator * self.num_experts
        return torch.sym_min(num_tokens, (numerator * num_tokens + denominator - 1) // denominator)  # ceil

    def route(self, probs: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k choice with capacity. Returns ``gates [N, k]``, ``experts [N, k]`` and ``slots [N, k]``: the
        index in the flat ``[E * C]`` expert buffer of each (token, choice), or ``E * C`` when it was dropped."""
        num_tokens, num_experts = probs.shape
        gates, experts = probs.topk(self.top_k, dim=-1)
        # Choice-major order = priority: all first choices (token order), then all second choices, ...
        choice_expert = experts.t().reshape(-1)  # [k*N]
        onehot = F.one_hot(choice_expert, num_experts)  # [k*N, E]
        position = ((onehot.cumsum(0) - 1) * onehot).sum(-1)  # rank of each assignment within its expert
        kept = position < capacity
        dropped = torch.full_like(position, num_experts * capacity)
        slots = torch.where(kept, choice_expert * capacity + position, dropped)
        return gates, experts, slots.view(self.top_k, num_tokens).t()

    def balancing_loss(self, probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
        """Weighted CV(importance)^2 + Switch load term (formula in the module docstring)."""
        importance = probs.sum(0)
        cv_squared = importance.var(unbiased=False) / importance.mean() ** 2
        fraction = F.one_hot(top1, self.num_experts).to(probs.dtype).mean(0)  # f_e, no gradient
        switch = self.num_experts * (fraction * probs.mean(0)).sum()
        return self.aux_loss_weight * (cv_squared + switch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D], batch-major token order
        num_tokens, dim = x.shape
        num_experts, capacity = self.num_experts, self.capacity(num_tokens)

        probs = torch.softmax(self.router(x).float(), dim=-1)  # [N, E]
        gates, experts, slots = self.route(probs, capacity)

        # Dispatch: which token fills each buffer slot (empty slots point at an extra all-zero row N).
        token_ids = torch.arange(num_tokens, device=x.device).repeat(self.top_k)  # matches choice-major order
        slot_token = torch.full((num_experts * capacity + 1,), num_tokens, dtype=torch.long, device=x.device)
        slot_token = slot_token.scatter(0, slots.t().reshape(-1), token_ids)[:-1]  # dropped ones hit the extra slot
        x_padded = torch.cat([x, x.new_zeros(1, dim)])
        expert_in = x_padded[slot_token].view(num_experts, capacity, dim)

        hidden = self.drop(self.act(torch.baddbmm(self.b1, expert_in, self.w1)))
        expert_out = self.drop(torch.baddbmm(self.b2, hidden, self.w2)).reshape(num_experts * capacity, dim)

        # Combine: dropped assignments read the extra zero row, so they contribute exactly 0.
        out_padded = torch.cat([expert_out, expert_out.new_zeros(1, dim)])
        y = (gates.unsqueeze(-1).to(x.dtype) * out_padded[slots]).sum(1)

        if not torch.compiler.is_exporting():  # training statistics, not part of an exported inference graph
            self.last_aux_loss = self.balancing_loss(probs, experts[:, 0]) if self.aux_loss_weight > 0 else None
            self.last_drop_fraction = (slots == num_experts * capacity).float().mean().detach()
        return y.view(shape)


class MoEBlock(nn.Module):
    """Pre-norm transformer block (timm layout: norm1/attn/norm2/mlp) whose MLP may be an ``MoELayer``."""

    def __init__(self, cfg: MoEConfig, *, moe: bool, drop_path: float = 0.0) -> None:
        super().__init__()
        dim, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate,
                              proj_drop=cfg.drop_rate)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        if moe:
            self.mlp: nn.Module = MoELayer(dim, hidden, cfg.num_experts, cfg.top_k,
                                           capacity_factor=cfg.capacity_factor,
                                           aux_loss_weight=cfg.aux_loss_weight, drop=cfg.drop_rate)
        else:
            self.mlp = Mlp(dim, hidden, drop=cfg.drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoELayer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MoEEmbedStage(Stage):
    """Stage 0: patch embedding, class token, learned position embedding, then its blocks."""

    def __init__(self, cfg: MoEConfig, img_size: int, in_chans: int, blocks: list[MoEBlock]) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=cfg.patch_size, in_chans=in_chans,
                                      embed_dim=cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, cfg.embed_dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.Sequential(*blocks)
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)  # timm's init
        self.interface = StageInterface("image->tokens", None, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.blocks(self.pos_drop(x))


class MoEBlocksStage(Stage):
    """Middle stage: a contiguous group of blocks; works for any token count."""

    def __init__(self, width: int, blocks: list[MoEBlock]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.interface = StageInterface("tokens->tokens", width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class MoEHeadStage(Stage):
    """Last stage: its blocks, final norm, class-token pooling and the linear head."""

    def __init__(self, cfg: MoEConfig, num_classes: int, blocks: list[MoEBlock]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.interface = StageInterface("tokens->logits", cfg.embed_dim, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(x))
        return self.head(self.head_drop(x[:, 0]))


def _init_dense(module: nn.Module) -> None:
    """timm-style init (truncated normal, zero bias) for Linear layers; torch's default is kaiming-uniform."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_moe(*, modules: int, num_classes: int, img_size: int, in_chans: int = 3, preset: str = "small",
              **overrides: Any) -> StagedModel:
    """Build a V-MoE student from ``MOE_PRESETS[preset]`` with ``overrides`` (any ``MoEConfig`` field), cut into
    ``modules`` contiguous stages (blocks split as evenly as possible, first stages get the remainder)."""
    if preset not in MOE_PRESETS:
        raise ValueError(f"unknown MoE preset {preset!r}; choose from {sorted(MOE_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(MoEConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown MoEConfig field(s) {unknown}; valid: {sorted(fields)}")
    cfg = dataclasses.replace(MOE_PRESETS[preset], **overrides)
    cfg.validate()
    sizes = split_depth(cfg.depth, modules)

    moe_at = set(moe_block_indices(cfg.moe_layers, cfg.depth))
    rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    blocks = [MoEBlock(cfg, moe=i in moe_at, drop_path=rates[i]) for i in range(cfg.depth)]
    for block in blocks:
        block.apply(_init_dense)  # also re-draws MoE routers with the same std as MoELayer.reset_parameters

    groups, start = [], 0
    for n in sizes:
        groups.append(blocks[start:start + n])
        start += n
    stages: list[Stage] = [MoEEmbedStage(cfg, img_size, in_chans, groups[0])]
    stages += [MoEBlocksStage(cfg.embed_dim, g) for g in groups[1:-1]]
    stages.append(MoEHeadStage(cfg, num_classes, groups[-1]))
    stages[-1].head.apply(_init_dense)
    student = StagedModel(stages, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    student.config = cfg  # plain attribute: the resolved config, for reports and checkpoints
    return student


def student_blocks(student: StagedModel) -> list[MoEBlock]:
    """All transformer blocks of a staged student, in forward order."""
    return [b for stage in student.stages for b in getattr(stage, "blocks", [])]


@torch.no_grad()
def upcycle_experts(student: StagedModel, teacher: nn.Module) -> int:
    """Initialise every expert of every MoE layer from the teacher's matching MLP (sparse upcycling).

    Student block i (of L_s) takes teacher block ``floor(i * (L_t - 1) / max(L_s - 1, 1) + 0.5)`` (round half
    up). The teacher block must have ``mlp.fc1``/``mlp.fc2`` Linear layers (timm ViT) of the expert's shapes;
    other layers are skipped and not counted. Routers keep their random init, so all experts start identical and
    diverge through the tokens they are routed. Returns the number of MoE layers initialised.
    """
    teacher_blocks = getattr(teacher, "blocks", None)
    if teacher_blocks is None:
        raise ValueError(f"teacher {type(teacher).__name__} has no .blocks (expected a timm ViT)")
    teacher_blocks = list(teacher_blocks)
    blocks = student_blocks(student)
    num_s, num_t = len(blocks), len(teacher_blocks)
    done = 0
    for i, block in enumerate(blocks):
        if not isinstance(getattr(block, "mlp", None), MoELayer):
            continue
        moe = block.mlp
        j = math.floor(i * (num_t - 1) / max(num_s - 1, 1) + 0.5)
        mlp = getattr(teacher_blocks[j], "mlp", None)
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
            continue
        # Linear weights are [out, in]; expert weights are [E, in, out].
        if fc1.weight.shape != moe.w1.shape[:0:-1] or fc2.weight.shape != moe.w2.shape[:0:-1]:
            continue
        moe.w1.copy_(fc1.weight.t())  # [H, D] -> [D, H], broadcast to every expert
        moe.w2.copy_(fc2.weight.t())
        for bias, source in ((moe.b1, fc1.bias), (moe.b2, fc2.bias)):
            bias.copy_(source.view(1, 1, -1) if source is not None else torch.zeros_like(bias))
        done += 1
    return done
