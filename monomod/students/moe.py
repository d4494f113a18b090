"""V-MoE student: a timm ViT whose MLPs are top-k Mixture-of-Experts layers, cut into K stages.

The student is timm's ``VisionTransformer`` built with ``Block(mlp_layer=MoELayer)`` where the placement puts an
MoE layer, and cut by the same code as the ViT student (``vit.cut_vit``), so both families share their stages.

Routing (per MoE layer, over the N = B*T tokens of the batch, flattened batch-major), by ``gate``:

* ``"reference"`` (the m2mKD reference, FastMoE's ``NaiveGate``): router logits ``x @ W_r + b`` (linear with
  bias, float32), top-k of the logits, then a softmax over those k, so the k gates sum to 1. No capacity limit
  (``capacity_factor`` is not read) and no balancing loss (``last_aux_loss`` stays None).
* ``"vmoe"`` (the V-MoE paper): ``p = softmax(x @ W_r)`` (no bias), top-k; the gate of a chosen expert is its
  softmax probability (no re-normalisation over the k choices), with expert capacity and the balancing loss
  below.
* capacity (``vmoe`` gate): each expert processes at most ``C = min(N, ceil(capacity_factor * k * N / E))`` tokens
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

Auxiliary load-balancing loss (``vmoe`` gate), stored by each MoE layer as ``last_aux_loss`` after every forward::

    importance_e = sum_n p[n, e]
    f_e          = (1/N) * #{n : top-1 expert of n is e}
    P_e          = (1/N) * sum_n p[n, e]
    aux = aux_loss_weight * ( Var_e(importance) / Mean_e(importance)^2      # CV^2, population variance (V-MoE)
                              + E * sum_e f_e * P_e )                       # load term, Switch Transformer form

Under perfect balance the CV^2 term is 0 and the Switch term is 1. Gradients flow through ``p`` only.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

from .base import StagedModel, check_vit_geometry, preset_config
from .vit import ViTStudent, cut_vit, split_depth

MOE_GATES: tuple[str, ...] = ("reference", "vmoe")


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
    gate: str = "reference"  # one of MOE_GATES: the m2mKD reference's gate, or the V-MoE paper's
    capacity_factor: float | None = None  # vmoe gate only; None = unlimited (C = N)
    moe_layers: str = "every"  # "every" | "every_other" (odd 0-based blocks, V-MoE) | "last:N"
    aux_loss_weight: float = 0.01  # vmoe gate only; 0 disables the auxiliary loss (last_aux_loss stays None)
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout inside MLPs/experts and before the head
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks

    def validate(self) -> None:
        if self.gate not in MOE_GATES:
            raise ValueError(f"unknown gate {self.gate!r}; choose one of {list(MOE_GATES)}")
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
    # V-MoE-B/16: ViT-Base with an 8-expert top-2 MoE in every block, with the V-MoE paper's gate. The capacity
    # factor is our choice (a common Switch/V-MoE value). The paper recipe switches to the reference gate.
    "vmoe_base": MoEConfig(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16, num_experts=8,
                           top_k=2, gate="vmoe", capacity_factor=1.25, moe_layers="every"),
    # CPU sizes, with the m2mKD reference's gate so that the demo runs the paper's experiment.
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
    """Top-k mixture of 2-layer GELU MLP experts behind the ``reference`` or ``vmoe`` gate (module docstring).

    Its constructor takes timm's ``mlp_layer`` arguments, so ``Block(mlp_layer=partial(MoELayer, ...))`` builds
    an MoE block; ``norm_layer`` must be None and the experts always carry biases.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, num_experts: int = 4, top_k: int = 2,
                 *, gate: str = "reference", capacity_factor: float | None = None, aux_loss_weight: float = 0.01,
                 drop: float = 0.0, act_layer: type[nn.Module] = nn.GELU, norm_layer: Any = None, bias: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if gate not in MOE_GATES or norm_layer is not None:
            raise ValueError(f"MoELayer takes gate in {list(MOE_GATES)} and no norm_layer; got {gate!r}, {norm_layer}")
        dim, hidden = in_features, hidden_features or in_features
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = gate
        self.capacity_factor = capacity_factor
        self.aux_loss_weight = aux_loss_weight
        self.router = nn.Linear(dim, num_experts, bias=gate == "reference")
        # Stacked expert weights, laid out for x @ w: expert e computes gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e].
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, dim))
        self.act = act_layer()  # exact GELU by default, as timm's Mlp, so experts can be upcycled from ViT MLPs
        self.drop = nn.Dropout(drop)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_drop_fraction: torch.Tensor | None = None  # detached: share of (token, choice) pairs dropped
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.router.weight, self.w1, self.w2):
            trunc_normal_(w, std=0.02)
        for b in (self.b1, self.b2, self.router.bias):
            if b is not None:
                nn.init.zeros_(b)

    init_weights = reset_parameters  # the hook timm's ViT init calls on modules it does not know

    def capacity(self, num_tokens: int) -> int:
        """Buffer size per expert; never more than N, since a token picks an expert at most once.

        Integer-only, so a symbolic ``num_tokens`` (a SymInt while exporting) gives a symbolic capacity rather
        than a constant baked from the example batch.
        """
        if self.capacity_factor is None or self.gate == "reference":
            return num_tokens
        ratio = Fraction(self.capacity_factor).limit_denominator(1000)
        numerator, denominator = ratio.numerator * self.top_k, ratio.denominator * self.num_experts
        return torch.sym_min(num_tokens, (numerator * num_tokens + denominator - 1) // denominator)  # ceil

    def scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Gates ``[N, k]`` and experts ``[N, k]`` of each token, and the full softmax ``[N, E]`` (vmoe gate only,
        for the balancing loss). Computed in float32."""
        logits = self.router(x).float()
        if self.gate == "reference":
            top, experts = logits.topk(self.top_k, dim=-1)
            return top.softmax(dim=-1), experts, None
        probs = logits.softmax(dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        return gates, experts, probs

    def route(self, experts: torch.Tensor, capacity: int) -> torch.Tensor:
        """Buffer slots ``[N, k]``: the index in the flat ``[E * C]`` expert buffer of each (token, choice), or
        ``E * C`` when the expert was full and the assignment is dropped."""
        num_tokens = experts.shape[0]
        # Choice-major order = priority: all first choices (token order), then all second choices, ...
        choice_expert = experts.t().reshape(-1)  # [k*N]
        onehot = F.one_hot(choice_expert, self.num_experts)  # [k*N, E]
        position = ((onehot.cumsum(0) - 1) * onehot).sum(-1)  # rank of each assignment within its expert
        kept = position < capacity
        dropped = torch.full_like(position, self.num_experts * capacity)
        slots = torch.where(kept, choice_expert * capacity + position, dropped)
        return slots.view(self.top_k, num_tokens).t()

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

        gates, experts, probs = self.scores(x)
        slots = self.route(experts, capacity)

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
            weighted = probs is not None and self.aux_loss_weight > 0
            self.last_aux_loss = self.balancing_loss(probs, experts[:, 0]) if weighted else None
            self.last_drop_fraction = (slots == num_experts * capacity).float().mean().detach()
        return y.view(shape)


def _block(*, depth: int, moe_at: frozenset[int], moe_layer: Any, **kwargs: Any) -> Block:
    """timm's ``Block``, with ``moe_layer`` as its ``mlp_layer`` where the placement puts an MoE layer."""
    if depth in moe_at:
        kwargs["mlp_layer"] = moe_layer
    return Block(depth=depth, **kwargs)


def moe_config(preset: str = "small", **overrides: Any) -> MoEConfig:
    """The preset's config with ``overrides`` (any ``MoEConfig`` field) applied and validated."""
    return preset_config(MOE_PRESETS, preset, overrides, family="MoE")


def build_moe(*, modules: int, num_classes: int, img_size: int, in_chans: int = 3, preset: str = "small",
              **overrides: Any) -> ViTStudent:
    """Build a V-MoE student from ``MOE_PRESETS[preset]`` with ``overrides``: a timm ViT whose placed blocks have
    an MoE ``mlp_layer``, cut into ``modules`` contiguous stages like the ViT student."""
    cfg = moe_config(preset, **overrides)
    check_vit_geometry(img_size, cfg.patch_size, cfg.depth)
    split_depth(cfg.depth, modules)  # validate before allocating the model
    moe_layer = functools.partial(MoELayer, num_experts=cfg.num_experts, top_k=cfg.top_k, gate=cfg.gate,
                                  capacity_factor=cfg.capacity_factor, aux_loss_weight=cfg.aux_loss_weight)
    block_fn = functools.partial(_block, moe_at=frozenset(moe_block_indices(cfg.moe_layers, cfg.depth)),
                                 moe_layer=moe_layer)
    vit = VisionTransformer(
        img_size=img_size, in_chans=in_chans, num_classes=num_classes, patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias, drop_rate=cfg.drop_rate, pos_drop_rate=cfg.drop_rate, proj_drop_rate=cfg.drop_rate,
        attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate, block_fn=block_fn,
    )
    student = cut_vit(vit, modules, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    student.config = cfg  # plain attribute: the resolved config, for reports and checkpoints
    return student


def student_blocks(student: StagedModel) -> list[nn.Module]:
    """All transformer blocks of a staged student, in forward order."""
    return [b for stage in student.stages for b in getattr(stage, "blocks", [])]


def is_moe(block: nn.Module) -> bool:
    """Whether a transformer block's MLP is an MoE layer."""
    return isinstance(getattr(block, "mlp", None), MoELayer)


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
        if not is_moe(block):
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
