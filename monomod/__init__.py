"""monomod: compile a monolithic vision transformer into a modular student by module-to-module distillation."""
from __future__ import annotations

from monomod.errors import MonomodError
from monomod.frontend import load_model
from monomod.ir import BoundaryValue, ModuleSpec, NodeInfo, Partition, TracedModel
from monomod.passes.extract import Chain, extract
from monomod.passes.partition import partition
from monomod.passes.trace import trace

__version__ = "0.1.0"

__all__ = [
    "BoundaryValue", "Chain", "ModuleSpec", "MonomodError", "NodeInfo", "Partition", "TracedModel",
    "extract", "load_model", "partition", "trace", "__version__",
]
