"""One exception type for every problem the user can fix.

The CLI prints ``str(error)`` as a single line on stderr, so every message names the problem and the fix in one
sentence. Exit codes: 2 when the input is wrong and nothing ran (``MonomodError``), 1 when a job ran and failed
(``JobFailed``), 0 otherwise.
"""
from __future__ import annotations


def first_line(e: BaseException, *, with_type: bool = False, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), for one-line error reports."""
    lines = str(e).strip().splitlines()
    text = lines[0][:limit] if lines else type(e).__name__
    return f"{type(e).__name__}: {text}" if with_type and lines else text


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut in the middle to at most ``limit`` characters: a 5000-digit seed or a long path stays one
    readable line, with its start and end (where paths differ) kept."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit - 5, 2)
    return f"{text[:keep - keep // 3]}[...]{text[len(text) - keep // 3:]}"


class MonomodError(Exception):
    """A problem with the user's input; ``str()`` is the one-line message the CLI prints (exit code 2)."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        problem, fix = shorten(problem, 600), None if fix is None else shorten(fix, 400)  # a last guard
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class JobFailed(MonomodError):
    """A job of a plan ran and failed (an exception, a non-finite loss, a killed worker) after its retries.

    The CLI prints the one-line message (the job's name, the cause and its ``log.txt``) and exits with code 1: the
    input was accepted and finished jobs are kept, so ``monomod run RUN_DIR`` retries only what is left.
    """

    exit_code = 1
