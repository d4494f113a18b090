"""RUN_DIR, the one channel between the scheduler, its workers and the reader of a finished run.

```
RUN_DIR/plan.yaml                  the plan (monomod.plan)
RUN_DIR/monomod.lock               held by the one process executing the plan
RUN_DIR/jobs/<dir>/                one folder per job (``Job.dir``: the name with ':' as '-')
    model.safetensors              the job's product
    done.json                      written last: hash, wall time, result, size + sha256 of every product
    metrics.jsonl                  training log (one record per log step; a torn last line is skipped)
    checkpoint/                    resume state of a training job
    result.json, log.txt, worker.json
RUN_DIR/report.json, report.md, curves.png, report.html
```
Every path of that layout is spelled here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from monomod import integrity
from monomod.io import atomic_write_json, last_jsonl, read_json, read_jsonl
from monomod.plan import JOB_KINDS, PLAN_FILE, Job

JOBS_DIR = "jobs"
CACHE_DIR = "cache"  # derived data every job may read (``--input-path cached``: the pre-resized images)
LOCK_FILE = "monomod.lock"
MODEL_FILE = "model.safetensors"
DONE_FILE = "done.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "log.txt"
WORKER_FILE = "worker.json"
REPORT_JSON, REPORT_MD, CURVES_PNG, REPORT_HTML = "report.json", "report.md", "curves.png", "report.html"


def job_dir_name(job: Job | str) -> str:
    """A job's folder name: its name with ':' as '-', so that it is portable."""
    return job.dir if isinstance(job, Job) else job.replace(":", "-")


class JobState(str, Enum):
    """Where a job stands. String-valued, so JSON and YAML read the same words as before."""

    PENDING = "pending"  # to run: not finished, or finished with another hash
    DONE = "done"  # finished (by this execution, in a status)
    CACHED = "cached"  # finished before with the same hash: skipped
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


# Why a job is not done (``RunDir.done_problem``) when it simply has to run; any other reason is a damaged product.
NOT_FINISHED = "not finished"
OTHER_HASH = "finished with another hash"


def to_run(problem: str | None) -> bool:
    """Whether a job with this ``done_problem`` just has to run (not a damaged product of a finished job)."""
    return problem in (NOT_FINISHED, OTHER_HASH)


def job_outputs(name: str, kind: str) -> list[str]:
    """The paths (relative to RUN_DIR) a job of ``kind`` named ``name`` writes, from its kind's ``products``:
    the plan pass records them in each job, so that integrity checks and ``--reuse`` know them."""
    if JOB_KINDS[kind].products == "report":
        return [REPORT_JSON, REPORT_MD, CURVES_PNG]
    if JOB_KINDS[kind].products == "modules":  # one model per student module: ``module_product``
        raise ValueError(f"a {kind} job writes one product per module: spell them with module_product")
    return [f"{JOBS_DIR}/{job_dir_name(name)}/{MODEL_FILE}"]


def module_product(name: str, module: int) -> str:
    """Where a job that trains one model per student module (the fused m2mKD job) writes module ``module``."""
    return f"{JOBS_DIR}/{job_dir_name(name)}/module-{module}.safetensors"


def writes_only_its_folder(job: Job) -> bool:
    """Whether every output of ``job`` lies in its own folder (so the folder, copied whole, is the finished job)."""
    return all(out.startswith(f"{JOBS_DIR}/{job.dir}/") for out in job.outputs)


@dataclass(frozen=True)
class RunDir:
    """Paths and records of one run directory; nothing here trains or schedules."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def plan_file(self) -> Path:
        return self.root / PLAN_FILE

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def jobs(self) -> Path:
        return self.root / JOBS_DIR

    def image_cache(self, key: str) -> Path:
        """A pre-resized copy of an image folder's training images (``device_folder.load_cache``)."""
        return self.root / CACHE_DIR / f"images-{key}.safetensors"

    def job_dir(self, job: Job | str) -> Path:
        return self.jobs / job_dir_name(job)

    def product(self, job: Job | str) -> Path:
        return self.job_dir(job) / MODEL_FILE

    def checkpoint(self, job: Job | str) -> Path:
        return self.job_dir(job) / CHECKPOINT_DIR

    def log(self, job: Job | str) -> Path:
        return self.job_dir(job) / LOG_FILE

    def worker_file(self, job: Job | str) -> Path:
        return self.job_dir(job) / WORKER_FILE

    def done_file(self, job: Job | str) -> Path:
        return self.job_dir(job) / DONE_FILE

    def report_file(self, name: str = REPORT_JSON) -> Path:
        return self.root / name

    # ------------------------------------------------------------------------------------------------ records

    def done(self, job: Job | str) -> dict[str, Any] | None:
        """The job's done record, or None when it has none (or an unreadable one)."""
        record = read_json(self.done_file(job))
        return record if isinstance(record, dict) else None

    def write_done(self, job: Job, record: dict[str, Any]) -> dict[str, Any]:
        """Record ``job`` as finished, with the size and sha256 of its products; written last, atomically."""
        record = {**record, "products": integrity.describe(self.root, job.outputs)}
        atomic_write_json(self.done_file(job), record)
        return record

    def done_problem(self, job: Job) -> str | None:
        """None when ``job`` is finished with its current hash and its products verify; else why not, in one line."""
        if not self.done_file(job).is_file():
            return NOT_FINISHED
        record = self.done(job)
        if record is None:
            return f"{self.done_file(job)} cannot be read"
        if record.get("hash") != job.hash:
            return OTHER_HASH
        return integrity.problem(self.root, job.outputs, record.get("products"))

    def is_done(self, job: Job) -> bool:
        return self.done_problem(job) is None

    def metrics(self, job: Job | str) -> list[dict[str, Any]]:
        """Every complete record of the job's training log (empty when it has none)."""
        return read_jsonl(self.job_dir(job) / METRICS_FILE)

    def latest_metrics(self, job: Job | str) -> dict[str, Any] | None:
        """The last complete record of the job's training log, reading only its tail."""
        return last_jsonl(self.job_dir(job) / METRICS_FILE)

    def report(self) -> dict[str, Any] | None:
        """report.json of a finished run, or None."""
        report = read_json(self.report_file())
        return report if isinstance(report, dict) else None
