"""Student families behind one entry point, ``build_student(kind, ...)``: the built-in families (nac, moe, vit),
and any student a user brings (a timm model name, or ``pkg.module:factory``; see ``monomod.students.custom``).

The families are imported lazily so that ``import monomod`` (and every CLI start) stays free of timm.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from monomod.errors import MonomodError
from monomod.students.base import Stage, StagedModel, StageInterface

@dataclass(frozen=True)
class StudentFamily:
    """One student family, in the one table of them (``FAMILIES``): what builds it, its presets, how its m2mKD
    stages are stitched to the teacher by default, its revision, and what it asks of the plan. Builders and
    presets are named ``module:attribute`` and imported when used, so that ``import monomod`` stays free of timm."""

    name: str
    builder: str  # "module:function" taking (modules, num_classes, img_size, in_chans, preset, **overrides)
    presets: str | None  # "module:ATTRIBUTE", a mapping preset name -> config (None: no presets)
    stitch: str = "linear"  # the stitch layers as the family's reference uses them
    # The boundary loss's weight where the user gives none: on for the families whose stages run in m2mKD as they
    # run assembled, off for the NAC, whose m2mKD form differs from its assembled one (README, "The boundary loss").
    boundary_loss: float = 0.0
    # Raised when the family's computation or initialisation changes: the student jobs of a plan hash it, so finished
    # (or --reuse'd) student jobs made by the old code run again while the teacher side is kept.
    revision: int = 0
    min_modules: int = 2
    takes_patch_size: bool = False  # a ViT-like student takes the teacher's patch size (token grids line up)

    def build(self) -> Any:
        return _attribute(self.builder)

    def preset_names(self) -> tuple[str, ...]:
        return tuple(sorted(_attribute(self.presets))) if self.presets else ()


def _attribute(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, StudentFamily] = {
    "nac": StudentFamily("nac", "monomod.students.nac:build_nac", "monomod.students.nac:NAC_PRESETS", "linear",
                         revision=2, min_modules=3),
    "moe": StudentFamily("moe", "monomod.students.moe:build_moe", "monomod.students.moe:MOE_PRESETS", "ln_linear",
                         revision=1, takes_patch_size=True, boundary_loss=10.0),
    "vit": StudentFamily("vit", "monomod.students.vit:build_vit", "monomod.students.vit:VIT_PRESETS", "linear",
                         revision=1, takes_patch_size=True, boundary_loss=10.0),
}
# A student the user brings (a timm model name, pkg.module:factory): plain linear stitches, its own code's revision.
BROUGHT = StudentFamily("brought", "monomod.students.custom:build_custom", None)
STUDENT_KINDS: tuple[str, ...] = tuple(FAMILIES)
STITCHES: tuple[str, ...] = tuple(sorted({family.stitch for family in FAMILIES.values()}))


def student_family(kind: str) -> StudentFamily:
    """The family of ``kind``: a built-in one, or ``BROUGHT`` for a student the user brings."""
    return FAMILIES.get(kind, BROUGHT) if isinstance(kind, str) else BROUGHT


def student_revision(kind: str) -> int:
    """The revision of a built-in family (0 for a student the user brings: its code is theirs)."""
    return student_family(kind).revision

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
    if kind in FAMILIES:
        build = FAMILIES[kind].build()
    elif isinstance(kind, str) and (":" in kind or _is_timm(kind)):
        model = BROUGHT.build()(kind, modules=modules, num_classes=num_classes, img_size=img_size,
                                in_chans=in_chans, **overrides)
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


__all__ = ["BROUGHT", "FAMILIES", "MAX_STAGES", "STITCHES", "STUDENT_KINDS", "Stage", "StudentFamily", "StageInterface", "StagedModel",
           "build_on_meta", "build_student", "student_family", "student_revision"]
