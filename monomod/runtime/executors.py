"""Executors: where the jobs of a plan run. ``execute()`` (execute.py) owns the DAG and asks an executor to start
jobs whose inputs are finished, up to the executor's capacity, then waits for outcomes.

* ``local``: in this process, one job at a time (the default; the job's own progress bar on the console).
* ``process``: a pool of ``workers`` worker processes on this machine (spawn context), each started once and reused
  for job after job, keeping the run's data and frozen models loaded between jobs.
* ``ray``: every job is a Ray task on a Ray cluster (``address``: ``auto``, ``HOST:PORT``, or none for a local Ray
  with ``num_cpus`` = this machine's cores) that asks for the plan's threads as its CPUs.

Threads are decided where a job runs (``run_job``, ``resolve_threads``). A plan that asks for a count
(``settings.threads``, ``--threads``) computes every job with it, whichever executor runs it, so the three give
bitwise equal weights. A plan that asks for none (``auto``) lets the executor allot each job its share of this
machine's cores (``allot``): jobs side by side never ask for more threads than the cores they share, and a job that
runs alone (a chain of the DAG) gets them all. The count each job used is in its ``done.json`` (``used.threads``):
``--threads`` with that count reproduces its numbers on any executor.

Whatever the executor, a job is run by ``run_one``: load RUN_DIR's plan, check the job's hash, run it exactly as
``monomod run RUN_DIR --job NAME`` does and write its products, ``done.json`` and ``log.txt`` under
``RUN_DIR/jobs/<dir>``. RUN_DIR is therefore the only channel between the scheduler and its workers: on a cluster it
must live on storage every node can reach, at the same path.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from monomod.errors import MonomodError
from monomod.io import atomic_write_json, read_json
from monomod.rundir import RunDir
from monomod.runtime.config import cpu_count, resolve_threads
from monomod.safe import open_append

log = logging.getLogger(__name__)
EXECUTORS = ("local", "process", "ray")
DEFAULT_PROCESS_WORKERS = 2
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS")


@dataclass
class Outcome:
    """How one attempt of a job ended."""

    name: str
    ok: bool
    seconds: float | None = None
    error: str | None = None  # one line
    worker: str = ""


def thread_env(threads: int) -> dict[str, str]:
    return {name: str(threads) for name in THREAD_VARIABLES}


def one_line(error: BaseException) -> str:
    """An exception as one line: a MonomodError's own message, else ``Type: first line``."""
    if isinstance(error, MonomodError):
        text = str(error)
    else:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return " ".join(text.split())


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_append(path) as f:
        f.write(text)


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


@contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ and child output too) to ``path``
    for the block, appending; restore them afterwards (Ray reuses its worker processes)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open_append(path, binary=True) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_one(run_dir: str, name: str, expected_hash: str | None = None, threads: int | None = None,
            worker: str | None = None, loader_workers: int | None = None,
            contexts: "WorkerContexts | None" = None) -> dict[str, Any]:
    """Run job ``name`` of RUN_DIR's plan in this process, as ``monomod run RUN_DIR --job NAME`` does, with the
    job's output appended to ``RUN_DIR/jobs/<dir>/log.txt`` (``loader_workers``: see ``RunContext``; ``contexts``: a pool
    worker's RunContext kept between jobs). Never raises for a failing job: returns
    ``{"ok": bool, "seconds": float | None, "error": one line | None, "worker": label}``."""
    from monomod.plan import Plan

    worker = worker or f"{socket.gethostname()} pid {os.getpid()}"
    started = time.perf_counter()
    try:
        plan = Plan.load(run_dir)
        job = plan.job(name)
    except MonomodError as e:
        return {"ok": False, "seconds": None, "error": one_line(e), "worker": worker}
    run = RunDir(run_dir)
    run.job_dir(job).mkdir(parents=True, exist_ok=True)
    if expected_hash is not None and job.hash != expected_hash:
        error = (f"{run.plan_file} changed while the run was going (job {name!r} has hash {job.hash}, "
                 f"expected {expected_hash}); run `monomod run {run_dir}` again")
        return {"ok": False, "seconds": None, "error": error, "worker": worker}
    threads = resolve_threads(plan.settings.get("threads"), threads)
    atomic_write_json(run.worker_file(job), {"worker": worker, "pid": os.getpid(), "host": socket.gethostname(),
                                              "threads": threads, "started": time.time()})
    with _output_to(run.log(job)):
        print(f"[{_stamp()}] {name}: started on {worker} with {threads} thread(s)", flush=True)
        try:
            from monomod.runtime.jobs import RunContext, run_job

            ctx = (contexts.get(run_dir, plan, loader_workers) if contexts is not None
                   else RunContext(run_dir=Path(run_dir), plan=plan, loader_workers=loader_workers))
            record = run_job(ctx, job, threads)
        except Exception as e:  # reported to the scheduler; the traceback stays in the log
            traceback.print_exc()
            print(f"[{_stamp()}] {name}: failed", flush=True)
            return {"ok": False, "seconds": time.perf_counter() - started, "error": one_line(e), "worker": worker}
        print(f"[{_stamp()}] {name}: finished in {record['seconds']:.1f} s", flush=True)
    return {"ok": True, "seconds": record["seconds"], "error": None, "worker": worker}


# ------------------------------------------------------------------------------------------------------ local


class LocalExecutor:
    """In this process, one job at a time, sharing one RunContext (data and frozen models are built once)."""

    kind = "local"
    capacity = 1
    live_view = False  # the job's own progress bar is on the console

    def __init__(self, run_dir: Path, plan: Any, loader_workers: int | None = None) -> None:
        from monomod.runtime.jobs import RunContext

        self.run_dir = run_dir
        self.ctx = RunContext(run_dir=run_dir, plan=plan, loader_workers=loader_workers)
        self.queue: list[tuple[Any, int]] = []

    def allot(self, ready: int) -> list[int]:
        """One job at a time, with every core of this machine (or the plan's count: ``run_job`` decides)."""
        return [cpu_count()] if ready and not self.queue else []

    def start(self, job: Any, threads: int | None = None) -> None:
        self.queue.append((job, threads or cpu_count()))

    def workers(self) -> dict[str, str]:
        return {job.name: "this process" for job, _ in self.queue}

    def wait(self, timeout: float) -> list[Outcome]:
        from monomod.runtime.distributed import is_writer
        from monomod.runtime.jobs import run_job

        if not self.queue:
            return []
        job, threads = self.queue.pop(0)
        log = RunDir(self.run_dir).log(job)
        if is_writer():
            _append(log, f"[{_stamp()}] {job.name}: started in pid {os.getpid()} (local executor)\n")
        try:
            record = run_job(self.ctx, job, threads)
        except Exception as e:
            if is_writer():
                _append(log, traceback.format_exc() + f"[{_stamp()}] {job.name}: failed\n")
            return [Outcome(job.name, False, error=one_line(e), worker="this process")]
        if is_writer():
            _append(log, f"[{_stamp()}] {job.name}: finished in {record['seconds']:.1f} s\n")
        return [Outcome(job.name, True, seconds=record["seconds"], worker="this process")]

    def close(self) -> None:
        self.queue.clear()


# ----------------------------------------------------------------------------------------------- process pool


class WorkerContexts:
    """A pool worker's RunContext, kept from one job to the next of the same run (same RUN_DIR, same settings): the
    data set, the teacher's partition and the frozen models are loaded once per worker, not once per job, as the
    local executor loads them once per run. Products never change once their job is done, so what it caches stays
    true."""

    def __init__(self) -> None:
        self.ctx: Any = None

    def get(self, run_dir: str, plan: Any, loader_workers: int | None) -> Any:
        from monomod.runtime.jobs import RunContext

        ctx = self.ctx
        if (ctx is None or ctx.run_dir != Path(run_dir) or ctx.plan.settings != plan.settings
                or ctx.loader_workers != loader_workers):
            ctx = self.ctx = RunContext(run_dir=Path(run_dir), plan=plan, loader_workers=loader_workers)
        ctx.plan = plan  # this job's plan, as read from RUN_DIR
        return ctx


def _worker_main(conn: Any) -> None:
    """A pool worker (a spawned interpreter): run the jobs the scheduler sends, one at a time, until it sends None.

    Starting once saves every later job the interpreter start, the imports and loading the data. Ctrl-C is the
    scheduler's to handle (it stops its workers with SIGTERM); a worker ignores SIGINT so a terminal interrupt does
    not print a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    contexts = WorkerContexts()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            break
        if task is None:
            break
        run_dir, name, expected_hash, threads, loader_workers = task
        result = run_one(run_dir, name, expected_hash, threads, loader_workers=loader_workers, contexts=contexts)
        sys.stdout.flush()
        sys.stderr.flush()
        conn.send(result)
    conn.close()


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class _PoolWorker:
    proc: Any
    conn: Any  # the scheduler's end of a duplex pipe

    @property
    def label(self) -> str:
        return f"pid {self.proc.pid}"


def plan_thread_count(plan: Any, default: int) -> int:
    """The plan's threads per job (``settings.threads``), or ``default`` where it asks for none (``auto``)."""
    threads = (getattr(plan, "settings", None) or {}).get("threads")
    return int(threads) if threads else default


class ProcessExecutor:
    """``workers`` slots on this machine, each a worker process started once (spawn) and reused for job after job.
    Each job computes with the plan's thread count where it asks for one, else with its share of the cores left
    free (``allot``)."""

    kind = "process"
    live_view = True

    def __init__(self, run_dir: Path, workers: int | None = None, loader_workers: int | None = None,
                 plan: Any = None) -> None:
        import multiprocessing

        self.run_dir = run_dir
        self.loader_workers = loader_workers
        self.capacity = workers or DEFAULT_PROCESS_WORKERS
        self.cores = cpu_count()
        self.fixed = plan_thread_count(plan, 0) or None  # the plan's --threads, or None: allotted per job
        self.mp = multiprocessing.get_context("spawn")
        self.idle: list[_PoolWorker] = []
        self.running: dict[str, _PoolWorker] = {}
        self.threads_of: dict[str, int] = {}  # the threads each running job was allotted
        if self.fixed and self.capacity * self.fixed > self.cores:
            log.warning(f"{self.capacity} workers x {self.fixed} thread(s) per job share {self.cores} core(s), so "
                        f"jobs side by side compete for them: run without --threads (each job gets its share of the "
                        f"cores) or with --threads {max(1, self.cores // self.capacity)}")

    def allot(self, ready: int) -> list[int]:
        """Threads for each of the next jobs to start, given ``ready`` jobs waiting: the plan's count, or the cores
        not yet allotted, split evenly among the jobs that start now (a job alone gets them all); none while every
        core is taken, so jobs side by side never ask for more threads than the cores they share."""
        starting = min(ready, self.capacity - len(self.running))
        if self.fixed:
            return [self.fixed] * max(0, starting)
        free = self.cores - sum(self.threads_of.values())
        starting = min(starting, free)
        if starting <= 0:
            return []
        return [free // starting + (1 if i < free % starting else 0) for i in range(starting)]

    def _spawn(self, threads: int) -> _PoolWorker:
        mine, theirs = self.mp.Pipe(duplex=True)
        proc = self.mp.Process(target=_worker_main, args=(theirs,), name="monomod worker", daemon=True)
        # The child reads the thread variables when torch loads, before any code of ours runs: set them for it.
        with _environ(thread_env(threads)):
            proc.start()
        theirs.close()
        return _PoolWorker(proc, mine)

    def start(self, job: Any, threads: int | None = None) -> None:
        threads = threads or self.fixed or max(1, self.cores // self.capacity)
        worker = self.idle.pop() if self.idle else self._spawn(threads)
        worker.conn.send((str(self.run_dir), job.name, job.hash, threads, self.loader_workers))
        self.running[job.name] = worker
        self.threads_of[job.name] = threads

    def workers(self) -> dict[str, str]:
        return {name: worker.label for name, worker in self.running.items()}

    def wait(self, timeout: float) -> list[Outcome]:
        from multiprocessing.connection import wait

        if not self.running:
            return []
        by_handle = {}
        for name, worker in self.running.items():
            by_handle[worker.conn] = by_handle[worker.proc.sentinel] = name
        outcomes = []
        for name in dict.fromkeys(by_handle[h] for h in wait(list(by_handle), timeout)):
            worker = self.running.pop(name)
            self.threads_of.pop(name, None)
            result = self._result(worker)
            if result is not None and worker.proc.is_alive():
                self.idle.append(worker)
            else:
                self._stop(worker)
            outcomes.append(self._outcome(name, worker, result))
        return outcomes

    @staticmethod
    def _result(worker: _PoolWorker) -> dict[str, Any] | None:
        try:
            return worker.conn.recv() if worker.conn.poll() else None
        except (EOFError, OSError):
            return None

    @staticmethod
    def _outcome(name: str, worker: _PoolWorker, result: dict[str, Any] | None) -> Outcome:
        if result is not None:
            return Outcome(name, result["ok"], seconds=result["seconds"], error=result["error"], worker=worker.label)
        code = worker.proc.exitcode
        if code is not None and code < 0:
            try:
                how = signal.Signals(-code).name
            except ValueError:
                how = f"signal {-code}"
            return Outcome(name, False, error=f"worker {worker.label} was killed by {how}", worker=worker.label)
        return Outcome(name, False, error=f"worker {worker.label} exited with code {code}", worker=worker.label)

    @staticmethod
    def _stop(worker: _PoolWorker, grace: float = 5.0) -> None:
        worker.proc.join(grace)
        if worker.proc.is_alive():
            worker.proc.kill()
            worker.proc.join()
        worker.conn.close()

    def close(self) -> None:
        """Let idle workers exit; stop workers still running (Ctrl-C, or a failure elsewhere): SIGTERM, then SIGKILL."""
        for worker in self.idle:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for worker in self.running.values():
            if worker.proc.is_alive():
                worker.proc.terminate()
        deadline = time.time() + 5
        for worker in [*self.idle, *self.running.values()]:
            self._stop(worker, max(0.0, deadline - time.time()))
        self.idle.clear()
        self.running.clear()
        self.threads_of.clear()


# -------------------------------------------------------------------------------------------------------- ray


def import_ray():
    try:
        import ray
    except ImportError:
        raise MonomodError("--executor ray needs Ray, which is not installed", "pip install 'monomod[ray]'") from None
    return ray


def _ray_task(run_dir: str, name: str, expected_hash: str, threads: int,
              loader_workers: int | None = None) -> dict[str, Any]:
    """The body of a Ray task: one job from RUN_DIR (shared storage), labelled with the node it ran on."""
    import ray

    try:
        node = ray.util.get_node_ip_address()
    except Exception:  # pragma: no cover - outside a Ray worker
        node = socket.gethostname()
    return run_one(run_dir, name, expected_hash, threads, worker=f"{node} pid {os.getpid()}",
                   loader_workers=loader_workers)


class RayExecutor:
    """Each job a Ray task with ``num_cpus`` = cluster CPUs / workers (capped at the largest node) and one GPU per
    task when this machine has CUDA. Ray's own task retries are off: ``--max-retries`` decides."""

    kind = "ray"
    live_view = True

    def __init__(self, run_dir: Path, workers: int | None = None, address: str | None = None,
                 widest: int = 1, loader_workers: int | None = None, plan: Any = None) -> None:
        ray = import_ray()
        import torch

        self.ray = ray
        self.run_dir = run_dir
        self.loader_workers = loader_workers
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
            try:
                if address:
                    ray.init(address=address, **options)
                else:
                    ray.init(num_cpus=cpu_count(), **options)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = address or "a local Ray"
                raise MonomodError(f"could not start or reach {where} ({one_line(e)})",
                                   "check --ray-address (auto, or HOST:PORT of the head node) and `ray status`") from None
        total = int(ray.cluster_resources().get("CPU", 1))
        largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=total)
        self.threads = min(largest, plan_thread_count(plan, 0)) or None
        self.capacity = workers or max(1, min(widest, total // (self.threads or 1)))
        self.threads = self.threads or max(1, min(largest, total // self.capacity))
        gpus = 1 if torch.cuda.is_available() else 0
        self.remote = ray.remote(num_cpus=self.threads, num_gpus=gpus, max_retries=0)(_ray_task)
        self.running: dict[str, Any] = {}  # name -> ObjectRef

    def allot(self, ready: int) -> list[int]:
        """Every task asks Ray for the same CPUs (``num_cpus``); Ray queues what the cluster cannot hold yet."""
        return [self.threads] * max(0, min(ready, self.capacity - len(self.running)))

    def start(self, job: Any, threads: int | None = None) -> None:
        self.running[job.name] = self.remote.remote(str(self.run_dir), job.name, job.hash, threads or self.threads,
                                                    self.loader_workers)

    def workers(self) -> dict[str, str]:
        labels = {}
        for name in self.running:
            info = read_json(RunDir(self.run_dir).worker_file(name))
            labels[name] = info.get("worker", "") if info else ""  # known once the task has started
        return labels

    def wait(self, timeout: float) -> list[Outcome]:
        if not self.running:
            return []
        names = {ref: name for name, ref in self.running.items()}
        ready, _ = self.ray.wait(list(names), num_returns=1, timeout=timeout)
        outcomes = []
        for ref in ready:
            name = names[ref]
            label = self.workers().get(name) or "a ray worker"
            del self.running[name]
            try:
                result = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:
                outcomes.append(Outcome(name, False, error=f"ray task on {label} died ({one_line(e)[:300]})",
                                        worker=label))
                continue
            outcomes.append(Outcome(name, result["ok"], seconds=result["seconds"], error=result["error"],
                                    worker=result["worker"]))
        return outcomes

    def close(self) -> None:
        for ref in self.running.values():
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # pragma: no cover - already finished
                pass
        self.running.clear()
        if self.owns_ray:
            self.ray.shutdown()


def make_executor(kind: str, run_dir: Path, plan: Any, *, workers: int | None = None, ray_address: str | None = None,
                  loader_workers: int | None = None):
    """The executor ``kind``; ``loader_workers`` reaches every job's RunContext (a run-time setting, not the plan's)."""
    if kind not in EXECUTORS:
        raise MonomodError(f"unknown executor {kind!r}", f"use one of {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise MonomodError(f"--workers must be at least 1, got {workers}", "pass --workers 1 or more")
    if kind == "local":
        if workers not in (None, 1):
            raise MonomodError(f"--workers {workers} needs a parallel executor", "add --executor process (or ray)")
        return LocalExecutor(run_dir, plan, loader_workers)
    if kind == "process":
        return ProcessExecutor(run_dir, workers, loader_workers, plan=plan)
    return RayExecutor(run_dir, workers, ray_address, widest=_widest_level(plan), loader_workers=loader_workers,
                       plan=plan)


def _widest_level(plan: Any) -> int:
    """The most jobs of the plan that can ever run side by side (jobs at the same dependency depth)."""
    depth: dict[str, int] = {}
    for job in plan.jobs:
        depth[job.name] = 1 + max((depth[name] for name in job.inputs), default=-1)
    counts: dict[int, int] = {}
    for d in depth.values():
        counts[d] = counts.get(d, 0) + 1
    return max(counts.values(), default=1)
