"""Student stages between stitch layers: ``Stitched`` runs ``pre -> stage -> post`` (METHOD.md, step 5).

``pre`` carries the meta model's boundary into the stage's input, ``post`` the stage's output back to the meta
model's boundary; either is ``nn.Identity`` where the two already agree, where the stage takes images (no pre) or
where it produces logits (no post). The layers come from ``monomod.passes.stitch`` and are chosen by the boundary
shapes. Keeping them as separate attributes lets assembly drop them (``stitched.stage``) or keep them between the
stages (``bridge``).
"""
from __future__ import annotations

import torch
from torch import nn

from monomod.errors import MonomodError
from monomod.frontend import example_input
from monomod.ir import Partition
from monomod.passes.stitch import STITCH_KINDS, StitchKind, check_stitchable, fuse_stitches, stitch_layer
from monomod.students.base import Stage, StagedModel, StageInterface

Shape = tuple[int, ...]


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


ASSEMBLY_MODES: tuple[str, ...] = ("dropped", "bridged")


def bridge(stitched: list[Stitched]) -> list[Stitched]:
    """The stages of a "bridged" assembly: stage i followed by ``pre_{i+1}(post_i(.))``, fused where both are linear.

    The assembled student then computes through the meta model's boundary space exactly as the chain of its
    hybrids' stitched stages: ``bridged(x) == post_{K-1}(S_{K-1}(pre_{K-1}(... post_0(S_0(x)))))``. Dropping the
    stitches instead hands stage i+1 what stage i wrote, which it never saw in m2mKD.
    """
    stages = []
    for i, s in enumerate(stitched):
        after = stitched[i + 1].pre if i + 1 < len(stitched) else nn.Identity()
        own = s.stage.interface
        stages.append(Stitched(s.pre if i == 0 else nn.Identity(), s.stage, fuse_stitches(s.post, after), own))
    return stages


def stitch(stage: Stage, meta_width_in: int | None, meta_width_out: int | None,
           kind: StitchKind = "linear") -> Stitched:
    """Wrap a token stage (which has an ``interface``) with stitch layers to and from the meta token widths.

    ``kind="linear"`` is a plain Linear (NAC reference), ``"ln_linear"`` LayerNorm + Linear (V-MoE reference).
    The meta width on the image side of an ``image->tokens`` stage and on the logits side of a
    ``tokens->logits`` stage is ignored (pass None). ``stitch_shapes`` handles any boundary shapes.
    """
    interface = _interface(stage, kind)
    takes, gives = interface.kind != "image->tokens", interface.kind != "tokens->logits"
    for side, meta, own in (("input", meta_width_in, interface.width_in), ("output", meta_width_out, interface.width_out)):
        if (takes if side == "input" else gives) and (meta is None or own is None):
            raise MonomodError(f"cannot stitch the stage {side}: the meta or stage boundary there is not a [B, T, D] "
                               "token tensor", "stitch only between token boundaries, or use stitch_shapes")
    pre = stitch_layer((1, meta_width_in), (1, interface.width_in), kind) if takes else nn.Identity()
    post = stitch_layer((1, interface.width_out), (1, meta_width_out), kind) if gives else nn.Identity()
    return Stitched(pre, stage, post, StageInterface(interface.kind, meta_width_in if takes else None,
                                                     meta_width_out if gives else None))


def stitch_shapes(stage: Stage, meta_in: Shape | None, stage_in: Shape | None, stage_out: Shape | None,
                  meta_out: Shape | None, kind: StitchKind = "linear") -> Stitched:
    """Wrap ``stage`` so it reads the ``meta_in`` boundary and writes the ``meta_out`` one (per-sample shapes, no
    batch axis; None on the image side of the first stage and the logits side of the last)."""
    interface = _interface(stage, kind)
    pre = nn.Identity() if meta_in is None else stitch_layer(meta_in, stage_in, kind)
    post = nn.Identity() if meta_out is None else stitch_layer(stage_out, meta_out, kind)
    width = lambda shape: int(shape[-1]) if shape is not None and len(shape) == 2 else None  # noqa: E731
    return Stitched(pre, stage, post, StageInterface(interface.kind, width(meta_in), width(meta_out)))


def _interface(stage: Stage, kind: str) -> StageInterface:
    if kind not in STITCH_KINDS:
        raise MonomodError(f"unknown stitch kind {kind!r}", f"choose one of {', '.join(STITCH_KINDS)}")
    interface = getattr(stage, "interface", None)
    if not isinstance(interface, StageInterface):
        raise MonomodError(f"{type(stage).__name__} has no StageInterface", "stitch stages of a StagedModel")
    return interface


def boundary_shapes(student: StagedModel) -> list[Shape]:
    """The per-sample shapes of the student's K-1 inner boundaries, measured by one batch-1 forward in eval mode
    (on the student's device; no autograd, and the random state is left as it was). Cached on the student."""
    cached = getattr(student, "_boundary_shapes", None)
    if cached is not None:
        return cached
    param = next(iter(student.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = example_input(student.in_chans, student.img_size, device=device)
    modes = [m.training for m in student.modules()]
    shapes: list[Shape] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        student.eval()
        for stage in student.stages[:-1]:
            x = stage(x)
            shapes.append(tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None)
    for module, mode in zip(student.modules(), modes):
        module.training = mode
    student._boundary_shapes = shapes
    return shapes


def teacher_boundaries(partition: Partition) -> list[Shape | None]:
    """The per-sample shapes of the teacher's K-1 cuts (None where a cut carries several tensors or no shape)."""
    out: list[Shape | None] = []
    for values in partition.cuts:
        shape = values[0].shape if len(values) == 1 else None
        out.append(tuple(int(d) for d in shape[1:]) if shape and shape[0] == "B" else None)
    return out


def stitch_student(student: StagedModel, partition: Partition, i: int, kind: StitchKind = "linear") -> Stitched:
    """Student stage i between stitch layers to and from the teacher's (= the meta model's) boundaries."""
    meta, own = teacher_boundaries(partition), boundary_shapes(student)
    k = len(student.stages)
    return stitch_shapes(student.stages[i], meta[i - 1] if i > 0 else None, own[i - 1] if i > 0 else None,
                         own[i] if i < k - 1 else None, meta[i] if i < k - 1 else None, kind)


def check_student_stitches(student: StagedModel, partition: Partition) -> None:
    """Refuse, in one line naming the two shapes, a student whose boundaries no stitch joins to the teacher's."""
    if len(student.stages) != partition.k:
        raise MonomodError(f"the student has {len(student.stages)} stages but the teacher is cut into {partition.k}",
                           f"give the student {partition.k} stages (--modules)")
    for i, (meta, own) in enumerate(zip(teacher_boundaries(partition), boundary_shapes(student))):
        for src, dst in ((meta, own), (own, meta)):
            try:
                check_stitchable(src, dst)
            except MonomodError as e:
                raise MonomodError(f"boundary {i} (after module {i}): {e.problem}", e.fix) from None


__all__ = ["ASSEMBLY_MODES", "Stitched", "boundary_shapes", "bridge", "check_student_stitches", "stitch",
           "stitch_shapes", "stitch_student", "teacher_boundaries"]
