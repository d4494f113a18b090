"""Stitch pass: the layer that carries one boundary tensor into another's shape (METHOD.md, step 5).

A boundary is described by its per-sample shape, as the IR records it without the batch axis:

* ``(N, C)``: tokens, ``[B, N, C]``;
* ``(C, H, W)``: a feature map, ``[B, C, H, W]`` (CNNs);
* ``(H, W, C)``: a channels-last map, ``[B, H, W, C]`` (timm's Swin). Images here are square, so a map whose first
  two axes agree and differ from the last is read as channels-last; any other 3-axis shape as channels-first.

``stitch_layer(src, dst)`` picks the layer from the two shapes: a Linear over the channel axis between token
tensors, a 1x1 conv between maps, plus resampling where token grids or spatial sizes differ (bilinear
interpolation up, adaptive average pooling down), and reshaping where one side is a map and the other tokens. Token
sets that are no patch grid (a NAC's latents) keep their count between token boundaries, as transformer contexts
take any count; into a map they are resampled along the token axis. Anything else (a pooled vector, several
tensors) cannot be stitched: ``check_stitchable`` says so in one line naming both shapes.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monomod.errors import MonomodError

StitchKind = Literal["linear", "ln_linear"]
STITCH_KINDS: tuple[str, ...] = ("linear", "ln_linear")
MAX_GRID_PREFIX = 4  # class, distillation and a few register tokens before a patch grid; more is not a grid


class Layout(NamedTuple):
    """How a boundary's per-sample shape is laid out: ``form`` is tokens, map or map_last."""

    form: str
    channels: int
    tokens: int  # N for tokens, H*W for maps
    grid: tuple[int, int] | None  # (H, W) of the patch grid or map; None for a token set that is no grid
    prefix: int  # tokens before the grid (class, registers)


def layout(shape: Sequence[int] | None) -> Layout | None:
    """The layout of a per-sample shape, or None when it is neither tokens nor a map."""
    if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    if len(shape) == 2:
        n, c = shape
        prefix = next((p for p in range(min(n, MAX_GRID_PREFIX) + 1) if math.isqrt(n - p) ** 2 == n - p), None)
        if prefix is None or n - prefix == 0:
            return Layout("tokens", c, n, None, 0)
        side = math.isqrt(n - prefix)
        return Layout("tokens", c, n, (side, side), prefix)
    if len(shape) == 3:
        a, b, c = shape
        if a == b and b != c:
            return Layout("map_last", c, a * b, (a, b), 0)
        return Layout("map", a, b * c, (b, c), 0)
    return None


def describe(shape: Sequence[int | str] | None) -> str:
    return "multi-value" if shape is None else "B×" + "×".join(str(d) for d in shape)


def check_stitchable(src: Sequence[int] | None, dst: Sequence[int] | None) -> tuple[Layout, Layout]:
    """Both layouts, or MonomodError naming the two shapes when no stitch joins them."""
    a, b = layout(src), layout(dst)
    if a is None or b is None:
        raise MonomodError(f"cannot stitch a {describe(src)} boundary to a {describe(dst)} boundary",
                           "cut the teacher elsewhere (--cuts) or give the student stages with token [B, N, C] or "
                           "map [B, C, H, W] boundaries")
    return a, b


def stitch_layer(src: Sequence[int], dst: Sequence[int], kind: StitchKind = "linear") -> nn.Module:
    """The layer that maps a ``[B, *src]`` tensor to a ``[B, *dst]`` one (per-sample shapes, see the module doc).

    Between token tensors of one count (or token sets that are no grid) it is exactly the channel map the
    references use: ``nn.Identity``, a Linear, or (``ln_linear``) LayerNorm + Linear. Other pairs get a ``Stitch``
    (a 1x1 conv whatever ``kind``: the LayerNorm variant is the V-MoE reference's, for tokens).
    """
    if kind not in STITCH_KINDS:
        raise MonomodError(f"unknown stitch kind {kind!r}", f"choose one of {', '.join(STITCH_KINDS)}")
    a, b = check_stitchable(src, dst)
    if a.form == b.form == "tokens" and (a.tokens == b.tokens or a.grid is None or b.grid is None):
        return _channel_linear(a.channels, b.channels, kind)
    return Stitch(a, b)


def _channel_linear(c_in: int, c_out: int, kind: str) -> nn.Module:
    if c_in == c_out:
        return nn.Identity()
    linear = nn.Linear(c_in, c_out)  # torch's default init, as both reference codes use
    return linear if kind == "linear" else nn.Sequential(nn.LayerNorm(c_in, eps=1e-6), linear)


class Stitch(nn.Module):
    """Between two layouts that differ in more than width: to a channels-first map (a token grid is reshaped, a
    token set that is no grid, of whatever count, is resampled along the token axis to the target's H*W), a 1x1 conv
    over channels, spatial resampling, then into the target's layout (prefix tokens of a target grid are the mean
    of its grid tokens; the source's own prefix tokens are dropped)."""

    def __init__(self, src: Layout, dst: Layout) -> None:
        super().__init__()
        self.src, self.dst = src, dst
        grid = dst.grid if dst.grid is not None else _square(src.tokens)
        self.size = grid
        self.proj = nn.Identity() if src.channels == dst.channels else nn.Conv2d(src.channels, dst.channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._to_map(x)
        x = self.proj(x)
        if tuple(x.shape[-2:]) != tuple(self.size):
            shrink = x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]
            x = F.adaptive_avg_pool2d(x, self.size) if shrink else F.interpolate(x, size=self.size, mode="bilinear",
                                                                                   align_corners=False)
        return self._from_map(x)

    def _to_map(self, x: torch.Tensor) -> torch.Tensor:
        src = self.src
        if src.form == "map":
            return x
        if src.form == "map_last":
            return x.permute(0, 3, 1, 2)
        if src.grid is None:  # a token set, no grid (of any count): resampled along the token axis
            x = F.interpolate(x.transpose(1, 2), size=self.size[0] * self.size[1], mode="linear", align_corners=False)
            return x.reshape(x.shape[0], src.channels, *self.size)
        x = x[:, src.prefix:]
        return x.transpose(1, 2).reshape(x.shape[0], src.channels, *src.grid)

    def _from_map(self, x: torch.Tensor) -> torch.Tensor:
        dst = self.dst
        if dst.form == "map":
            return x
        if dst.form == "map_last":
            return x.permute(0, 2, 3, 1)
        tokens = x.flatten(2).transpose(1, 2)
        if dst.prefix:
            tokens = torch.cat([tokens.mean(dim=1, keepdim=True).expand(-1, dst.prefix, -1), tokens], dim=1)
        return tokens


def fuse_stitches(post: nn.Module, pre: nn.Module) -> nn.Module:
    """One layer computing ``pre(post(x))``, for a boundary kept in an assembled student ("bridged").

    Two Linears (or a Linear and an Identity) fuse into one Linear, ``W = W_pre W_post``, ``b = W_pre b_post +
    b_pre``: the same map with the meta width gone. Anything else (LayerNorm + Linear, a resampling ``Stitch``) is
    kept as the two layers in sequence, which computes the same.
    """
    if isinstance(post, nn.Identity):
        return pre
    if isinstance(pre, nn.Identity):
        return post
    if not (type(post) is nn.Linear and type(pre) is nn.Linear):
        return nn.Sequential(post, pre)
    fused = nn.Linear(post.in_features, pre.out_features, device=post.weight.device, dtype=post.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(pre.weight @ post.weight)
        b_post = post.bias if post.bias is not None else torch.zeros_like(post.weight[:, 0])
        b_pre = pre.bias if pre.bias is not None else torch.zeros_like(pre.weight[:, 0])
        fused.bias.copy_(pre.weight @ b_post + b_pre)
    return fused


def _square(n: int) -> tuple[int, int]:
    """The most nearly square (H, W) with H*W = n: where a token set that is no grid lands when it becomes tokens."""
    h = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
    return h, n // h


__all__ = ["Layout", "STITCH_KINDS", "Stitch", "check_stitchable", "describe", "fuse_stitches", "layout", "stitch_layer"]
