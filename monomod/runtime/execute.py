"""Compile-and-run orchestration: prepare a RUN_DIR for a plan, then execute its jobs in dependency order."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console

from monomod.errors import MonomodError
from monomod.plan import PLAN_FILE, Plan
from monomod.runtime.jobs import RunContext, is_done, run_job


@dataclass
class JobStatus:
    name: str
    state: str  # "done" (this time), "cached" (skipped: finished before with the same hash), "failed"
    seconds: float | None = None


def prepare_run_dir(plan: Plan, run_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``plan`` to RUN_DIR, refusing to replace a different plan unless ``force``.

    The same plan is accepted as is (that is how a run resumes); with ``force`` only the jobs whose hash changed
    (and their dependents) will run again, because finished jobs are recognised by hash.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MonomodError(f"--out {str(run_dir)!r} is a file", "choose a directory for the run")
    if (run_dir / PLAN_FILE).exists():
        existing = Plan.load(run_dir)
        changed = _differences(existing, plan)
        if changed and not force:
            raise MonomodError(
                f"{str(run_dir)!r} holds a different plan (changed: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})",
                "pass --force to replace it (finished jobs that did not change are kept) or choose another --out",
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise MonomodError(f"{str(run_dir)!r} is not empty and holds no monomod plan", "choose an empty or new --out directory")
    plan.save(run_dir)
    return run_dir


def _differences(old: Plan, new: Plan) -> list[str]:
    changed = [f"settings.{k}" for k in sorted(set(old.settings) | set(new.settings)) if old.settings.get(k) != new.settings.get(k)]
    old_hashes = {j.name: j.hash for j in old.jobs}
    changed += [j.name for j in new.jobs if old_hashes.get(j.name) != j.hash]
    changed += [name for name in old_hashes if name not in {j.name for j in new.jobs}]
    return changed


def execute(
    plan: Plan,
    run_dir: str | Path,
    *,
    only: list[str] | None = None,
    console: Console | None = None,
    on_job: Callable[[JobStatus], None] | None = None,
) -> list[JobStatus]:
    """Run every job that is not finished with its current hash, in plan (topological) order, in this process.

    A failing job raises (a MonomodError names it); every job finished before it stays finished, so running the
    plan again retries only what is left.
    """
    run_dir = Path(run_dir)
    console = console or Console(stderr=True)
    ctx = RunContext(run_dir=run_dir, plan=plan)
    statuses: list[JobStatus] = []
    selected = set(only) if only else None
    for job in plan.jobs:
        if selected is not None and job.name not in selected:
            continue
        if is_done(run_dir, job):
            status = JobStatus(job.name, "cached")
        else:
            missing = [name for name in job.inputs if not is_done(run_dir, plan.job(name))]
            if missing:
                raise MonomodError(f"job {job.name!r} needs {', '.join(missing)} first", f"run the whole plan: monomod run {run_dir}")
            console.print(f"[bold]▶ {job.name}[/bold]")
            try:
                record = run_job(ctx, job)
            except MonomodError as e:
                raise MonomodError(f"job {job.name!r} failed: {e.problem}", e.fix) from None
            status = JobStatus(job.name, "done", record["seconds"])
            console.print(f"[green]✓ {job.name}[/green] in {record['seconds']:.1f} s")
        statuses.append(status)
        if on_job:
            on_job(status)
    return statuses
