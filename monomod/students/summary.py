"""Per-stage parameters and FLOPs of a StagedModel, counted the way ``monomod inspect`` counts the teacher.

FLOPs come from the trace pass where fx can trace a stage, so student and teacher numbers share one convention.
Stages fx cannot handle (NAC's propagator switches mode on the token count) are measured with torch's
FlopCounterMode instead, which counts only matmul-like ops and so reads a little lower; ``counted_by`` says which.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from monomod.errors import MonomodError
from monomod.students.base import StagedModel


@dataclass(frozen=True)
class StageCost:
    index: int
    interface: str
    width_in: int | None
    width_out: int | None
    params: int
    flops: int  # per sample
    counted_by: str  # "trace" or "flop_counter"

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "counted_by"}


def stage_costs(model: StagedModel) -> list[StageCost]:
    """Parameters and per-sample FLOPs of every stage, fed the previous stage's real output on one sample.

    Leaves the model in eval mode (the trace pass sets it; counting in train mode would sample dropout and
    NAC's stochastic links).
    """
    from monomod.passes.trace import trace

    model.eval()
    x = torch.randn(1, model.in_chans, model.img_size, model.img_size)
    costs = []
    for i, stage in enumerate(model.stages):
        try:
            flops, how = trace(stage, x, name=f"stage {i}").flops, "trace"
        except MonomodError:
            flops, how = _flop_counter(stage, x), "flop_counter"
        with torch.no_grad():
            y = stage(x)
        iface = stage.interface
        params = sum(p.numel() for p in stage.parameters())
        costs.append(StageCost(i, iface.kind, iface.width_in, iface.width_out, params, flops, how))
        x = y
    return costs


def _flop_counter(stage: torch.nn.Module, x: torch.Tensor) -> int:
    # Grad mode on: FlopCounterMode's module tracker hooks autograd and fails on parameter views made under
    # no_grad (e.g. ``latents.expand(...)``). One sample, so the autograd graph is cheap.
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        stage(x)
    return counter.get_total_flops()


__all__ = ["StageCost", "stage_costs"]
