"""The compile stage: one option spec (``options``), the compile-time checks (``checks``) and ``compile_options``
(``stage``), which turns options into a Plan. It sits above ``monomod.runtime`` and below recipes, the API and the
CLI: runtime never imports it."""
from __future__ import annotations

from monomod.compiler.options import (
    OPTIONS, SPEC, ConvertOptions, Option, check_values, convert_options, validate,
)
from monomod.compiler.stage import compile_options, record_partition, set_checkpointing

__all__ = ["OPTIONS", "SPEC", "ConvertOptions", "Option", "check_values", "compile_options", "convert_options", "record_partition",
           "set_checkpointing", "validate"]
