"""The meta model: the frozen context in which each student module is distilled (METHOD.md, step 2).

``build_meta(partition)`` returns a K-stage StagedModel whose boundary tensors have exactly the shapes of the
teacher modules' boundaries, so teacher module i drops in for meta stage i with no adapter, and a student stage
needs stitch layers only where its width differs from the teacher's.

Two kinds:

* ``"trained"`` (Deep Incubation): one transformer block per stage, of an internal ``width`` that may differ from
  the teacher's boundary width D (linear maps D -> width -> D keep the boundaries teacher-shaped). Stage 0 also
  embeds the image, the last stage pools and classifies. It must be trained end to end before use.
  Where the boundaries are feature maps of varying C/H/W (CNN, Swin and other hierarchical teachers), the stages
  follow them instead: a patchify stem, then per stage a transition to the next boundary's channels and size (a
  strided conv, or a stitch layer) and one ConvNeXt block, and a pooled linear head (``MetaMapStage``).
* ``"teacher"`` (teacher-as-meta, not in the paper): the extracted teacher modules themselves. No meta training,
  and the context is exactly the teacher's, at the cost of running the (larger) teacher around each student.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from monomod.errors import MonomodError
from monomod.ir import Partition
from monomod.students.base import Stage, StagedModel, StageInterface, extracted_stages

MAX_PREFIX_TOKENS = 16  # class + distillation + register tokens; more than this is not a ViT layout we recognise


def build_meta(partition: Partition, width: int | None = None, *, kind: Literal["trained", "teacher"] = "trained",
               num_heads: int | None = None, mlp_ratio: float = 4.0) -> StagedModel:
    """A K-stage meta model for ``partition`` (K = ``partition.k`` >= 2) with teacher-shaped boundaries.

    ``width`` (trained kind only; default: the teacher's boundary width D) is the internal width of the meta
    blocks; ``num_heads`` defaults to width // 64 (rounded down to a divisor of width, at least 1).
    """
    if partition.k < 2:
        raise MonomodError(f"a meta model needs K >= 2 modules, got K={partition.k}", "partition into 2 or more modules")
    c, h, w = _image_shape(partition)
    if kind == "teacher":
        if width is not None:
            raise MonomodError("width applies to the trained meta model only", "drop width or use kind='trained'")
        return _teacher_meta(partition, c, h)
    if kind != "trained":
        raise MonomodError(f"unknown meta kind {kind!r}", "choose 'trained' or 'teacher'")

    num_classes = _num_classes(partition)
    if _has_maps(partition):
        if width is not None:
            raise MonomodError("the meta width applies to token boundaries; this teacher's boundaries are feature maps",
                               "drop meta_width: the meta stages take the teacher's channels")
        return _map_meta(partition, c, h, w, num_classes)
    tokens, dim = _token_boundary(partition)
    width = dim if width is None else width
    if width < 1:
        raise MonomodError(f"meta width must be positive, got {width}")
    heads = num_heads or _default_heads(width)
    if width % heads:
        raise MonomodError(f"meta width {width} is not divisible by num_heads={heads}", "choose another num_heads")
    patch, prefix = _token_layout(tokens, h, w, hint=_timm_layout(partition.traced.model))

    def block() -> nn.Module:
        from timm.layers import trunc_normal_
        from timm.models.vision_transformer import Block

        b = Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True)
        for m in b.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        return b

    stages: list[Stage] = [MetaEmbedStage(c, h, w, patch, prefix, width, dim, block())]
    stages += [MetaBlockStage(width, dim, block()) for _ in range(partition.k - 2)]
    stages.append(MetaHeadStage(width, dim, num_classes, prefix, block()))
    meta = StagedModel(stages, num_classes=num_classes, img_size=h, in_chans=c)
    meta.meta_kind = "trained"
    meta.meta_width = width
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Trained meta stages
# ---------------------------------------------------------------------------------------------------------------
def _to_width(d_in: int, d_out: int) -> nn.Module:
    """A linear map between widths, or Identity when they already agree."""
    return nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)


class MetaEmbedStage(Stage):
    """Stage 0: patch embedding, prefix tokens, position embedding, one block; image -> ``[B, T, D]``."""

    def __init__(self, in_chans: int, height: int, width_px: int, patch: int, prefix: int, width: int, dim: int,
                 block: nn.Module) -> None:
        super().__init__()
        self.interface = StageInterface("image->tokens", None, dim)
        self.patch_embed = nn.Conv2d(in_chans, width, kernel_size=patch, stride=patch)
        self.prefix_tokens = nn.Parameter(torch.zeros(1, prefix, width)) if prefix else None
        num_tokens = prefix + (height // patch) * (width_px // patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        self.block = block
        self.proj_out = _to_width(width, dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.prefix_tokens is not None:
            nn.init.trunc_normal_(self.prefix_tokens, std=1e-6)  # timm's class-token init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        if self.prefix_tokens is not None:
            x = torch.cat([self.prefix_tokens.expand(x.shape[0], -1, -1), x], dim=1)
        return self.proj_out(self.block(x + self.pos_embed))


class MetaBlockStage(Stage):
    """A middle stage: D -> width, one block, width -> D. Works for any token count."""

    def __init__(self, width: int, dim: int, block: nn.Module) -> None:
        super().__init__()
        self.interface = StageInterface("tokens->tokens", dim, dim)
        self.proj_in = _to_width(dim, width)
        self.block = block
        self.proj_out = _to_width(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.block(self.proj_in(x)))


class MetaHeadStage(Stage):
    """Last stage: D -> width, one block, final norm, class-token (or mean) pooling, linear head."""

    def __init__(self, width: int, dim: int, num_classes: int, prefix: int, block: nn.Module) -> None:
        super().__init__()
        self.interface = StageInterface("tokens->logits", dim, None)
        self.proj_in = _to_width(dim, width)
        self.block = block
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)
        self.pool = "token" if prefix else "avg"
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.block(self.proj_in(x)))
        return self.head(x[:, 0] if self.pool == "token" else x.mean(dim=1))


# ---------------------------------------------------------------------------------------------------------------
# Trained meta stages for feature-map boundaries
# ---------------------------------------------------------------------------------------------------------------
class MetaMapStage(Stage):
    """``enter -> block -> leave``: ``enter`` takes the stage's input (the image, or the previous boundary) to the
    next boundary's channels and spatial size as a channels-first map, ``block`` is one timm ConvNeXt block there,
    and ``leave`` lays it out as the boundary is (channels-last, tokens) or, in the last stage, pools and
    classifies."""

    def __init__(self, enter: nn.Module, channels: int, leave: nn.Module, interface: StageInterface) -> None:
        super().__init__()
        from timm.models.convnext import ConvNeXtBlock

        self.interface = interface
        self.enter = enter
        self.block = ConvNeXtBlock(channels, ls_init_value=None)  # no LayerScale, as the token meta's blocks
        self.leave = leave

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leave(self.block(self.enter(x)))


class _PoolHead(nn.Module):
    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.head = nn.Linear(channels, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x.mean(dim=(2, 3))))


def _map_meta(partition: Partition, in_chans: int, height: int, width_px: int, num_classes: int) -> StagedModel:
    from monomod.passes.stitch import layout, stitch_layer

    shapes = []
    for spec in partition.modules[:-1]:
        shape = spec.outputs[0].shape if len(spec.outputs) == 1 else None
        lay = layout(shape[1:]) if shape and shape[0] == "B" else None
        if lay is None or lay.grid is None:
            names = ", ".join(v.describe() for v in spec.outputs)
            raise MonomodError(f"the trained meta model needs token or feature-map boundaries, but module "
                               f"{spec.index} outputs {names}", "use the teacher as meta instead (kind='teacher')")
        shapes.append((tuple(int(d) for d in shape[1:]), (lay.channels, *lay.grid)))
    k = partition.k
    stages: list[Stage] = []
    for i in range(k):
        (c_out, h_out, w_out) = shapes[i][1] if i < k - 1 else shapes[i - 1][1]
        source = (in_chans, height, width_px) if i == 0 else shapes[i - 1][1]
        enter = _transition(source, (c_out, h_out, w_out))
        if i == 0:
            enter = nn.Sequential(enter, _LayerNorm2d(c_out))
        elif i == k - 1:
            enter = stitch_layer(shapes[i - 1][0], source)  # the boundary as a channels-first map, no parameters
        elif shapes[i - 1][0] != source:
            enter = nn.Sequential(stitch_layer(shapes[i - 1][0], source), enter)
        leave = _PoolHead(c_out, num_classes) if i == k - 1 else stitch_layer((c_out, h_out, w_out), shapes[i][0])
        kind = "image->tokens" if i == 0 else "tokens->logits" if i == k - 1 else "tokens->tokens"
        width_of = lambda j: shapes[j][0][-1] if len(shapes[j][0]) == 2 else None  # noqa: E731
        interface = StageInterface(kind, None if i == 0 else width_of(i - 1), None if i == k - 1 else width_of(i))
        stages.append(MetaMapStage(enter, c_out, leave, interface))
    meta = StagedModel(stages, num_classes=num_classes, img_size=height, in_chans=in_chans)
    meta.meta_kind = "trained"
    meta.meta_width = None
    return meta


def _transition(src: tuple[int, int, int], dst: tuple[int, int, int]) -> nn.Module:
    """Channels-first map ``src`` (C, H, W) to ``dst``: a strided conv where the size shrinks by a whole factor
    (a patchify stem for the image), else a 1x1 conv with resampling (a stitch layer)."""
    from monomod.passes.stitch import stitch_layer

    (c_in, h_in, w_in), (c_out, h_out, w_out) = src, dst
    if h_in % h_out == 0 and w_in % w_out == 0 and h_in // h_out == w_in // w_out and src != dst:
        r = h_in // h_out
        return nn.Conv2d(c_in, c_out, kernel_size=r, stride=r)
    return stitch_layer(src, dst)


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------------
# Teacher as meta
# ---------------------------------------------------------------------------------------------------------------
def _teacher_meta(partition: Partition, in_chans: int, img_size: int) -> StagedModel:
    for spec in partition.modules:
        if len(spec.outputs) != 1 or (spec.outputs[0].shape is None):
            names = ", ".join(v.describe() for v in spec.outputs)
            raise MonomodError(
                f"teacher-as-meta needs one tensor on every boundary, but module {spec.index} outputs {names}",
                "partition at other cut points (--cuts) so each boundary is a single tensor",
            )
    stages = extracted_stages(partition)
    out = partition.modules[-1].outputs[0].shape
    num_classes = int(out[-1]) if out and isinstance(out[-1], int) else 0
    meta = StagedModel(stages, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    meta.meta_kind = "teacher"
    meta.meta_width = None
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Reading the teacher's layout from the partition
# ---------------------------------------------------------------------------------------------------------------
def _image_shape(partition: Partition) -> tuple[int, int, int]:
    shape = partition.traced.input_shape
    if len(shape) != 4:
        raise MonomodError(f"the teacher takes an input of shape {tuple(shape)}, not an image [B, C, H, W]")
    return int(shape[1]), int(shape[2]), int(shape[3])


def _token_boundary(partition: Partition) -> tuple[int, int]:
    """(T, D) shared by every cut; MonomodError if any cut is not one ``[B, T, D]`` tensor of that shape."""
    seen: set[tuple[int, int]] = set()
    for spec in partition.modules[:-1]:
        outs = spec.outputs
        shape = outs[0].shape if len(outs) == 1 else None
        if shape is None or len(shape) != 3 or shape[0] != "B":
            names = ", ".join(v.describe() for v in outs)
            raise MonomodError(
                f"the trained meta model needs token boundaries [B, T, D], but module {spec.index} outputs {names}",
                "use the teacher as meta instead (kind='teacher')",
            )
        seen.add((int(shape[1]), int(shape[2])))
    if len(seen) > 1:
        raise MonomodError(
            f"the trained meta model needs one token shape on every cut, got {sorted(seen)} (T, D)",
            "use the teacher as meta instead (kind='teacher')",
        )
    return seen.pop()


def _has_maps(partition: Partition) -> bool:
    """Whether some cut is one feature map ``[B, C, H, W]`` or ``[B, H, W, C]`` (a CNN or a hierarchical model):
    then the meta stages follow the maps; else (a ViT) the token meta model serves it."""
    return any(len(cut) == 1 and cut[0].shape is not None and len(cut[0].shape) == 4 for cut in partition.cuts)


def _num_classes(partition: Partition) -> int:
    outs = partition.modules[-1].outputs
    shape = outs[0].shape if len(outs) == 1 else None
    if shape is None or len(shape) != 2 or shape[0] != "B":
        names = ", ".join(v.describe() for v in outs)
        raise MonomodError(f"the teacher's output is {names}, not logits [B, classes]",
                           "use the teacher as meta instead (kind='teacher')")
    return int(shape[1])


def _timm_layout(model: nn.Module) -> tuple[int, int] | None:
    """(patch size, prefix tokens) of a timm ViT teacher, used to break ties; None for anything else."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    if isinstance(patch, (tuple, list)) and len(set(patch)) == 1:
        patch = patch[0]
    return (patch, prefix) if isinstance(patch, int) and isinstance(prefix, int) else None


def _token_layout(tokens: int, height: int, width: int, hint: tuple[int, int] | None = None) -> tuple[int, int]:
    """(patch size, prefix tokens) with ``prefix + (H/p)(W/p) == T``.

    Several layouts can fit (T=5 at 32 px: patch 16 + 1 class token, or patch 32 + 4 registers); the teacher's
    own layout wins when it fits, else the one with the fewest prefix tokens (the most patches).
    """
    fits = [
        (p, tokens - (height // p) * (width // p))
        for p in range(1, math.gcd(height, width) + 1)
        if height % p == 0 and width % p == 0 and 0 <= tokens - (height // p) * (width // p) <= MAX_PREFIX_TOKENS
    ]
    if hint in fits:
        return hint
    if not fits:
        raise MonomodError(
            f"cannot lay out {tokens} tokens as prefix tokens plus square patches of a {height}x{width} image",
            "use the teacher as meta instead (kind='teacher')",
        )
    return min(fits, key=lambda f: f[1])


def _default_heads(width: int) -> int:
    """width // 64 heads (64-wide heads, as ViTs use), lowered to a divisor of width."""
    return next(h for h in range(max(1, width // 64), 0, -1) if width % h == 0)


__all__ = ["MetaBlockStage", "MetaEmbedStage", "MetaHeadStage", "MetaMapStage", "build_meta"]
