"""Stitch pass: wrap a student stage so its token widths match the meta model's (METHOD.md, step 5).

``Stitched`` runs ``pre -> stage -> post``. ``pre`` maps the meta width to the stage's input width and ``post``
maps the stage's output width back to the meta width; either is ``nn.Identity`` where the widths already agree,
where the stage takes images (no pre) or where it produces logits (no post). Keeping them as separate attributes
lets assembly drop them (``stitched.stage``) or keep them as adapters.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from monomod.errors import MonomodError
from monomod.students.base import Stage, StageInterface

StitchKind = Literal["linear", "ln_linear"]
STITCH_KINDS: tuple[str, ...] = ("linear", "ln_linear")


class Stitched(Stage):
    """A student stage between two stitch layers; its ``interface`` carries the meta widths."""

    def __init__(self, pre: nn.Module, stage: Stage, post: nn.Module, interface: StageInterface) -> None:
        super().__init__()
        self.pre = pre
        self.stage = stage
        self.post = post
        self.interface = interface

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.stage(self.pre(x)))


def stitch(stage: Stage, meta_width_in: int | None, meta_width_out: int | None,
           kind: StitchKind = "linear") -> Stitched:
    """Wrap ``stage`` (which has an ``interface``) with stitch layers to and from the meta widths.

    ``kind="linear"`` is a plain Linear (NAC reference), ``"ln_linear"`` LayerNorm + Linear (V-MoE reference).
    The meta width on the image side of an ``image->tokens`` stage and on the logits side of a
    ``tokens->logits`` stage is ignored (pass None).
    """
    if kind not in STITCH_KINDS:
        raise MonomodError(f"unknown stitch kind {kind!r}", f"choose one of {', '.join(STITCH_KINDS)}")
    interface = getattr(stage, "interface", None)
    if not isinstance(interface, StageInterface):
        raise MonomodError(f"{type(stage).__name__} has no StageInterface", "stitch stages of a StagedModel")
    takes_tokens = interface.kind != "image->tokens"
    gives_tokens = interface.kind != "tokens->logits"
    pre = _layer(meta_width_in, interface.width_in, kind, "input") if takes_tokens else nn.Identity()
    post = _layer(interface.width_out, meta_width_out, kind, "output") if gives_tokens else nn.Identity()
    meta_interface = StageInterface(
        interface.kind, meta_width_in if takes_tokens else None, meta_width_out if gives_tokens else None
    )
    return Stitched(pre, stage, post, meta_interface)


def _layer(width_in: int | None, width_out: int | None, kind: str, side: str) -> nn.Module:
    if width_in is None or width_out is None:
        raise MonomodError(
            f"cannot stitch the stage {side}: the meta or stage boundary there is not a [B, T, D] token tensor",
            "stitch only between token boundaries",
        )
    if width_in == width_out:
        return nn.Identity()
    linear = nn.Linear(width_in, width_out)  # torch's default init, as both reference codes use
    return linear if kind == "linear" else nn.Sequential(nn.LayerNorm(width_in, eps=1e-6), linear)


__all__ = ["STITCH_KINDS", "Stitched", "stitch"]
