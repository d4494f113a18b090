"""Student families behind one entry point, ``build_student(kind, ...)``.

The families are imported lazily so that ``import monomod`` (and every CLI start) stays free of timm.
"""
from __future__ import annotations

import inspect
from typing import Any

from monomod.errors import MonomodError
from monomod.students.base import Stage, StagedModel, StageInterface

STUDENT_KINDS: tuple[str, ...] = ("nac", "moe", "vit")


def build_student(kind: str, *, modules: int, num_classes: int, img_size: int, in_chans: int = 3,
                  preset: str | None = None, **overrides: Any) -> StagedModel:
    """Build a K-stage student of family ``kind`` (one of ``STUDENT_KINDS``).

    ``preset=None`` takes the family's CPU-sized preset; ``overrides`` are the family's config fields. Invalid
    input (unknown kind or preset, K too small for the family, bad override) raises MonomodError, so the CLI
    reports it as one line.
    """
    if kind == "nac":
        from monomod.students.nac import build_nac as build
    elif kind == "moe":
        from monomod.students.moe import build_moe as build
    elif kind == "vit":
        from monomod.students.vit import build_vit as build
    else:
        raise MonomodError(f"unknown student kind {kind!r}", f"choose one of {', '.join(STUDENT_KINDS)}")
    if preset is None:
        preset = inspect.signature(build).parameters["preset"].default  # the family's own default, not a copy
    try:
        model = build(modules=modules, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                      preset=preset, **overrides)
    except ValueError as e:  # the families validate with ValueError; to the user it is one fixable line
        raise MonomodError(str(e)) from None
    model.preset = preset  # plain attribute, for reports
    return model


__all__ = ["STUDENT_KINDS", "Stage", "StageInterface", "StagedModel", "build_student"]
