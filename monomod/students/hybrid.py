"""The m2mKD hybrid network ``meta[0:i] -> stage -> meta[i+1:]`` (METHOD.md, step 3).

The same helper builds both halves of a pair: with a (stitched) student stage it is the student hybrid, with
teacher module i the teacher hybrid. The meta model is the fixed context: its parameters are frozen, its prefix
runs without autograd (nothing upstream of the stage needs gradients), and its suffix runs with autograd so the
loss on the logits reaches the stage through it. Only the stage's own parameters are ever updated.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from monomod.errors import MonomodError


class Hybrid(nn.Module):
    """``prefix -> stage -> suffix``, with the meta prefix and suffix frozen and kept in eval mode."""

    def __init__(self, prefix: Sequence[nn.Module], stage: nn.Module, suffix: Sequence[nn.Module]) -> None:
        super().__init__()
        self.prefix = nn.ModuleList(prefix)
        self.stage = stage
        self.suffix = nn.ModuleList(suffix)
        for p in self.meta_parameters():
            p.requires_grad_(False)
        self.prefix.eval()
        self.suffix.eval()
        self.training = stage.training

    def meta_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.prefix.parameters()
        yield from self.suffix.parameters()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimiser of this pair gets: the stage and its stitch layers."""
        return (p for p in self.stage.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> Hybrid:
        """Only the stage follows ``mode``: the frozen meta stays in eval (no dropout, no statistics updates)."""
        self.training = mode
        self.stage.train(mode)
        self.prefix.eval()
        self.suffix.eval()
        return self

    def run_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The meta model up to the stage, without autograd: the stage's input (shared by a pair's two hybrids)."""
        with torch.no_grad():
            for module in self.prefix:
                x = module(x)
        return x

    def run_suffix(self, x: torch.Tensor) -> torch.Tensor:
        """The meta model after the stage, with autograd, so a loss on the logits reaches the stage."""
        for module in self.suffix:
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_suffix(self.stage(self.run_prefix(x)))


def hybrid(meta_stages: Sequence[nn.Module] | nn.Module, i: int, stage: nn.Module) -> Hybrid:
    """``meta[0:i] -> stage -> meta[i+1:]`` for a meta model (a StagedModel or its list of stages).

    Freezes the meta parameters in place (``requires_grad=False``): the meta model is a fixed context shared by
    all K hybrids. When both ``stage`` and meta stage i declare an interface, their token widths must agree;
    wrap a student stage with ``stitch`` first when they do not.
    """
    stages = list(getattr(meta_stages, "stages", meta_stages))
    if not 0 <= i < len(stages):
        raise MonomodError(f"stage index {i} is out of range for a meta model of {len(stages)} stages")
    want, have = getattr(stages[i], "interface", None), getattr(stage, "interface", None)
    if want is not None and have is not None:
        if want.kind != have.kind:
            raise MonomodError(f"meta stage {i} is {want.kind} but the stage is {have.kind}")
        for side, a, b in (("input", want.width_in, have.width_in), ("output", want.width_out, have.width_out)):
            if a is not None and b is not None and a != b:
                raise MonomodError(
                    f"the meta model has width {a} at stage {i}'s {side} but the stage has width {b}",
                    "wrap the stage with monomod.stitch(stage, meta_width_in, meta_width_out) first",
                )
    return Hybrid(stages[:i], stage, stages[i + 1:])


__all__ = ["Hybrid", "hybrid"]
