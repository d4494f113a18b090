"""One exception type for every problem the user can fix.

The CLI prints ``str(error)`` as a single line on stderr, so every message names the problem and the fix in one
sentence. Exit codes: 2 when the input is wrong and nothing ran (``MonomodError``), 1 when a job ran and failed
(``JobFailed``), 0 otherwise.
"""
from __future__ import annotations


class MonomodError(Exception):
    """A problem with the user's input; ``str()`` is the one-line message the CLI prints (exit code 2)."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class JobFailed(MonomodError):
    """A job of a plan ran and failed (an exception, a non-finite loss, a killed worker) after its retries.

    The CLI prints the one-line message (the job's name, the cause and its ``log.txt``) and exits with code 1: the
    input was accepted and finished jobs are kept, so ``monomod run RUN_DIR`` retries only what is left.
    """

    exit_code = 1
