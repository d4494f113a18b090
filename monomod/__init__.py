"""monomod: compile a monolithic vision transformer into a modular student by module-to-module distillation."""
from __future__ import annotations

from monomod.api import Run, convert, load_run, load_student
from monomod.errors import MonomodError
from monomod.frontend import load_model
from monomod.ir import BoundaryValue, ModuleSpec, NodeInfo, Partition, TracedModel
from monomod.passes.extract import Chain, extract
from monomod.passes.partition import partition
from monomod.passes.trace import trace
from monomod.plan import Job, Plan
from monomod.students import STUDENT_KINDS, StagedModel, StageInterface, build_student
from monomod.students.hybrid import Hybrid, hybrid
from monomod.students.meta import build_meta
from monomod.version import __version__
from monomod.students.stitching import Stitched, stitch


__all__ = [
    "BoundaryValue", "Chain", "Hybrid", "Job", "Plan", "Run", "convert", "load_run", "load_student", "ModuleSpec", "MonomodError", "NodeInfo", "Partition", "STUDENT_KINDS",
    "StageInterface", "StagedModel", "Stitched", "TracedModel", "build_meta", "build_student", "extract", "hybrid",
    "load_model", "partition", "stitch", "trace", "__version__",
]
