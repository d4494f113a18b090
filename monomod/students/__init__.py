"""Student families behind one entry point, ``build_student(kind, ...)``: the built-in families (nac, moe, vit),
and any student a user brings (a timm model name, or ``pkg.module:factory``; see ``monomod.students.custom``).

The families are imported lazily so that ``import monomod`` (and every CLI start) stays free of timm.
"""
from __future__ import annotations

import inspect
from typing import Any

from monomod.errors import MonomodError
from monomod.students.base import Stage, StagedModel, StageInterface

STUDENT_KINDS: tuple[str, ...] = ("nac", "moe", "vit")
# Raised when a family's computation or initialisation changes: the student jobs of a plan hash it, so finished
# (or --reuse'd) student jobs made by the old code run again while the teacher side is kept.
STUDENT_REVISIONS: dict[str, int] = {"nac": 2, "moe": 1, "vit": 1}


def student_revision(kind: str) -> int:
    """The revision of a built-in family (0 for a student the user brings: its code is theirs)."""
    return STUDENT_REVISIONS.get(kind, 0)

MAX_STAGES = 256  # a student of more stages is no modular model (the paper's have 4 to 10)


def build_student(kind: str, *, modules: int, num_classes: int, img_size: int, in_chans: int = 3,
                  preset: str | None = None, **overrides: Any) -> StagedModel:
    """Build a K-stage student of family ``kind`` (one of ``STUDENT_KINDS``), a timm model name or
    ``pkg.module:factory`` (cut into K stages unless it builds a StagedModel; ``preset`` does not apply).

    ``preset=None`` takes the family's CPU-sized preset; ``overrides`` are the family's config fields. Invalid
    input (unknown kind or preset, K too small for the family, bad override) raises MonomodError, so the CLI
    reports it as one line.
    """
    if isinstance(modules, int) and modules > MAX_STAGES:  # 100000 NAC stages hung before the family said no
        raise MonomodError(f"--modules {modules} is more stages than a student can have ({MAX_STAGES} at most)",
                           f"pass --modules {MAX_STAGES} or fewer")
    if kind == "nac":
        from monomod.students.nac import build_nac as build
    elif kind == "moe":
        from monomod.students.moe import build_moe as build
    elif kind == "vit":
        from monomod.students.vit import build_vit as build
    elif isinstance(kind, str) and (":" in kind or _is_timm(kind)):
        from monomod.students.custom import build_custom

        model = build_custom(kind, modules=modules, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                             **overrides)
        model.preset = preset  # plain attribute, for reports
        return model
    else:
        raise MonomodError(f"unknown student kind {kind!r}",
                           f"choose one of {', '.join(STUDENT_KINDS)}, a timm model name or pkg.module:factory")
    if preset is None:
        preset = inspect.signature(build).parameters["preset"].default  # the family's own default, not a copy
    try:
        model = build(modules=modules, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                      preset=preset, **overrides)
    except ValueError as e:  # the families validate with ValueError; to the user it is one fixable line
        raise MonomodError(str(e), "change the value it names (--img-size, --modules, --preset or an override)") from None
    model.preset = preset  # plain attribute, for reports
    return model


def build_on_meta(kind: str, **kwargs: Any) -> StagedModel:
    """``build_student`` on the meta device: shapes and parameter counts without memory, so a student too large
    to build (a 100000-pixel input, a huge width) is measured and refused instead of allocated. A NAC computes its
    cell signatures at init on the CPU (from the config alone, small), so they are computed first and cached."""
    import torch

    if kind == "nac" and kwargs.get("preset") not in _simple_nac_presets():
        from monomod.students.nac import cell_signatures, nac_config

        overrides = {k: v for k, v in kwargs.items() if k not in ("modules", "num_classes", "img_size", "in_chans",
                                                                  "preset")}
        try:
            cell_signatures(nac_config(kwargs.get("preset") or "small", **overrides))
        except (TypeError, ValueError) as e:
            raise MonomodError(f"the nac student cannot be built ({e})", "fix the student_overrides") from None
    with torch.device("meta"):
        return build_student(kind, **kwargs)


def _simple_nac_presets() -> tuple[str, ...]:
    from monomod.students.nac import SIMPLE_PRESETS

    return tuple(SIMPLE_PRESETS)


def _is_timm(name: str) -> bool:
    from monomod.students.custom import is_timm_model

    return is_timm_model(name)


__all__ = ["MAX_STAGES", "STUDENT_KINDS", "STUDENT_REVISIONS", "Stage", "StageInterface", "StagedModel",
           "build_on_meta", "build_student", "student_revision"]
