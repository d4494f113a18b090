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
from pathlib import Path
from typing import Any

from monomod import integrity
from monomod.io import atomic_write_json, last_jsonl, read_json, read_jsonl
from monomod.plan import PLAN_FILE, Job

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
        return self.root / "jobs"

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
            return "not finished"
        record = self.done(job)
        if record is None:
            return f"{self.done_file(job)} cannot be read"
        if record.get("hash") != job.hash:
            return "finished with another hash"
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
