"""A distillation plan is data: a DAG of jobs, written to ``RUN_DIR/plan.yaml`` and read back unchanged.

Every job has a content hash over its kind, its config, the run settings it reads (``SETTINGS_SCOPE``) and the
hashes of the jobs it reads from. Executing a plan skips jobs whose recorded hash matches, so a killed run resumes
where it stopped, an edited job invalidates itself and its dependents only, and a new student for the same teacher
keeps the trained teacher.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monomod.errors import MonomodError

PLAN_FILE = "plan.yaml"
PLAN_VERSION = 1
JOB_KINDS = ("teacher", "meta", "incubate", "m2mkd", "assemble", "finetune", "baseline", "evaluate")

# The run settings each kind of job reads; a job's hash covers only these (None: all of them). Narrow scopes let a
# changed student keep the trained teacher and meta model. tests/test_runtime.py runs every kind of job and fails when
# one reads a setting outside its scope, so a scope cannot silently go stale.
_DISTILL_DATA = ("distill_data", "img_size", "in_chans", "distill_num_classes")
_TEACHER_SETTINGS = ("teacher", "teacher_kwargs", "weights", "pretrained", *_DISTILL_DATA, "monomod")
SETTINGS_SCOPE: dict[str, tuple[str, ...] | None] = {
    "teacher": _TEACHER_SETTINGS,
    "meta": (*_TEACHER_SETTINGS, "modules"),
    "incubate": (*_TEACHER_SETTINGS, "modules", "meta"),
    "baseline": ("student", "student_preset", "student_overrides", "modules", "seed", "data", "ood", "num_classes",
                 *_TEACHER_SETTINGS),
}


@dataclass
class Job:
    """One unit of work: reads its inputs' outputs, writes its own outputs under ``RUN_DIR/jobs/<dir>``."""

    name: str  # "teacher", "m2mkd:2", ...
    kind: str  # one of JOB_KINDS
    inputs: list[str]  # names of the jobs it depends on
    outputs: list[str]  # paths relative to RUN_DIR
    config: dict[str, Any]
    hash: str = ""

    @property
    def dir(self) -> str:
        """Directory name under RUN_DIR/jobs (no ':' so it is portable)."""
        return self.name.replace(":", "-")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "config": self.config, "hash": self.hash}


@dataclass
class Plan:
    """Jobs in a topological order plus the run-wide settings every job sees."""

    settings: dict[str, Any]
    jobs: list[Job] = field(default_factory=list)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        self._check()
        self.rehash()

    def job(self, name: str) -> Job:
        for job in self.jobs:
            if job.name == name:
                return job
        raise MonomodError(f"the plan has no job {name!r}", f"pick one of {', '.join(j.name for j in self.jobs)}")

    def dependents(self, name: str) -> list[str]:
        """Jobs that read, directly or not, from ``name`` (in plan order)."""
        affected = {name}
        for job in self.jobs:
            if affected.intersection(job.inputs):
                affected.add(job.name)
        return [j.name for j in self.jobs if j.name in affected and j.name != name]

    def rehash(self) -> None:
        """Recompute every hash from configs; a job's hash covers its inputs' hashes, so edits propagate."""
        hashes: dict[str, str] = {}
        for job in self.jobs:
            job.hash = _digest({
                "kind": job.kind, "config": job.config, "settings": _digest(self.settings_of(job.kind)),
                "inputs": [hashes[name] for name in job.inputs],
            })
            hashes[job.name] = job.hash

    def settings_of(self, kind: str) -> dict[str, Any]:
        """The run settings a job of ``kind`` reads (see ``SETTINGS_SCOPE``)."""
        scope = SETTINGS_SCOPE.get(kind)
        return dict(self.settings) if scope is None else {k: self.settings[k] for k in scope if k in self.settings}

    def _check(self) -> None:
        seen: set[str] = set()
        for job in self.jobs:
            if job.kind not in JOB_KINDS:
                raise MonomodError(f"job {job.name!r} has unknown kind {job.kind!r}", f"use one of {', '.join(JOB_KINDS)}")
            if job.name in seen:
                raise MonomodError(f"the plan names job {job.name!r} twice", "give every job a unique name")
            missing = [name for name in job.inputs if name not in seen]
            if missing:
                raise MonomodError(f"job {job.name!r} reads from {missing}, which do not run before it", "list jobs in dependency order")
            seen.add(job.name)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "settings": self.settings, "jobs": [j.to_dict() for j in self.jobs]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION or "jobs" not in data:
            raise MonomodError("not a monomod plan (missing version or jobs)", "compile one with `monomod convert ... --dry-run`")
        jobs = [Job(name=j["name"], kind=j["kind"], inputs=list(j.get("inputs", [])), outputs=list(j.get("outputs", [])),
                    config=dict(j.get("config") or {})) for j in data["jobs"]]
        return cls(settings=dict(data.get("settings") or {}), jobs=jobs, version=data["version"])

    @classmethod
    def from_yaml(cls, text: str) -> Plan:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MonomodError(f"plan is not valid YAML ({str(e).splitlines()[0]})", "fix the edit or recompile the plan") from None
        return cls.from_dict(data)

    def save(self, run_dir: str | Path) -> Path:
        from monomod.runtime.checkpoint import atomic_write_text

        path = Path(run_dir) / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_yaml())
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> Plan:
        path = Path(run_dir) / PLAN_FILE
        if not path.is_file():
            raise MonomodError(f"{str(run_dir)!r} holds no {PLAN_FILE}", "pass the RUN_DIR of a `monomod convert` run")
        return cls.from_yaml(path.read_text())


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
