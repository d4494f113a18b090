"""Partition balance at K=8 across timm (``benchmarks.partition``'s survey, run by ``benchmarks.run``)."""
from __future__ import annotations

from typing import Any

from benchmarks.partition import family_markdown, run_families


def run(quick: bool = False) -> dict[str, Any]:
    return run_families(quick)


def markdown(result: dict[str, Any]) -> str:
    return "\n".join(family_markdown(result)) + "\n"
