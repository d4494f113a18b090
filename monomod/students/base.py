"""The contract every student (and meta model) stage honours.

A staged model is a plain ``nn.Module`` whose ``forward`` is exactly the chain of its ``stages``. Each stage
declares what it consumes and produces, so that the compiler can splice a stage between layers of a meta model or
teacher and insert stitch layers only where token widths differ.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, TypeVar

import torch
from torch import nn

StageKind = Literal["image->tokens", "tokens->tokens", "tokens->logits"]


@dataclass(frozen=True)
class StageInterface:
    """What a stage consumes and produces. Widths are token widths (the last dim of ``[B, T, D]``)."""

    kind: StageKind
    width_in: int | None  # None when the stage takes images
    width_out: int | None  # None when the stage produces logits

    def to_json(self) -> dict:
        return {"kind": self.kind, "width_in": self.width_in, "width_out": self.width_out}


class Stage(nn.Module):
    """Base class for one stage; subclasses set ``self.interface`` in ``__init__``."""

    interface: StageInterface
    distilling: bool = False  # set through distillation_mode, never inferred from the input

    def distillation_mode(self, on: bool = True) -> Stage:
        """Switch this stage (and any stage it wraps) to the form it takes while distilled alone in m2mKD.

        A family reads ``self.distilling`` where its reference simplifies the modules for m2mKD (NAC: dense
        attention and one fixed shared code); families without such a form ignore it. Returns ``self``.
        """
        for module in self.modules():
            if isinstance(module, Stage):
                module.distilling = on
        return self

    def aux_loss(self) -> torch.Tensor | None:
        """Auxiliary loss of the last forward (e.g. MoE load balancing); None when the stage has none."""
        losses = [m.last_aux_loss for m in self.modules() if getattr(m, "last_aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None


class ModuleStage(Stage):
    """A module the compiler extracted (a teacher module, a piece of a student it cut) as a Stage; its parameters
    stay the source model's own."""

    def __init__(self, module: nn.Module, interface: StageInterface) -> None:
        super().__init__()
        self.module = module
        self.interface = interface

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def extracted_stages(partition: Any) -> list[Stage]:
    """The K modules of a partition (``monomod.passes.extract``) as ModuleStages, their interfaces read from the
    boundaries (every boundary must be a single tensor: the callers check it, with their own advice)."""
    from monomod.passes.extract import extract

    k = partition.k
    stages: list[Stage] = []
    for i, module in enumerate(extract(partition)):
        width_in = None if i == 0 else partition.modules[i - 1].outputs[0].token_width
        width_out = None if i == k - 1 else partition.modules[i].outputs[0].token_width
        kind = "image->tokens" if i == 0 else "tokens->logits" if i == k - 1 else "tokens->tokens"
        stages.append(ModuleStage(module, StageInterface(kind, width_in, width_out)))
    return stages


class StagedModel(nn.Module):
    """A model that is the exact composition of its ``stages``."""

    def __init__(self, stages: list[Stage], *, num_classes: int, img_size: int, in_chans: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.num_classes = num_classes
        self.img_size = img_size
        self.in_chans = in_chans

    @property
    def interfaces(self) -> list[StageInterface]:
        return [s.interface for s in self.stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the stages' auxiliary losses from the last forward, or None."""
        losses = [loss for s in self.stages if (loss := s.aux_loss()) is not None]
        return torch.stack(losses).sum() if losses else None


Config = TypeVar("Config")


MAX_DEPTH = 1024  # blocks of a ViT-shaped student; 100000 took minutes to build even on the meta device


def check_vit_geometry(img_size: int, patch_size: Any, depth: Any) -> None:
    """A ViT-shaped student takes only images its patches tile (``img_size=7`` with patch 4 would silently drop
    pixels: timm floors the grid), and a depth it can be built with in reasonable time; else ValueError."""
    patch = patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size
    if isinstance(patch, int) and patch > 0 and img_size % patch:
        raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch}")
    if isinstance(depth, int) and depth > MAX_DEPTH:
        raise ValueError(f"depth={depth} is more blocks than a student can have ({MAX_DEPTH} at most)")


def preset_config(presets: Mapping[str, Config], preset: str, overrides: Mapping[str, Any], *, family: str,
                  also: tuple[str, ...] = ()) -> Config:
    """A student family's preset config with ``overrides`` (any field of its config dataclass) applied and
    validated; ``also`` names presets that another builder of the family serves (for the error message)."""
    if preset not in presets:
        raise ValueError(f"unknown {family} preset {preset!r}; allowed: {sorted([*presets, *also])}")
    base = presets[preset]
    allowed = {f.name for f in dataclasses.fields(base)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown {type(base).__name__} field(s) {unknown}; allowed: {sorted(allowed)}")
    cfg = dataclasses.replace(base, **overrides)  # type: ignore[type-var]
    cfg.validate()
    return cfg
