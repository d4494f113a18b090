"""RandAugment on the device, a batch at a time: timm's ``rand-m9-mstd0.5-inc1`` (any ``rand-...`` string timm
parses) with its ops, magnitudes and probabilities, drawn per sample from ``(seed, index)``.

timm parses the policy (``rand_augment_transform``: the ops, their probability, magnitude, magnitude noise and
cap, the number of layers); this module draws each sample's choices from counter-based uniforms and applies each op
to the samples that drew it, as one batched call: up to 15 calls per layer, not two per image. Every op follows
the Pillow op timm calls (the same level formulas, fill colour and Pillow's blend and smoothing), on uint8 images.
One difference: the geometric ops resample bilinearly, where timm picks bilinear or bicubic at random.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from monomod.errors import MonomodError

_LEVEL_DENOM = 10.0  # timm's magnitude scale
_DRAWS = 5  # per layer: op, whether it applies, two for the magnitude noise (Box-Muller), the sign


@dataclass(frozen=True)
class RandAugmentSpec:
    """What timm parsed from the policy string: op names, their shared probability, magnitude, noise and cap."""

    ops: tuple[str, ...]
    layers: int
    prob: float
    magnitude: float
    magnitude_std: float
    magnitude_max: float
    translate_pct: float = 0.45

    @property
    def draws(self) -> int:
        return _DRAWS * self.layers


def parse_rand_augment(policy: str, magnitude_cap: float) -> RandAugmentSpec:
    """timm's reading of ``policy`` (``rand-m9-mstd0.5-inc1``), refused by name when it holds an op without a
    device form, or is not RandAugment (AutoAugment, AugMix)."""
    from timm.data.auto_augment import rand_augment_transform

    if not policy.startswith("rand"):
        raise MonomodError(f"the device input path has RandAugment only, not {policy!r}", "use --input-path cpu")
    ra = rand_augment_transform(policy, {"translate_const": 100, "img_mean": (128, 128, 128)})
    names = tuple(op.name for op in ra.ops)
    unknown = [n for n in names if n not in OPS]
    if unknown or ra.choice_weights is not None:
        raise MonomodError(f"the device input path has no form of {', '.join(unknown) or 'weighted op choice'}",
                           "use --input-path cpu")
    first = ra.ops[0]
    cap = min(first.magnitude_max or _LEVEL_DENOM, magnitude_cap)
    return RandAugmentSpec(names, ra.num_layers, first.prob, first.magnitude, first.magnitude_std, cap)


def rand_augment_batch(x: Tensor, u: Tensor, spec: RandAugmentSpec, fill: Tensor) -> Tensor:
    """uint8 ``[B, C, H, W]`` -> the same, each sample augmented by its uniforms ``u[:, :spec.draws]``; ``fill``
    (``[C]``, 0-255) paints where the geometric ops uncover the image."""
    for layer in range(spec.layers):
        v = u[:, _DRAWS * layer:_DRAWS * (layer + 1)].to(x.device)
        choice = (v[:, 0] * len(spec.ops)).long().clamp_(max=len(spec.ops) - 1)
        applied = v[:, 1] < spec.prob
        noise = torch.sqrt(-2 * torch.log1p(-v[:, 2])) * torch.cos(2 * math.pi * v[:, 3])  # standard normal
        magnitude = (spec.magnitude + spec.magnitude_std * noise).clamp(0.0, spec.magnitude_max)
        sign = torch.where(v[:, 4] < 0.5, -1.0, 1.0)
        for k, name in enumerate(spec.ops):
            rows = torch.nonzero(applied & (choice == k)).flatten()
            if len(rows):
                level = _level(name, magnitude[rows], sign[rows], spec)
                x[rows] = OPS[name](x[rows], level, fill)
    return x


def _level(name: str, m: Tensor, sign: Tensor, spec: RandAugmentSpec) -> Tensor:
    """timm's ``LEVEL_TO_ARG`` for ``name``, per sample (its ``_randomly_negate`` draws the sign)."""
    t = m / _LEVEL_DENOM
    if name == "Rotate":
        return sign * t * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * t * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * t * spec.translate_pct
    if name == "PosterizeIncreasing":
        return 4 - (t * 4).floor()
    if name == "SolarizeIncreasing":
        return 256 - (t * 256).floor()
    if name == "SolarizeAdd":
        return (t * 110).floor().clamp(max=128)
    if name.endswith("Increasing"):  # Color, Contrast, Brightness, Sharpness
        return (1.0 + sign * t * 0.9).clamp(min=0.1)
    return t  # AutoContrast, Equalize, Invert: no level


# ------------------------------------------------------------------------------------------------------ the ops


def _to_uint8(x: Tensor) -> Tensor:
    """Pillow's float-to-pixel step in its blends and look-up tables: clipped, then truncated."""
    return x.clamp_(0, 255).floor_().to(torch.uint8)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """Pillow's ``Image.blend(degenerate, image, factor)``, as ``ImageEnhance`` uses it."""
    d = degenerate.float()
    return _to_uint8(d + factor.view(-1, 1, 1, 1) * (x.float() - d))


def _luma(x: Tensor) -> Tensor:
    """Pillow's ``convert("L")``: ITU-R 601-2 luma, rounded; a one-channel image is its own."""
    if x.shape[1] == 1:
        return x.float()
    r, g, b = x.float().unbind(1)
    return (r * 0.299 + g * 0.587 + b * 0.114).round_().unsqueeze(1)


def _affine(x: Tensor, theta: Tensor, fill: Tensor) -> Tensor:
    """Each image resampled (bilinear) at ``theta`` (output -> input, normalised coordinates); ``fill`` outside."""
    b, c, h, w = x.shape
    grid = F.affine_grid(theta, [b, c + 1, h, w], align_corners=False)
    ones = torch.ones(b, 1, h, w, device=x.device)
    out = F.grid_sample(torch.cat([x.float(), ones], 1), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    inside = out[:, -1:]
    return (out[:, :-1] + (1 - inside) * fill.view(1, -1, 1, 1).float()).round_().clamp_(0, 255).to(torch.uint8)


def _theta(rows: list[list[Tensor]]) -> Tensor:
    return torch.stack([torch.stack(row, -1) for row in rows], 1)


def _rotate(x: Tensor, degrees: Tensor, fill: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    a = torch.deg2rad(degrees)
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    return _affine(x, _theta([[cos, -sin * h / w, zero], [sin * w / h, cos, zero]]), fill)


def _shear(axis: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Pillow's ``AFFINE`` with ``(1, s, 0, 0, 1, 0)`` (x) or ``(1, 0, 0, s, 1, 0)`` (y): the shear about the
    top-left corner."""
    def op(x: Tensor, s: Tensor, fill: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        one, zero = torch.ones_like(s), torch.zeros_like(s)
        if axis == 0:
            return _affine(x, _theta([[one, s * h / w, s * h / w], [zero, one, zero]]), fill)
        return _affine(x, _theta([[one, zero, zero], [s * w / h, one, s * w / h]]), fill)
    return op


def _translate(axis: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Shift by a fraction of the image's side (timm's ``translate_*_rel``)."""
    def op(x: Tensor, fraction: Tensor, fill: Tensor) -> Tensor:
        one, zero = torch.ones_like(fraction), torch.zeros_like(fraction)
        shift = 2 * fraction
        rows = [[one, zero, shift], [zero, one, zero]] if axis == 0 else [[one, zero, zero], [zero, one, shift]]
        return _affine(x, _theta(rows), fill)
    return op


def _auto_contrast(x: Tensor, _level: Tensor, _fill: Tensor) -> Tensor:
    lo, hi = x.amin(dim=(-2, -1), keepdim=True).float(), x.amax(dim=(-2, -1), keepdim=True).float()
    scale = 255.0 / (hi - lo).clamp(min=1)
    return torch.where(hi > lo, _to_uint8((x.float() - lo) * scale), x)


def _equalize(x: Tensor, _level: Tensor, _fill: Tensor) -> Tensor:
    from torchvision.transforms.v2.functional import equalize

    return equalize(x)


def _posterize(x: Tensor, bits: Tensor, _fill: Tensor) -> Tensor:
    keep = torch.bitwise_left_shift(torch.full_like(bits, 255).long(), 8 - bits.long()) & 255  # the top ``bits`` bits
    return x & keep.to(torch.uint8).view(-1, 1, 1, 1)


def _solarize(x: Tensor, threshold: Tensor, _fill: Tensor) -> Tensor:
    return torch.where(x.float() >= threshold.view(-1, 1, 1, 1), 255 - x, x)


def _solarize_add(x: Tensor, add: Tensor, _fill: Tensor) -> Tensor:
    return torch.where(x < 128, _to_uint8(x.float() + add.view(-1, 1, 1, 1)), x)


def _color(x: Tensor, factor: Tensor, _fill: Tensor) -> Tensor:
    return _blend(_luma(x).expand_as(x), x, factor)


def _contrast(x: Tensor, factor: Tensor, _fill: Tensor) -> Tensor:
    mean = (_luma(x).mean(dim=(-3, -2, -1), keepdim=True) + 0.5).floor()  # Pillow: int(mean + 0.5)
    return _blend(mean.expand_as(x), x, factor)


def _brightness(x: Tensor, factor: Tensor, _fill: Tensor) -> Tensor:
    return _blend(torch.zeros_like(x), x, factor)


def _sharpness(x: Tensor, factor: Tensor, _fill: Tensor) -> Tensor:
    """Pillow's ``ImageFilter.SMOOTH`` (3x3, centre 5, the rest 1, over 13) inside, the border kept, then a blend."""
    c = x.shape[1]
    kernel = torch.ones(c, 1, 3, 3, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = x.float().clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x.float(), kernel / 13.0, groups=c).round_()
    return _blend(smooth, x, factor)


OPS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": lambda x, _l, _f: 255 - x,
    "Rotate": _rotate, "ShearX": _shear(0), "ShearY": _shear(1),
    "TranslateXRel": _translate(0), "TranslateYRel": _translate(1),
    "PosterizeIncreasing": _posterize, "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _color, "ContrastIncreasing": _contrast, "BrightnessIncreasing": _brightness,
    "SharpnessIncreasing": _sharpness,
}
