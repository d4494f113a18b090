"""A distillation plan is data: a DAG of jobs, written to ``RUN_DIR/plan.yaml`` and read back unchanged.

Every job has a content hash over its kind, its config, the run settings it reads (``JobKind.settings``) and the
hashes of the jobs it reads from. Executing a plan skips jobs whose recorded hash matches, so a killed run resumes
where it stopped, an edited job invalidates itself and its dependents only, and a new student for the same teacher
keeps the trained teacher.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monomod.errors import MonomodError, shorten
from monomod.safe import check_links, inside, load_yaml, read_yaml

PLAN_FILE = "plan.yaml"
PLAN_VERSION = 1
# Training-config keys that say how a job is run, not what it computes: they stay out of job hashes, so changing
# how often a job checkpoints or logs, or where it runs, never re-runs a finished job; and a checkpoint resumes
# under new values of them (``monomod.runtime.checkpoint``). The one list of them.
UNHASHED_TRAIN_KEYS = ("log_every", "checkpoint_every", "checkpoint_minutes", "compile", "device")
# Run settings of the same sort: ``threads`` (torch threads of every job) changes only the rounding of sums, not
# what a job computes, so a plan compiled on a machine with other cores, or run again with ``--threads``, keeps its
# finished jobs (and ``--reuse`` works across machines). A plan that asks for a count computes every job with it
# on every executor (bitwise equal weights); one that asks for none (``auto``) lets each executor allot its share
# of the cores, and each job records the count it used (``done.json``: ``used``).
UNHASHED_SETTINGS = ("threads",)
# Of the recorded partition (settings key ``partition``) only the cuts say what a job computes; cost, tolerance and
# balance say how the cuts were found, so they stay out of job hashes.
HASHED_PARTITION_KEYS = ("cuts",)


# The run settings each kind of job reads; a job's hash covers only these (None: all of them). Narrow scopes let a
# changed student keep the trained teacher and meta model. tests/test_runtime.py runs every kind of job and fails when
# one reads a setting outside its scope, so a scope cannot silently go stale.
_DISTILL_DATA = ("distill_data", "img_size", "in_chans", "distill_num_classes")
# ``input_path`` (recorded only when asked for other than auto) says where every training job augments its batches
_TEACHER_SETTINGS = ("teacher", "weights", "pretrained", *_DISTILL_DATA, "monomod", "input_path")
_STUDENT_SETTINGS = ("student", "student_preset", "student_overrides", "student_revision", "modules", "seed")
_M2MKD_SETTINGS = (*_TEACHER_SETTINGS, *_STUDENT_SETTINGS, "meta", "partition", "teacher_training")
# ``partition`` (the recorded cuts) is read by every job that uses the teacher's modules: meta and incubate here,
# m2mkd, assemble, finetune and evaluate through their full scope, the teacher that assembles incubated modules
# through its inputs' hashes. The baseline and a teacher trained end to end never see it.


@dataclass(frozen=True)
class JobKind:
    """One kind of job, in the one table of them (``JOB_KINDS``): what runs it, what it reads and trains with,
    and what it writes. The plan pass, the runtime, the option spec and the CLI all read this table, so a new kind
    of job is one entry here (and its runner)."""

    name: str
    runner: str  # "module:function", called as function(ctx, job) by ``monomod.runtime`` (imported there)
    settings: tuple[str, ...] | None  # the run settings it reads: its hash covers only these (None: all of them)
    budget: str | None  # the ``budgets.<kind>`` (and preset steps) it trains with; None: it does not train
    distill: bool = False  # trains on the distillation data (``--distill-data``), not the task's
    teacher_side: bool = False  # seeded by ``--teacher-seed`` when given (the teacher, its meta model, incubation)
    products: str = "model"  # what it writes, by name: ``RunDir.outputs`` spells the paths

    @property
    def trains(self) -> bool:
        """Under torchrun every rank runs a job that trains; the others run on rank 0 alone."""
        return self.budget is not None


_RUNNERS = "monomod.runtime.runners"
JOB_KINDS: dict[str, JobKind] = {kind.name: kind for kind in (
    JobKind("teacher", f"{_RUNNERS}:run_teacher", _TEACHER_SETTINGS, "teacher", distill=True, teacher_side=True),
    JobKind("meta", f"{_RUNNERS}:run_meta", (*_TEACHER_SETTINGS, "modules", "partition"), "meta", distill=True,
            teacher_side=True),
    JobKind("incubate", f"{_RUNNERS}:run_incubate", (*_TEACHER_SETTINGS, "modules", "meta", "partition"), "incubate",
            distill=True, teacher_side=True),
    # m2mKD trains on the distillation data alone: runs that fine-tune on other labelled data (few shots) share it
    JobKind("m2mkd", f"{_RUNNERS}:run_m2mkd", _M2MKD_SETTINGS, "m2mkd", distill=True),
    # the K m2mKD jobs as one (``--m2mkd fused``, ``monomod.passes.fuse``): one student per module, one batch stream
    JobKind("m2mkd-fused", "monomod.runtime.fused:run_m2mkd_fused", _M2MKD_SETTINGS, "m2mkd", distill=True,
            products="modules"),
    JobKind("assemble", f"{_RUNNERS}:run_assemble", None, None),
    JobKind("finetune", f"{_RUNNERS}:run_finetune", None, "finetune"),
    # the baseline trains with the fine-tune budget, so that the comparison with m2mKD stays fair
    JobKind("baseline", f"{_RUNNERS}:run_baseline", (*_STUDENT_SETTINGS, "data", "ood", "num_classes",
                                                     *_TEACHER_SETTINGS), "finetune"),
    JobKind("evaluate", "monomod.runtime.evaluation:run_evaluate", None, None, products="report"),
)}
DISTILL_KINDS = frozenset(name for name, kind in JOB_KINDS.items() if kind.distill)
BUDGET_KINDS = tuple(dict.fromkeys(kind.budget for kind in JOB_KINDS.values() if kind.budget))


def job_name_pattern() -> re.Pattern[str]:
    """``kind`` or ``kind:i`` for a kind of ``JOB_KINDS``: a job name becomes a folder, so nothing else is allowed."""
    kinds = "|".join(re.escape(kind) for kind in JOB_KINDS)
    return re.compile(rf"({kinds})(:(0|[1-9][0-9]{{0,5}}))?")


@dataclass(frozen=True)
class PartitionRecord:
    """Where the teacher is cut, as the plan records it (settings key ``partition``): jobs replay these cuts through
    the partition pass's manual path and never search again. Editing the cuts in plan.yaml re-runs the jobs that
    use the teacher's modules, and only those."""

    cuts: tuple[str, ...]  # where each module after the first begins: module paths or fx node names
    cost: str = "flops"  # what the modules are balanced by
    tolerance: float | None = None  # the imbalance the search allowed (None: not recorded)
    balance: float | None = None  # max/mean cost of the modules (1.0: perfect)

    def to_dict(self) -> dict[str, Any]:
        return {"cuts": list(self.cuts), "cost": self.cost, "tolerance": self.tolerance, "balance": self.balance}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> PartitionRecord:
        """The record of a plan's settings; one line naming the fix when it is missing or malformed."""
        record = settings.get("partition")
        if record is None:
            raise MonomodError("the plan records no partition (it predates recorded cuts)",
                               "recompile it: monomod convert ... --force")
        cuts = record.get("cuts") if isinstance(record, dict) else None
        if not isinstance(cuts, list) or not all(isinstance(c, str) and c for c in cuts):
            raise MonomodError(f"plan: partition.cuts must be a list of module paths or node names, got "
                               f"{shorten(repr(cuts))}", "fix the edit, e.g. cuts: [blocks.3, blocks.6]")
        return cls(cuts=tuple(cuts), cost=record.get("cost", "flops"), tolerance=record.get("tolerance"),
                   balance=record.get("balance"))


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

    def train_configs(self) -> list[dict[str, Any]]:
        """The training configs this job trains with: its own, or its members' (the fused m2mKD job)."""
        configs = (self.config, *self.config.get("members", ()))
        return [c["train"] for c in configs if isinstance(c.get("train"), dict)]

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
                "kind": job.kind, "config": _hashed_config(job.config), "settings": _digest(_hashed_settings(self.settings_of(job.kind))),
                "inputs": [hashes[name] for name in job.inputs],
            })
            hashes[job.name] = job.hash

    def settings_of(self, kind: str) -> dict[str, Any]:
        """The run settings a job of ``kind`` reads (its ``JobKind.settings``)."""
        scope = JOB_KINDS[kind].settings if kind in JOB_KINDS else None
        return dict(self.settings) if scope is None else {k: self.settings[k] for k in scope if k in self.settings}

    def _check(self) -> None:
        """Refuse, before anything runs, a plan whose jobs could write outside RUN_DIR or read from nowhere."""
        seen: set[str] = set()
        names = {job.name for job in self.jobs}
        pattern = job_name_pattern()
        for job in self.jobs:
            if job.kind not in JOB_KINDS:
                raise MonomodError(f"job {shorten(job.name)!r} has unknown kind {shorten(job.kind)!r}",
                                   f"use one of {', '.join(JOB_KINDS)}")
            match = pattern.fullmatch(job.name)
            if match is None or match.group(1) != job.kind:
                raise MonomodError(f"job name {shorten(job.name)!r} is not {job.kind!r} or '{job.kind}:<index>'",
                                   "job names become folders of RUN_DIR: recompile the plan with `monomod convert`")
            for out in job.outputs:
                if not _inside_run_dir(out):
                    raise MonomodError(f"job {job.name!r} writes {shorten(str(out))!r}, outside RUN_DIR",
                                       "outputs are paths relative to RUN_DIR, without '..': recompile the plan")
            if job.name in seen:
                raise MonomodError(f"the plan names job {job.name!r} twice", "give every job a unique name")
            unknown = [name for name in job.inputs if name not in names]
            if unknown:
                raise MonomodError(f"job {job.name!r} reads from {shorten(', '.join(map(str, unknown)))}, which is no "
                                   "job of this plan", f"name jobs of the plan: {', '.join(sorted(names))}")
            missing = [name for name in job.inputs if name not in seen]
            if missing:
                raise MonomodError(f"job {job.name!r} reads from {missing}, which do not run before it", "list jobs in dependency order")
            seen.add(job.name)

    def check_paths(self, run_dir: str | Path) -> None:
        """Every folder and output of every job resolves inside RUN_DIR, and no symbolic link anywhere under it
        leads out (a planted ``log.txt`` link would have the runtime append to a file elsewhere)."""
        root = Path(run_dir).resolve()
        for job in self.jobs:
            for rel in (f"jobs/{job.dir}", *job.outputs):
                target = (root / rel).resolve()
                if not inside(root, target):
                    raise MonomodError(f"job {job.name!r} would write {shorten(str(target))}, outside {shorten(str(root))}",
                                       "remove the symbolic link that leads out of RUN_DIR, or recompile the plan")
        check_links(root)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "settings": self.settings, "jobs": [j.to_dict() for j in self.jobs]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION or "jobs" not in data:
            raise MonomodError("not a monomod plan (missing version or jobs)", "compile one with `monomod convert ... --dry-run`")
        if not isinstance(data["jobs"], list) or not isinstance(data.get("settings") or {}, dict):
            raise MonomodError("plan: jobs must be a list and settings a mapping", "recompile the plan with `monomod convert`")
        jobs = [_job_from_dict(j, i) for i, j in enumerate(data["jobs"])]
        return cls(settings=dict(data.get("settings") or {}), jobs=jobs, version=data["version"])

    @classmethod
    def from_yaml(cls, text: str | bytes, source: str = "plan") -> Plan:
        """The plan in a YAML text, read by the one loader with limits (``monomod.safe.load_yaml``)."""
        return cls.from_dict(load_yaml(text, source, "fix the edit or recompile the plan"))

    def save(self, run_dir: str | Path) -> Path:
        from monomod.io import atomic_write_text

        path = Path(run_dir) / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_yaml())
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> Plan:
        path = Path(run_dir) / PLAN_FILE
        if not path.is_file():
            raise MonomodError(f"{str(run_dir)!r} holds no {PLAN_FILE}", "pass the RUN_DIR of a `monomod convert` run")
        return cls.from_dict(read_yaml(path, shorten(str(path)), "fix the edit or recompile the plan"))


def _job_from_dict(entry: Any, index: int) -> Job:
    """One job of a plan file, its fields checked for type so an edit gives one line, not a traceback."""
    if not isinstance(entry, dict):
        raise MonomodError(f"plan: job #{index + 1} is {shorten(repr(entry))}, not a mapping with name, kind, inputs, "
                           "outputs and config", "write each job as a mapping (see `monomod plan show RUN_DIR --format yaml`)")
    name, kind = entry.get("name"), entry.get("kind")
    if not isinstance(name, str) or not isinstance(kind, str):
        raise MonomodError(f"plan: job #{index + 1} has no name or kind ({shorten(repr(name))}, {shorten(repr(kind))})",
                           "give every job a name and a kind as strings")
    inputs, outputs, config = entry.get("inputs", []), entry.get("outputs", []), entry.get("config") or {}
    for field_name, value in (("inputs", inputs), ("outputs", outputs)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MonomodError(f"plan: job {shorten(name)!r}: {field_name} must be a list of strings, got {shorten(repr(value))}",
                               "fix the edit or recompile the plan")
    if not isinstance(config, dict):
        raise MonomodError(f"plan: job {shorten(name)!r}: config must be a mapping", "fix the edit or recompile the plan")
    return Job(name=name, kind=kind, inputs=list(inputs), outputs=list(outputs), config=dict(config))


def _inside_run_dir(path: Any) -> bool:
    """A relative path that stays inside the folder it is joined to (no '..' ends up above it, no drive or root)."""
    if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
        return False
    normal = os.path.normpath(path)
    return not (os.path.isabs(path) or normal == "." or normal == ".." or normal.startswith(".." + os.sep))


def _hashed_settings(settings: dict[str, Any]) -> dict[str, Any]:
    if set(UNHASHED_SETTINGS) & set(settings):
        settings = {k: v for k, v in settings.items() if k not in UNHASHED_SETTINGS}
    record = settings.get("partition")
    if not isinstance(record, dict):
        return settings
    return {**settings, "partition": {k: v for k, v in record.items() if k in HASHED_PARTITION_KEYS}}


def _hashed_config(config: dict[str, Any]) -> dict[str, Any]:
    train = config.get("train")
    if not isinstance(train, dict) or not set(UNHASHED_TRAIN_KEYS) & set(train):
        return config
    return {**config, "train": {k: v for k, v in train.items() if k not in UNHASHED_TRAIN_KEYS}}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
