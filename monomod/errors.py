"""One exception type for every problem the user can fix.

The CLI prints ``str(error)`` as a single line on stderr and exits with code 2, so every message names the problem
and the fix in one sentence.
"""
from __future__ import annotations


class MonomodError(Exception):
    """A problem with the user's input; ``str()`` is the one-line message the CLI prints."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
