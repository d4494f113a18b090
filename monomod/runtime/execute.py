"""Compile-and-run orchestration: prepare a RUN_DIR for a plan, then execute its jobs in dependency order on an
executor (local, process pool, Ray; see executors.py), with one live view of the jobs in flight."""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape

from monomod.errors import JobFailed, MonomodError, shorten
from monomod.io import clean_temporaries
from monomod.plan import PLAN_FILE, Job, Plan
from monomod.rundir import CHECKPOINT_DIR, LOCK_FILE, JobState, RunDir, to_run, writes_only_its_folder
from monomod.runtime.lock import run_dir_lock

log = logging.getLogger(__name__)


@dataclass
class JobStatus:
    name: str
    state: JobState  # done (this time), cached (skipped: finished before with the same hash), failed
    seconds: float | None = None


def prepare_run_dir(plan: Plan, run_dir: str | Path, *, force: bool = False) -> Path:
    """Write ``plan`` to RUN_DIR, refusing to replace a different plan unless ``force``.

    The same plan is accepted as is (that is how a run resumes); with ``force`` only the jobs whose hash changed
    (and their dependents) will run again, because finished jobs are recognised by hash.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MonomodError(f"--out {shorten(str(run_dir))!r} is a file", "choose a directory for the run")
    plan.check_paths(run_dir)
    if RunDir(run_dir).plan_file.exists():
        existing = Plan.load(run_dir)
        changed = _differences(existing, plan)
        if changed and not force:
            raise MonomodError(
                f"{str(run_dir)!r} holds a different plan (changed: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})",
                "pass --force to replace it (finished jobs that did not change are kept) or choose another --out",
            )
    elif run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise MonomodError(f"{shorten(str(run_dir))!r} is not empty and holds no monomod plan",
                           "choose an empty or new --out directory")
    try:
        plan.save(run_dir)
    except OSError as e:
        raise MonomodError(f"cannot write the plan to --out {shorten(str(run_dir))!r} ({e.strerror})",
                           "choose a writable folder with a shorter path") from None
    return run_dir


def reuse_finished(plan: Plan, run_dir: str | Path, sources: list[str | Path]) -> list[str]:
    """Copy into RUN_DIR the jobs another run finished with the same hash, so they are not trained again.

    A job's hash covers its config, the settings it reads and its inputs' hashes, so an equal hash means an
    equal product: a new student for the same teacher reuses the teacher (and meta model) of an earlier run.
    Products, logs and the done marker are copied, not the resume checkpoint; each job lands whole or not at all.
    Returns the names of the reused jobs.
    """
    run = RunDir(run_dir)
    check_reuse_sources(sources)
    reused = []
    for job in plan.jobs:
        if run.is_done(job) or not writes_only_its_folder(job):
            continue
        for source in map(RunDir, sources):
            if source.root.resolve() == run.root.resolve() or not source.is_done(job):
                continue
            target = run.job_dir(job)
            staging = target.with_name(f".{job.dir}.reuse")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source.job_dir(job), staging, ignore=shutil.ignore_patterns(CHECKPOINT_DIR))
            shutil.rmtree(target, ignore_errors=True)  # an unfinished attempt of this job
            os.replace(staging, target)
            reused.append(job.name)
            break
    return reused


def check_reuse_sources(sources: list[str | Path]) -> None:
    """Each ``--reuse`` folder is a run whose plan reads (checked at compile time, in a dry run too)."""
    for source in map(Path, sources):
        if not RunDir(source).plan_file.is_file():
            raise MonomodError(f"--reuse {shorten(str(source))!r} is not a monomod run (no {PLAN_FILE})",
                               "pass the RUN_DIR of an earlier `monomod convert`")
        try:
            Plan.load(source)
        except MonomodError as e:
            raise MonomodError(f"--reuse {shorten(str(source))!r}: {e.problem}", "pass the RUN_DIR of an earlier "
                               "`monomod convert`") from None


def _differences(old: Plan, new: Plan) -> list[str]:
    changed = [f"settings.{k}" for k in sorted(set(old.settings) | set(new.settings)) if old.settings.get(k) != new.settings.get(k)]
    old_hashes = {j.name: j.hash for j in old.jobs}
    changed += [j.name for j in new.jobs if old_hashes.get(j.name) != j.hash]
    changed += [name for name in old_hashes if name not in {j.name for j in new.jobs}]
    return changed


def execute(plan: Plan, run_dir: str | Path, **options) -> list[JobStatus]:
    """``_execute`` (see there) while holding RUN_DIR's lock, after checking that every path stays inside RUN_DIR,
    every training config is valid and the temporary files of killed writers are gone."""
    plan.check_paths(run_dir)
    check_train_configs(plan)
    with run_dir_lock(run_dir):
        clean_temporaries(Path(run_dir))
        return _execute(plan, Path(run_dir), **options)


def check_train_configs(plan: Plan) -> None:
    """Every job's training config, checked before any job runs (an edited plan.yaml says ``steps: many``)."""
    from monomod.runtime.config import TrainConfig

    for job in plan.jobs:
        train = job.config.get("train")
        if train is None:
            continue
        if not isinstance(train, dict):
            raise MonomodError(f"job {job.name!r}: train must be a mapping", "fix the edit or recompile the plan")
        try:
            TrainConfig.from_json(dict(train))
        except MonomodError as e:
            raise MonomodError(f"job {job.name!r}: {e.problem}", e.fix) from None


def _execute(
    plan: Plan,
    run_dir: Path,
    *,
    only: list[str] | None = None,
    console: Console | None = None,
    on_job: Callable[[JobStatus], None] | None = None,
    executor: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    max_retries: int = 0,
    loader_workers: int | None = None,
) -> list[JobStatus]:
    """Run every job that is not finished with its current hash, respecting the DAG, on ``executor``.

    ``local`` runs jobs in this process one by one (plan order); ``process`` runs up to ``workers`` jobs at once in
    worker processes on this machine, started once and reused; ``ray`` runs them as tasks on a Ray cluster
    (``ray_address``). A job whose inputs are finished starts as soon as the executor has room (side by side, the
    longest remaining chain of training steps first). Every job computes with the plan's ``threads``, or, where the
    plan asks for none, with the share of this machine's cores its executor allots it. A failed attempt is retried up to
    ``max_retries`` times; jobs that do not depend on a failed job keep going; then ``JobFailed`` names every failed
    job and its ``log.txt``. ``loader_workers`` sets every job's data-loader workers (default: the job's cores, at
    most 8); it changes speed, never results, so it is not part of the plan. Finished jobs stay finished, so running the plan again retries only what is left.

    Under torchrun (``WORLD_SIZE`` > 1) the local executor runs the jobs data-parallel on every rank (see
    ``monomod.runtime.distributed``).
    """
    from monomod.runtime import distributed
    from monomod.runtime.executors import make_executor

    run_dir = Path(run_dir)
    console = console or Console(stderr=True)
    if max_retries < 0:
        raise MonomodError(f"--max-retries must be 0 or more, got {max_retries}", "pass --max-retries 0 (no retry) or more")
    if distributed.env_world_size() > 1 and executor != "local":
        raise MonomodError(f"--executor {executor} cannot run under torchrun", "under torchrun use the local executor (the default)")
    if executor != "local":
        _check_saved_plan(plan, run_dir)
    statuses, done, pending = _sort_jobs(plan, run_dir, set(only) if only else None)
    if not pending:
        return statuses

    with distributed.session():
        runner = make_executor(executor, run_dir.resolve(), plan, workers=workers, ray_address=ray_address,
                               loader_workers=loader_workers)
        board = JobBoard(plan, run_dir, console, live=runner.live_view and console.is_terminal and distributed.is_writer(),
                         quiet=not distributed.is_writer())
        scheduler = _Scheduler(plan, run_dir, runner, board, pending, done, max_retries=max_retries, on_job=on_job)
        try:
            with board:
                scheduler.run()
        finally:
            runner.close()
    statuses = sorted(statuses + scheduler.statuses, key=lambda s: scheduler.order[s.name])
    if scheduler.failed:
        raise JobFailed(_failure_message(plan, run_dir, scheduler.failed, scheduler.attempts, scheduler.blocked))
    return statuses


def _sort_jobs(plan: Plan, run_dir: Path, selected: set[str] | None) -> tuple[list[JobStatus], set[str], list[Job]]:
    """The cached statuses of the selected finished jobs, the names of every finished job and the selected jobs
    to run (plan order). A job runs again when its inputs do; each job to run must have its inputs finished or
    to run."""
    statuses: list[JobStatus] = []
    done: set[str] = set()
    pending = []
    for job in plan.jobs:
        problem = RunDir(run_dir).done_problem(job)
        stale_inputs = [name for name in job.inputs if name not in done]
        if problem is None and stale_inputs:  # an input runs again (a product failed verification): so must this
            problem = f"its input {stale_inputs[0]} runs again"
        if problem is None:
            done.add(job.name)
            if selected is None or job.name in selected:
                statuses.append(JobStatus(job.name, JobState.CACHED))
            continue
        if RunDir(run_dir).done_file(job).is_file() and not to_run(problem):
            log.warning(f"{job.name}: {problem}; running it again")
        if selected is None or job.name in selected:
            pending.append(job)
    will_run = {job.name for job in pending}
    for job in pending:
        missing = [name for name in job.inputs if name not in done and name not in will_run]
        if missing:
            raise MonomodError(f"job {job.name!r} needs {', '.join(missing)} first", f"run the whole plan: monomod run {run_dir}")
    return statuses, done, pending


class _Scheduler:
    """Runs the pending jobs on an executor in dependency order.

    A job starts once its inputs are done and the executor has room; a failed attempt goes back to the pending
    jobs until it has had ``max_retries`` retries; the jobs that depend on a failed job are blocked, the others
    keep going."""

    def __init__(self, plan: Plan, run_dir: Path, runner, board: "JobBoard", pending: list[Job], done: set[str], *,
                 max_retries: int, on_job: Callable[[JobStatus], None] | None) -> None:
        self.plan, self.run_dir, self.runner, self.board = plan, run_dir, runner, board
        self.pending, self.done, self.max_retries, self.on_job = pending, done, max_retries, on_job
        self.order = {job.name: i for i, job in enumerate(plan.jobs)}
        self.priority = _longest_path_first(plan) if runner.capacity > 1 else self.order
        self.running: set[str] = set()
        self.attempts: dict[str, int] = {}
        self.failed: dict[str, str] = {}  # name -> error of its last attempt
        self.blocked: list[str] = []      # not run: an input failed
        self.statuses: list[JobStatus] = []

    def run(self) -> None:
        while self.pending or self.running:
            self.launch_ready()
            if not self.running:
                break
            for outcome in self.runner.wait(timeout=0.5):
                self.collect(outcome)
            self.board.refresh(self.runner.workers())

    def ready(self, job: Job) -> bool:
        return all(name in self.done for name in job.inputs)

    def _is_blocked(self, job: Job) -> bool:
        return any(name in self.failed or name in self.blocked for name in job.inputs)

    def launch_ready(self) -> None:
        """Start the pending jobs whose inputs are done while the executor has room: in plan order one at a time,
        the longest remaining path first side by side (``_longest_path_first``), each with the threads the
        executor allots it (``allot``: its share of the cores, given how many jobs are ready)."""
        ready = []
        for job in sorted(self.pending, key=lambda j: self.priority[j.name]):
            if self._is_blocked(job):
                self.pending.remove(job)
                self.blocked.append(job.name)
            elif self.ready(job):
                ready.append(job)
        for job, threads in zip(ready, self.runner.allot(len(ready))):
            self.pending.remove(job)
            self.launch(job, threads)

    def launch(self, job: Job, threads: int | None = None) -> None:
        self.attempts[job.name] = self.attempts.get(job.name, 0) + 1
        self.runner.start(job, threads)
        self.running.add(job.name)
        self.board.started(job, self.attempts[job.name], self.runner.workers().get(job.name, ""))

    def collect(self, outcome) -> None:
        """One finished attempt: done (its marker and outputs verified), retried, or failed."""
        self.running.discard(outcome.name)
        job = self.plan.job(outcome.name)
        if outcome.ok and not RunDir(self.run_dir).is_done(job):
            outcome.ok, outcome.error = False, "the job ended without its done marker or outputs"
        if outcome.ok:
            self.done.add(job.name)
            self.board.finished(job, outcome)
            self._record(JobStatus(job.name, JobState.DONE, outcome.seconds))
        elif self.attempts[job.name] <= self.max_retries:
            self._retry(job, outcome)
        else:
            self.failed[job.name] = outcome.error or "unknown error"
            self.board.failed(job, outcome)
            self._record(JobStatus(job.name, JobState.FAILED, outcome.seconds))

    def _retry(self, job: Job, outcome) -> None:
        self.board.failed(job, outcome, retry=f"{self.attempts[job.name]}/{self.max_retries}")
        self.pending.append(job)
        self.pending.sort(key=lambda j: self.order[j.name])

    def _record(self, status: JobStatus) -> None:
        self.statuses.append(status)
        if self.on_job:
            self.on_job(status)


def _longest_path_first(plan: Plan) -> dict[str, tuple[int, int]]:
    """Sort keys of the jobs for executors that run several at once: the most training steps from the job's start to
    the end of the plan first (its own steps and those of its longest chain of dependents), then plan order. Long
    chains start early and the longest of side-by-side jobs does not start last and set the finish time alone."""
    remaining: dict[str, int] = {}
    for job in reversed(plan.jobs):
        train = job.config.get("train")
        steps = train.get("steps", 0) if isinstance(train, dict) and isinstance(train.get("steps"), int) else 0
        after = [remaining[j.name] for j in plan.jobs if job.name in j.inputs]
        remaining[job.name] = steps + max(after, default=0)
    return {job.name: (-remaining[job.name], i) for i, job in enumerate(plan.jobs)}


def _check_saved_plan(plan: Plan, run_dir: Path) -> None:
    """Workers read the plan from RUN_DIR: it must be the plan being executed."""
    try:
        saved = Plan.load(run_dir)
    except MonomodError:
        saved = None
    # a job's hash covers its kind, config, the run's settings and its inputs' hashes
    same = saved is not None and [(j.name, j.hash) for j in saved.jobs] == [(j.name, j.hash) for j in plan.jobs]
    if not same:
        raise MonomodError(f"{RunDir(run_dir).plan_file} is not the plan being executed, and workers read it from there",
                           "save the plan to RUN_DIR first (prepare_run_dir or Plan.save)")


def _failure_message(plan: Plan, run_dir: Path, failed: dict[str, str], attempts: dict[str, int],
                     blocked: list[str]) -> str:
    parts = []
    for name, error in failed.items():
        tries = f" after {attempts[name]} attempts" if attempts.get(name, 1) > 1 else ""
        parts.append(f"job {name!r} failed{tries}: {error} (log: {RunDir(run_dir).log(name)})")
    text = "; ".join(parts)
    if len(failed) > 1:
        text = f"{len(failed)} jobs failed: {text}"
    if blocked:
        text += f"; not run: {', '.join(blocked)}"
    return f"{text}; finished jobs are kept: fix the cause, then `monomod run {run_dir}` retries only what is left"


class JobBoard:
    """What the user sees while jobs run.

    A live view (a TTY and a parallel executor): one row per running job with its progress (step / steps from the
    job's ``metrics.jsonl``), its latest loss and the worker it runs on, plus a line per start and finish above it.
    Otherwise (the local executor, whose job draws its own bar, or output to a file or pipe): a calm line per job
    start, finish and failure.
    """

    def __init__(self, plan: Plan, run_dir: Path, console: Console, *, live: bool, quiet: bool = False) -> None:
        self.plan, self.run_dir, self.console, self.live, self.quiet = plan, run_dir, console, live, quiet
        self.tasks: dict[str, int] = {}
        self.started_at: dict[str, float] = {}
        self.progress = None
        if live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("[dim]{task.fields[worker]}"), TimeElapsedColumn(),
                console=console, transient=True, refresh_per_second=4,
            )

    def __enter__(self) -> "JobBoard":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _print(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)

    def started(self, job: Job, attempt: int, worker: str) -> None:
        self.started_at[job.name] = time.perf_counter()
        again = f" (attempt {attempt})" if attempt > 1 else ""
        where = f" on {worker}" if worker and worker != "this process" else ""
        self._print(f"[bold]▶ {job.name}[/bold]{again}{where}")
        if self.progress is not None:
            steps = job.config.get("train", {}).get("steps") if isinstance(job.config.get("train"), dict) else None
            self.tasks[job.name] = self.progress.add_task(job.name, total=steps, loss="-", worker=worker or "")

    def _stop(self, job: Job) -> None:
        task = self.tasks.pop(job.name, None)
        if task is not None and self.progress is not None:
            self.progress.remove_task(task)

    def finished(self, job: Job, outcome) -> None:
        self._stop(job)
        seconds = outcome.seconds if outcome.seconds is not None else time.perf_counter() - self.started_at[job.name]
        where = f" on {outcome.worker}" if outcome.worker and outcome.worker != "this process" else ""
        self._print(f"[green]✓ {job.name}[/green] in {seconds:.1f} s{where}")

    def failed(self, job: Job, outcome, retry: str | None = None) -> None:
        self._stop(job)
        then = f", retrying ({retry})" if retry else ""
        self._print(f"[red]✗ {job.name} failed[/red]: {escape(outcome.error or '')} "
                    f"(log: {RunDir(self.run_dir).log(job)}){then}")

    def refresh(self, workers: dict[str, str]) -> None:
        if self.progress is None:
            return
        for name, task in self.tasks.items():
            step, loss = _step_and_loss(RunDir(self.run_dir).latest_metrics(name))
            fields: dict = {"worker": workers.get(name, "")}
            if step is not None:
                fields["completed"] = step
            if loss is not None:
                fields["loss"] = f"{loss:.4f}"
            self.progress.update(task, **fields)


def _step_and_loss(record: dict | None) -> tuple[int | None, float | None]:
    """Step and loss of a metrics record (None for what it lacks)."""
    if record is None or not isinstance(record.get("step"), int):
        return None, None
    loss = record.get("loss")
    return record["step"], float(loss) if isinstance(loss, (int, float)) else None
