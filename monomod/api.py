"""The user-facing entry points: convert (compile the options with ``monomod.compiler``, then execute), run a
RUN_DIR, and read a finished run and its student back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from monomod.errors import MonomodError
from monomod.plan import Plan
from monomod.rundir import RunDir
from monomod.runtime.context import RunContext

if TYPE_CHECKING:
    from monomod.passes.export import Exportable
    from monomod.runtime.execute import JobStatus


Announce = Callable[[Plan, Path], None]


def convert(teacher: str, *, to: str, modules: int | None = None, out: str | Path, force: bool = False,
            reuse: list[str | Path] | None = None, **options: Any) -> "Run":
    """Compile and execute a whole m2mKD conversion, like ``monomod convert``; returns the finished Run.

    ``options`` are the fields of ``monomod.compiler.ConvertOptions``, one per convert option (data, preset, meta,
    alpha, cuts, cost, tolerance, checkpoint_every, ...); ``reuse`` lists earlier RUN_DIRs whose finished jobs with the same
    hash are copied instead of run again. ``teacher`` is the caller's own choice, so a factory runs without asking.
    """
    from monomod.compiler import compile_options, convert_options

    converted = convert_options(dict(options, teacher=teacher, student=to, modules=modules))
    check_reuse(reuse)
    plan = compile_options(converted)
    return execute_plan(plan, out, force=force, reuse=reuse, loader_workers=converted.loader_workers)


def check_reuse(reuse: Sequence[str | Path] | None) -> None:
    """Each ``--reuse`` folder is a run whose plan reads (checked before compiling, in a dry run too)."""
    from monomod.runtime.execute import check_reuse_sources

    check_reuse_sources(list(reuse or []))


def execute_plan(plan: Plan, out: str | Path, *, force: bool = False, reuse: Sequence[str | Path] | None = None,
                 on_reuse: Callable[[list[str]], None] | None = None, announce: Announce | None = None,
                 **execute_options: Any) -> "Run":
    """Write a compiled ``plan`` to RUN_DIR ``out`` and execute it, holding RUN_DIR's lock from the first write to
    the last job: the second half of ``convert``. ``reuse`` copies jobs earlier runs finished with the same hash
    (``on_reuse`` is told which); ``announce(plan, run_dir)`` is called just before the jobs start;
    ``execute_options`` go to ``monomod.runtime.execute.execute`` (executor, workers, console, ...)."""
    from monomod.runtime.execute import execute, prepare_run_dir, reuse_finished
    from monomod.runtime.lock import run_dir_lock

    with run_dir_lock(out):
        run_dir = prepare_run_dir(plan, out, force=force)
        if reuse:
            reused = reuse_finished(plan, run_dir, list(reuse))
            if on_reuse is not None:
                on_reuse(reused)
        if announce is not None:
            announce(plan, run_dir)
        statuses = execute(plan, run_dir, **execute_options)
    return Run(path=run_dir, plan=plan, statuses=statuses)


def run(run_dir: str | Path, *, trust_code: bool = False, checkpoint_every: int | None = None,
        checkpoint_minutes: float | None = None, threads: int | None = None, only: Sequence[str] | None = None,
        announce: Announce | None = None, **execute_options: Any) -> "Run":
    """Execute (or resume) RUN_DIR's plan, like ``monomod run``. A teacher the plan file names as Python code
    (``pkg.module:factory``) runs only with ``trust_code=True``. ``threads`` replaces the plan's threads per job
    (finished jobs are kept: it is not part of their hashes); ``only`` runs those jobs alone; ``announce`` and
    ``execute_options`` as for ``execute_plan``. Everything a plan file can be refused for is refused before
    ``announce``."""
    from monomod.compiler import set_checkpointing
    from monomod.runtime.execute import check_train_configs, execute
    from monomod.runtime.lock import run_dir_lock

    path = Path(run_dir)
    opened = load_run(path, trust_code=trust_code)
    plan = opened.plan
    for name in only or ():
        plan.job(name)  # unknown names fail here, before any work
    opened.check_code()
    check_train_configs(plan)  # an edited plan.yaml fails here, before anything is announced
    plan.check_paths(path)
    with run_dir_lock(path):
        changed = set_checkpointing(plan, checkpoint_every, checkpoint_minutes)
        if threads is not None and plan.settings.get("threads") != threads:
            plan.settings["threads"], changed = threads, True
        if changed:
            plan.save(path)  # workers read the plan from RUN_DIR; the hashes stay the same
        if announce is not None:
            announce(plan, path)
        statuses = execute(plan, path, only=list(only) if only else None, **execute_options)
    return Run(path=path, plan=plan, trust_code=trust_code, statuses=statuses)


class DeployedStudent(nn.Module):
    """A trained student that takes raw images in [0, 1], shaped ``(B, *input_size)``, and normalises them itself."""

    def __init__(self, student: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], input_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.student = student
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student((images - self.mean) / self.std)


@dataclass
class Run:
    """A RUN_DIR: its plan, which jobs are finished, and the report once there is one."""

    path: Path
    plan: Plan
    trust_code: bool = False  # whether a teacher the plan names as code may be built (see frontend.check_trusted)
    statuses: list[JobStatus] = field(default_factory=list)  # what the last execution did with each job

    @property
    def report(self) -> dict[str, Any] | None:
        return RunDir(self.path).report()

    def status(self) -> dict[str, bool]:
        return {job.name: RunDir(self.path).is_done(job) for job in self.plan.jobs}

    def check_code(self) -> None:
        """Refuse to build any model of this run while its plan.yaml names Python code (teacher or student) and
        ``trust_code`` is off: a RUN_DIR may come from someone else, and building a model imports that code. Every
        path that builds a model from a RUN_DIR (``student``, ``run_exportables``, ``run``) passes here."""
        from monomod.frontend import check_trusted

        check_trusted(self.plan.settings, str(RunDir(self.path).plan_file), self.trust_code)

    def student(self, which: str = "finetune") -> DeployedStudent:
        """The fine-tuned student (``which="assemble"`` for the distilled one before fine-tuning, ``"baseline"``)."""
        self.check_code()
        problem = RunDir(self.path).done_problem(self.plan.job(which))
        if problem is not None:
            raise MonomodError(f"job {which!r} of {str(self.path)!r}: {problem}", f"run it first: monomod run {self.path}")
        ctx = RunContext(run_dir=self.path, plan=self.plan)
        model = ctx.new_student(self.plan.settings["seed"]) if which == "baseline" else ctx.assembled_student()
        model.load_state_dict(ctx.product(which))
        s = self.plan.settings
        data = ctx.data
        return DeployedStudent(model, data.mean, data.std, (s["in_chans"], s["img_size"], s["img_size"])).eval()


def load_run(run_dir: str | Path, *, trust_code: bool = False) -> Run:
    """A RUN_DIR opened for reading: its plan loaded with limits, and refused when a symbolic link under it leads
    out (its products would be read from elsewhere). Models are built only through ``Run.check_code``."""
    from monomod.safe import check_links

    path = Path(run_dir)
    plan = Plan.load(path)
    check_links(path)
    return Run(path=path, plan=plan, trust_code=trust_code)


def load_student(run_dir: str | Path, *, trust_code: bool = False) -> DeployedStudent:
    """The run's fine-tuned student, ready for raw [0, 1] images of shape ``(B, *student.input_size)``."""
    return load_run(run_dir, trust_code=trust_code).student()


def run_exportables(run_dir: str | Path, what: Sequence[str] = ("stages", "student"), source: str = "finetune", *,
                    trust_code: bool = False) -> list[Exportable]:
    """The modules of a finished RUN_DIR to export (``monomod.passes.export`` says what each kind is); a teacher the
    plan names as Python code is built only with ``trust_code``."""
    from monomod.passes import export as ex

    if source not in ("finetune", "assemble"):
        raise MonomodError(f"unknown export source {source!r}", "use finetune or assemble")
    run = load_run(run_dir, trust_code=trust_code)
    run.check_code()
    items: list[Exportable] = []
    common = {"source": f"{run.path.name}:{source}", "teacher": run.plan.settings["teacher"],
              "student": run.plan.settings["student"]}
    if "stages" in what or "student" in what:
        deployed = run.student(source)  # raises a one-line MonomodError when the job has not finished
        normalisation = {"mean": deployed.mean.flatten().tolist(), "std": deployed.std.flatten().tolist()}
        if "stages" in what:
            items += ex.student_stage_exportables(deployed.student, deployed.input_size, common, normalisation)
        if "student" in what:
            image = ex.TensorSpec("images", ("B", *deployed.input_size), draw="uniform")
            logits = ex.output_specs(deployed, (image,), ["logits"])
            items.append(ex.Exportable("student", deployed, [image], logits, {
                **common, "kind": "student", "input_range": "[0, 1] raw images, normalised inside",
                "normalisation": normalisation}))
    if "teacher" in what:
        ctx = RunContext(run_dir=run.path, plan=run.plan)
        partition = ctx.partition("cpu")  # the adapted teacher's own weights, cut where the plan records
        items += ex.teacher_exportables(partition, {**common, "source": f"{run.path.name}:teacher"})
    return items
