"""The ``monomod`` command line."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click
from rich.console import Console

from monomod.compiler.options import COSTS, EXECUTORS, SPEC, TOLERANCE
from monomod.runtime.executors import DEFAULT_PROCESS_WORKERS
from monomod.errors import MonomodError, shorten
from monomod.rundir import JobState
from monomod.safe import rich_text

out = Console()
err = Console(stderr=True)
DONE_MARK = f"[green]{JobState.DONE}[/green]"


class _Cli(click.Group):
    """Turns MonomodError into one line on stderr, never a traceback. Exit codes: 2 for bad input (nothing ran),
    1 for a job that ran and failed (``JobFailed``; finished jobs are kept), 0 for success."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MonomodError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:  # an unwritable or read-only folder, a path too long for the file system, ...
            where = f" {shorten(str(e.filename))!r}" if e.filename else ""
            click.echo(f"error: cannot use{where} ({e.strerror or e}); choose a writable path with a shorter name",
                       err=True)
            ctx.exit(2)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="monomod")
def cli() -> None:
    """Compile a monolithic vision transformer into a modular student by module-to-module distillation.

    \b
    monomod inspect vit_base --modules 8      # how the teacher splits into modules
    monomod student nac --modules 4           # a student's stages, interfaces and costs
    """


def _convert_options_from_spec(command):
    """One click option per flag of the option spec (``monomod.compiler.options.OPTIONS``), each passed under
    its option's name."""
    from monomod.compiler.options import click_options

    return click_options(command)


def _executor_options(command):
    """--executor, --workers, --ray-address, --max-retries and --loader-workers, handed to the command as one
    ``run_options`` dict."""
    import functools

    @functools.wraps(command)
    def wrapper(*args, executor: str, workers: int | None, ray_address: str | None, max_retries: int,
                loader_workers: int | None, **kwargs):
        options = {"executor": executor, "workers": workers, "ray_address": ray_address, "max_retries": max_retries,
                   "loader_workers": loader_workers}
        return command(*args, run_options=options, **kwargs)

    options = [
        click.option("--executor", type=click.Choice(EXECUTORS), default=EXECUTORS[0], show_default=True,
                     help="Where jobs run: this process one by one, a process pool on this machine, or a Ray cluster."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help=f"Jobs in flight at once (process: default {DEFAULT_PROCESS_WORKERS} worker processes, each "
                          "reused for job after job; "
                          "ray: default the plan's widest level, capped at the cluster's CPUs / the plan's threads)."),
        click.option("--ray-address", help="Ray cluster to join: auto or HOST:PORT (default: start a local Ray)."),
        click.option("--max-retries", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Retry a failed job (exception or killed worker) up to N times."),
        click.option("--loader-workers", type=click.IntRange(min=0), default=None,
                     help="Data-loader processes per job (default: the job's cores, at most 8, for image folders; "
                          "0 for in-memory data). Never changes results, so never a job's hash."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _run_dir_options(command):
    """--trust-code, --checkpoint-every, --checkpoint-minutes and --threads, shared by convert and run."""
    options = [
        click.option("--trust-code", is_flag=True,
                     help="Allow a recipe or plan.yaml to name Python code (pkg.module:factory) as the teacher."),
        click.option("--checkpoint-every", type=click.IntRange(min=0), default=None,
                     help="Checkpoint training jobs every N steps too (0: by time only). Not part of job hashes."),
        click.option("--checkpoint-minutes", type=click.FloatRange(min=0), default=None,
                     help="Checkpoint training jobs every M minutes (default 10; 0: by steps only). Not part of job hashes."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Torch threads of every job, whichever executor runs it: the same count gives the same numbers "
                          "on every executor (default: auto, each job gets its share of the cores where it runs, never "
                          "more than the cores jobs side by side share; done.json records the count it used). "
                          "Recorded in plan.yaml, not part of job hashes."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("model")
@click.option("-k", "--modules", "k", type=int, default=4, show_default=True, help="Number of contiguous modules.")
@click.option("--cost", type=click.Choice(COSTS), default=SPEC["cost"].default, show_default=True,
              help=SPEC["cost"].help)
@click.option("--tolerance", type=float, default=TOLERANCE, show_default=True, help=SPEC["tolerance"].help)
@click.option("--cuts", help="Manual cut points, comma-separated: where each new module begins (e.g. blocks.3,blocks.6).")
@click.option("--img-size", type=int, help="Input resolution (default: the model's own).")
@click.option("--in-chans", type=int, help="Input channels (default: the model's own).")
@click.option("--num-classes", type=int, help="Classifier size (default: the model's own).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local .safetensors or .pth state dict to load.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "model-explorer"]), default="table",
              show_default=True, help="json: modules, nodes and edges (schema in the README); model-explorer: "
              "Google Model Explorer's graph and node-data files, written to --out-dir.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Where --format model-explorer writes MODEL.graph.json, MODEL.modules.json, MODEL.flops.json.")
@click.option("--dot", type=click.Path(dir_okay=False), help="Also write the partition graph as Graphviz DOT.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write the partition explorer: one offline page, node by node, re-cut by hand.")
def inspect(
    model: str, k: int, cost: str, tolerance: float, cuts: str | None, img_size: int | None, in_chans: int | None,
    num_classes: int | None, weights: str | None, fmt: str, out_dir: str, dot: str | None, html_path: str | None,
) -> None:
    """Trace MODEL and show how it splits into K contiguous teacher modules.

    MODEL is a timm name or alias (vit_base, deit_small, resnet50), or pkg.module:factory.

    \b
    Examples:
      monomod inspect vit_base --modules 8
      monomod inspect vit_tiny --img-size 32 --modules 4 --format json
      monomod inspect deit_small --cuts blocks.4,blocks.8 --html deit.html --dot deit.dot
      monomod inspect vit_base --modules 8 --format model-explorer --out-dir me/
    """
    from monomod import report
    from monomod.compiler import check_values
    from monomod.frontend import load_model
    from monomod.passes.partition import partition
    from monomod.passes.trace import trace

    check_values({"modules": k, "tolerance": tolerance, "cuts": cuts, "img_size": img_size, "in_chans": in_chans,
                  "num_classes": num_classes})
    started = time.perf_counter()
    with err.status(f"tracing {rich_text(model)} ...", spinner="dots"):
        net = load_model(model, weights=weights, img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                         device=None if weights else "meta")
        example = _example_input(net, img_size, in_chans)
        traced = trace(net, example, name=model)
        part = partition(traced, None if cuts else k, cost=cost, cuts=_split(cuts), tolerance=tolerance)
    elapsed = time.perf_counter() - started
    if dot:
        _write_atomic(dot, report.partition_dot(part))
    if html_path:
        _write_atomic(html_path, report.partition_html(part))
    if fmt == "json":
        click.echo(report.partition_json(part))
        return
    if fmt == "model-explorer":
        _write_model_explorer(part, model, Path(out_dir))
        return
    out.print(report.partition_table(part))
    out.print(report.balance_line(part))
    note = report.optimum_note(part, tolerance)
    if note:
        out.print(rich_text(note), style="yellow")
    out.print(f"[dim]traced {len(traced.nodes)} nodes and partitioned in {elapsed:.2f} s[/dim]")


def _write_model_explorer(part, model: str, out_dir: Path) -> None:
    """Model Explorer's files, named after MODEL (a ``pkg.module:factory`` name keeps only its factory)."""
    from monomod import report

    stem = model.rpartition(":")[2].replace("/", "_")
    for suffix, text in report.model_explorer_json(part).items():
        path = out_dir / f"{stem}.{suffix}"
        _write_atomic(path, text)
        click.echo(str(path))


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--html", "redraw", is_flag=True, help="Redraw RUN_DIR/report.html (the explorer with the run's "
              "results) from report.json and the plan's recorded cuts.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def report_cmd(run_dir: str, redraw: bool, fmt: str) -> None:
    """Show a finished run's results; with --html, redraw its report.html.

    \b
    Examples:
      monomod report runs/vit_tiny-nac-k4
      monomod report runs/vit_tiny-nac-k4 --html
    """
    from monomod import report
    from monomod.plan import Plan
    from monomod.rundir import RunDir
    from monomod.runtime.jobs import RunContext

    run = RunDir(Path(run_dir))
    summary = run.report()
    if summary is None:
        raise MonomodError(f"{run_dir!r} has no report.json yet", "finish the run first: monomod run RUN_DIR")
    page = None
    if redraw:
        page = report.write_run_html(run, summary, RunContext(Path(run_dir), Plan.load(run_dir)).partition())
    if fmt == "json":
        click.echo(json.dumps({**summary, **({"html": str(page)} if page else {})}, indent=2))
        return
    _print_summary(summary)
    if page:
        out.print(f"[dim]wrote {page}[/dim]")


def _print_summary(summary: dict) -> None:
    """A finished run's results, per-module hybrids and warnings."""
    from monomod import report

    out.print(report.results_table(summary))
    modules = report.modules_table(summary)
    if modules is not None:
        out.print(modules)
    for warning in summary.get("warnings", []):
        err.print(f"[yellow]warning:[/yellow] {rich_text(warning)}")


@cli.command()
@click.argument("kind")
@click.option("-k", "--modules", "k", type=int, default=4, show_default=True, help="Number of stages (K).")
@click.option("--preset", help="Family preset (default: the family's small CPU preset).")
@click.option("--img-size", type=int, default=32, show_default=True, help="Input resolution.")
@click.option("--num-classes", type=int, default=10, show_default=True, help="Classifier size.")
@click.option("--in-chans", type=int, default=3, show_default=True, help="Input channels.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def student(kind: str, k: int, preset: str | None, img_size: int, num_classes: int, in_chans: int, fmt: str) -> None:
    """Build a KIND student (nac, moe or vit) cut into K stages and show each stage's interface and cost.

    FLOPs are per sample, counted like `monomod inspect` counts the teacher.

    \b
    Examples:
      monomod student nac --modules 4
      monomod student moe --modules 4 --preset vmoe_base --img-size 224 --num-classes 1000
      monomod student vit --modules 3 --format json
    """
    import json

    from rich.table import Table

    from monomod import report
    from monomod.compiler import check_values
    from monomod.compiler.checks import check_student_memory
    from monomod.students import build_on_meta, build_student
    from monomod.students.summary import stage_costs

    check_values({"modules": k, "img_size": img_size, "in_chans": in_chans, "num_classes": num_classes})
    sizes = {"modules": k, "num_classes": num_classes, "img_size": img_size, "in_chans": in_chans, "preset": preset}
    check_student_memory(build_on_meta(kind, **sizes))  # a huge --img-size or --num-classes, before allocating
    model = build_student(kind, **sizes)
    costs = stage_costs(model)
    params, flops = sum(c.params for c in costs), sum(c.flops for c in costs)
    if fmt == "json":
        click.echo(json.dumps({"kind": kind, "preset": model.preset, "params": params, "flops": flops,
                               "stages": [c.to_json() for c in costs]}, indent=2))
        return
    table = Table(title=rich_text(f"{kind} student: {len(costs)} stages (preset {model.preset}, {img_size} px)"),
                  title_justify="left")
    for column, justify in (("#", "right"), ("interface", "left"), ("width in", "right"), ("width out", "right"),
                            ("params", "right"), ("FLOPs", "right")):
        table.add_column(column, justify=justify)
    for c in costs:
        table.add_row(str(c.index), c.interface, _dash(c.width_in), _dash(c.width_out), report.human(c.params),
                      report.human(c.flops))
    table.add_row("", "total", "", "", report.human(params), report.human(flops), style="bold")
    out.print(table)
    measured = [str(c.index) for c in costs if c.counted_by == "flop_counter"]
    if measured:
        out.print(f"[dim]stage(s) {', '.join(measured)}: the trace pass cannot measure them, so FLOPs are from "
                  "torch FlopCounterMode (matmul-like ops only)[/dim]")


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


@cli.command()
@click.argument("teacher", metavar="MODEL", required=False)
@_convert_options_from_spec
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="RUN_DIR (default: runs/MODEL-STUDENT-kK).")
@click.option("--recipe", help="Start from a recipe (`monomod recipes list`, or a .yaml path); options given on the "
              "command line override it.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Set any option or recipe key (repeatable; YAML values, dotted keys: budgets.m2mkd.epochs=1, "
              "student_overrides.embed_dim=192).")
@click.option("--dry-run", is_flag=True, help="Compile and print the plan, then stop.")
@click.option("--force", is_flag=True, help="Replace a different plan in RUN_DIR (unchanged finished jobs are kept).")
@click.option("--reuse", "reuse", multiple=True, type=click.Path(file_okay=False, exists=True),
              help="Copy jobs this earlier RUN_DIR finished with the same hash (e.g. its teacher) instead of training them (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@_run_dir_options
@_executor_options
def convert(out_dir: str | None, recipe: str | None, sets: tuple[str, ...], dry_run: bool, force: bool,
            reuse: tuple[str, ...], fmt: str, trust_code: bool, checkpoint_every: int | None,
            checkpoint_minutes: float | None, threads: int | None, run_options: dict | None = None,
            **given: object) -> None:
    """Distil MODEL into a modular student: compile the plan, run it, report the numbers.

    \b
    Examples:
      monomod convert vit_tiny --to nac --modules 4 --preset demo
      monomod convert vit_tiny --to moe --modules 4 --meta teacher --out runs/moe
      monomod convert vit_huge --to nac --modules 10 --data imagefolder:tiny-imagenet --preset paper --dry-run
      monomod convert --recipe demo-moe-digits --set alpha=0.7 --set budgets.m2mkd.steps=200
      monomod convert vit_tiny --to moe --modules 4 --reuse runs/vit_tiny-nac-k4   # same teacher: not trained again
      monomod convert vit_tiny --to vit --cuts blocks.4,blocks.8 --dry-run          # teacher cut by hand

    With --recipe, precedence is: the recipe, then options given explicitly on the command line, then --set.
    The teacher's cuts (searched, or --cuts) are recorded in RUN_DIR/plan.yaml; every job replays them.
    """
    from monomod import api
    from monomod.compiler import compile_options

    options, data_info = _convert_options(click.get_current_context(), given, recipe, sets, trust_code)
    options = _with_checkpointing(options, checkpoint_every, checkpoint_minutes, threads)
    api.check_reuse(reuse)  # in a dry run too
    notes: list[str] = []
    with err.status("compiling the plan ...", spinner="dots"):
        plan = compile_options(options, dry_run=dry_run, data_info=data_info, notes=notes)
    for note in notes:
        err.print(f"[yellow]note:[/yellow] {rich_text(note)}")
    name = options.teacher.replace(":", "_").replace("/", "_")
    run_dir = Path(out_dir or f"runs/{name}-{options.student}-k{options.modules}")
    if dry_run:
        _print_dry_run(plan, run_dir, fmt)
        return
    run_options = dict(run_options or {})
    if run_options.get("loader_workers") is None:
        run_options["loader_workers"] = options.loader_workers  # the recipe's, when it sets one

    def said_reused(reused: list[str]) -> None:
        if fmt != "json":
            what = ", ".join(reused) or "nothing (no finished job has the same hash)"
            err.print(f"[dim]reused from {rich_text(', '.join(reuse))}: {what}[/dim]")

    _report(lambda **shown: api.execute_plan(plan, run_dir, force=force, reuse=list(reuse), on_reuse=said_reused,
                                             **shown, **_executor_arguments(**run_options)), fmt)


def _print_dry_run(plan, run_dir: Path, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(plan.to_dict(), indent=2))
        return
    out.print(plan_table(plan, run_dir))
    out.print(partition_line(plan))
    out.print(execution_line(plan))
    out.print(f"[dim]dry run: nothing written; without --dry-run the plan goes to "
              f"{rich_text(run_dir / 'plan.yaml')}[/dim]")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--job", "jobs", multiple=True, help="Run only this job (repeatable), e.g. --job m2mkd:2.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@_run_dir_options
@_executor_options
def run(run_dir: str, jobs: tuple[str, ...], fmt: str, trust_code: bool, checkpoint_every: int | None,
        checkpoint_minutes: float | None, threads: int | None, run_options: dict | None = None) -> None:
    """Execute RUN_DIR's plan, or resume it: finished jobs (same hash) are skipped.

    Exit code 1 when a job fails (its name and log.txt are printed; finished jobs are kept, so running the same
    command again retries only what is left), 2 for bad input.

    \b
    Examples:
      monomod run runs/vit_tiny-nac-k4
      monomod run runs/vit_tiny-nac-k4 --executor process --workers 2
      monomod run runs/vit_tiny-nac-k4 --executor ray --ray-address auto --max-retries 2
      monomod run runs/vit_tiny-nac-k4 --job m2mkd:2
      torchrun --nproc_per_node 2 -m monomod.cli run runs/vit_tiny-nac-k4 --job m2mkd:2   # data parallel
    """
    from monomod import api

    _report(lambda **shown: api.run(run_dir, trust_code=trust_code, checkpoint_every=checkpoint_every,
                                    checkpoint_minutes=checkpoint_minutes, threads=threads, only=list(jobs) or None,
                                    **shown, **_executor_arguments(**(run_options or {}))), fmt)


@cli.group()
def plan() -> None:
    """Look at a distillation plan."""


@plan.command("show")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def plan_show(run_dir: str, fmt: str) -> None:
    """Print RUN_DIR's plan: where the teacher is cut, the jobs, their dependencies, hashes and which are finished.

    The cuts are plan.yaml's settings.partition.cuts: edit them there and `monomod run` re-runs exactly the jobs
    that use the teacher's modules.

    \b
    Example:
      monomod plan show runs/vit_tiny-nac-k4
    """
    from monomod.plan import Plan
    from monomod.rundir import RunDir, to_run

    loaded = Plan.load(run_dir)
    if fmt == "yaml":
        click.echo(loaded.to_yaml(), nl=False)
    elif fmt == "json":
        data = loaded.to_dict()
        for job in data["jobs"]:
            problem = RunDir(run_dir).done_problem(loaded.job(job["name"]))
            job["done"] = problem is None
            if problem is None:
                job["used"] = (RunDir(run_dir).done(job["name"]) or {}).get("used")  # resolved where it ran
            elif not to_run(problem):
                job["problem"] = problem
        click.echo(json.dumps(data, indent=2))
    else:
        out.print(plan_table(loaded, Path(run_dir)))
        out.print(partition_line(loaded))
        out.print(execution_line(loaded))


def partition_line(plan) -> str:
    """The recorded partition in one line: ``cuts blocks.4, blocks.8 (cost flops, tolerance 0.25, balance 1.02)``."""
    from rich.markup import escape

    record = plan.settings.get("partition")
    if not isinstance(record, dict):
        return "[yellow]no recorded partition: recompile the plan with `monomod convert ... --force`[/yellow]"
    cuts = ", ".join(map(str, record.get("cuts") or [])) or "none (one module)"
    balance = record.get("balance")
    return escape(f"cuts {cuts} (cost {record.get('cost')}, tolerance {record.get('tolerance')}, balance "
                  f"{'-' if balance is None else f'{balance:.2f}'})")


def execution_line(plan) -> str:
    """How the plan asks its training jobs to run: ``threads auto, precision auto, compile off`` (mixed values
    listed; ``auto`` is resolved by each job where it runs: the table's ``used`` column)."""
    trains = [job.config["train"] for job in plan.jobs if "train" in job.config]

    def values(key: str, show=str) -> str:
        return "/".join(dict.fromkeys(show(train.get(key)) for train in trains)) or "-"

    threads = plan.settings.get("threads")
    return (f"threads {threads or 'auto'}, precision {values('precision')}, "
            f"compile {values('compile', lambda on: 'on' if on else 'off')}")


def plan_table(plan, run_dir: Path):
    from rich.table import Table

    s = plan.settings
    table = Table(title=rich_text(f"plan: {s['teacher']} → {s['student']}, {s['modules']} modules, data {s['data']} "
                                  f"({s['img_size']} px), meta {s['meta']}, teacher training "
                                  f"{s.get('teacher_training', 'end-to-end')}, preset {s['preset']}"),
                  title_justify="left")
    for column in ("job", "kind", "needs", "steps", "hash", "state", "used"):
        table.add_column(column)
    for job in plan.jobs:
        steps = job.config.get("train", {}).get("steps")
        state = _job_state(run_dir, job)
        table.add_row(job.name, job.kind, ", ".join(job.inputs) or "-", str(steps or "-"), job.hash, state,
                      _used(run_dir, job) if state == DONE_MARK else "")
    return table


def _used(run_dir: Path, job) -> str:
    """What a finished job computed with where it ran (``done.json``'s ``used``): ``2 thr, cpu, fp32``."""
    from monomod.rundir import RunDir

    used = (RunDir(run_dir).done(job) or {}).get("used")
    if not isinstance(used, dict):
        return "-"
    input_path = used.get("input_path")
    parts = (f"{used.get('threads')} thr", used.get("device"), used.get("precision"),
             f"{input_path} input" if input_path else None)
    return ", ".join(str(part) for part in parts if part is not None)


def _job_state(run_dir: Path, job) -> str:
    """done, pending, or why a finished job's products no longer verify (it runs again)."""
    from rich.markup import escape

    from monomod.rundir import NOT_FINISHED, RunDir, to_run

    problem = RunDir(run_dir).done_problem(job) if run_dir.exists() else NOT_FINISHED
    if problem is None:
        return DONE_MARK
    if to_run(problem):
        return str(JobState.PENDING)
    return f"[red]runs again: {escape(problem)}[/red]"


def _executor_arguments(executor: str = "local", workers: int | None = None, ray_address: str | None = None,
                        max_retries: int = 0, loader_workers: int | None = None) -> dict:
    """The executor options, checked before anything is printed (a missing Ray is one line first)."""
    if executor == "ray":
        from monomod.runtime.executors import import_ray

        import_ray()
    return {"executor": executor, "workers": workers, "ray_address": ray_address, "max_retries": max_retries,
            "loader_workers": loader_workers}


def _report(execute, fmt: str) -> None:
    """Run ``execute(announce=..., console=...)`` (``api.execute_plan`` or ``api.run``) with the plan table shown
    before the jobs start, then print the run's summary (under torchrun only rank 0 talks)."""
    talk = os.environ.get("RANK", "0") == "0"

    def announce(plan, run_dir: Path) -> None:
        if fmt != "json" and talk:
            out.print(plan_table(plan, run_dir))

    started = time.perf_counter()
    run = execute(announce=announce, console=err)
    elapsed = time.perf_counter() - started
    if not talk:
        return
    summary = run.report
    if fmt == "json":
        click.echo(json.dumps({"run_dir": str(run.path), "seconds": round(elapsed, 3), "report": summary,
                               "jobs": [{**s.__dict__, "state": str(s.state)} for s in run.statuses]}, indent=2))
        return
    if summary:
        _print_summary(summary)
    ran = sum(1 for s in run.statuses if s.state == JobState.DONE)
    out.print(f"[dim]{ran} job(s) ran, {len(run.statuses) - ran} already finished; {elapsed:.1f} s; "
              f"report: {rich_text(run.path / 'report.md')} and report.html[/dim]", soft_wrap=True)  # a path copies whole


@cli.command("export")
@click.argument("target")
@click.option("--onnx", "onnx_dir", required=True, help="Directory for the .onnx files (new, empty, or an earlier export).")
@click.option("--what", default="stages,student", show_default=True,
              help="RUN_DIR: comma list of stages, student, teacher, or all. MODEL: teacher (its modules).")
@click.option("--source", type=click.Choice(["finetune", "assemble"]), default="finetune", show_default=True,
              help="RUN_DIR: the fine-tuned student, or the distilled stages as assembled (before fine-tuning).")
@click.option("-k", "--modules", "k", type=int, help="MODEL: number of teacher modules.")
@click.option("--cuts", help="MODEL: manual cut points, comma-separated (e.g. blocks.3,blocks.6).")
@click.option("--cost", type=click.Choice(["flops", "params"]), default="flops", show_default=True, help="MODEL: balance by.")
@click.option("--img-size", type=int, help="MODEL: input resolution (default: the model's own).")
@click.option("--in-chans", type=int, help="MODEL: input channels (default: the model's own).")
@click.option("--num-classes", type=int, help="MODEL: classifier size (default: the model's own).")
@click.option("--weights", type=click.Path(dir_okay=False), help="MODEL: local .safetensors or .pth state dict.")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's).")
@click.option("--bench", "bench_batches", default="", metavar="B1,B2",
              help="Also time onnxruntime against torch eager at these batch sizes (median of --repeats).")
@click.option("--repeats", type=int, default=20, show_default=True, help="Timed runs per latency measurement.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--trust-code", is_flag=True, help="RUN_DIR: allow its plan.yaml to name Python code as the teacher.")
def export_cmd(target: str, onnx_dir: str, what: str, source: str, k: int | None, cuts: str | None, cost: str,
               img_size: int | None, in_chans: int | None, num_classes: int | None, weights: str | None,
               opset: int | None, bench_batches: str, repeats: int, fmt: str, trust_code: bool) -> None:
    """Export TARGET to ONNX, check every file with onnxruntime against torch, exit 1 if a diff exceeds 1e-4.

    TARGET is a RUN_DIR (a directory holding plan.yaml: exports the student's stages, the student and, with
    --what teacher, the teacher's modules) or a MODEL spec (exports its K teacher modules, for serving pipeline
    stages). Every file has a dynamic batch axis, its parameters inside and metadata naming its boundary.

    \b
    Examples:
      monomod export runs/demo-nac --onnx onnx/demo-nac --what all --bench 1,64
      monomod export vit_base --modules 4 --onnx onnx/vit_base-k4
    """
    from monomod.api import run_exportables
    from monomod.passes import export as ex
    from monomod.plan import PLAN_FILE
    from monomod.report import export_table

    path = Path(target)
    is_run = path.is_dir() and (path / PLAN_FILE).is_file()
    if path.is_dir() and not is_run:
        raise MonomodError(f"{shorten(target)!r} is a directory without {PLAN_FILE}", "pass a RUN_DIR of `monomod convert` or a model name")
    if not is_run and ":" not in target and ("/" in target or os.sep in target or target.startswith(".")):
        raise MonomodError(f"{shorten(target)!r} is neither a RUN_DIR nor a model name (no such folder)",
                           "pass the RUN_DIR of a `monomod convert` run, or a timm model name")
    ex.check_opset(opset)
    ex.check_out_dir(onnx_dir)  # before any work: a folder that cannot be replaced is refused at once
    try:
        batches = [int(b) for b in bench_batches.split(",") if b.strip()]
    except ValueError:
        raise MonomodError(f"--bench {bench_batches!r} is not a comma list of batch sizes", "write e.g. --bench 1,64") from None
    if any(b < 1 for b in batches) or repeats < 1:
        raise MonomodError("--bench batch sizes and --repeats must be positive", "write e.g. --bench 1,64 --repeats 20")
    with err.status("loading ...", spinner="dots"):
        if is_run:
            model_only = {"--modules": k, "--cuts": cuts, "--img-size": img_size, "--in-chans": in_chans,
                          "--num-classes": num_classes, "--weights": weights}
            given = [flag for flag, value in model_only.items() if value is not None]
            if given:
                raise MonomodError(f"{', '.join(given)} apply to a MODEL, not to a RUN_DIR (the run fixes them)",
                                   "drop them, or export a model")
            items = run_exportables(path, ex.parse_what(what), source=source, trust_code=trust_code)
            title = rich_text(f"ONNX export of {path} ({source})")
        else:
            if ex.parse_what(what) != ["teacher"] and what != "stages,student":
                raise MonomodError(f"--what {what} needs a RUN_DIR; a MODEL exports its teacher modules",
                                   "drop --what, or pass a RUN_DIR")
            items = _model_exportables(target, k, cuts, cost, img_size, in_chans, num_classes, weights)
            title = rich_text(f"ONNX export of {target} ({len(items)} modules)")
    results = []
    with err.status("exporting ...", spinner="dots") as status:
        results = ex.export_all(items, onnx_dir, opset=opset, bench_batches=batches, repeats=repeats,
                                on_result=lambda r: status.update(f"exported {r.path.name} ..."))
    if fmt == "json":
        click.echo(json.dumps({"out": onnx_dir, "tolerance": ex.TOLERANCE, "files": [r.to_json() for r in results]}, indent=2))
    else:
        out.print(export_table(results, title))
    failed = [r.path.name for r in results if not r.ok]
    if failed:
        err.print(f"[red]{len(failed)} file(s) differ from torch by more than {ex.TOLERANCE:g}: {', '.join(failed)}[/red]")
        sys.exit(1)


def _model_exportables(model: str, k: int | None, cuts: str | None, cost: str, img_size: int | None,
                       in_chans: int | None, num_classes: int | None, weights: str | None):
    from monomod.compiler import check_values
    from monomod.frontend import load_model
    from monomod.passes.export import teacher_exportables
    from monomod.passes.partition import partition
    from monomod.passes.trace import trace

    if k is None and not cuts:
        raise MonomodError("exporting a MODEL needs --modules K (or --cuts)", "pass e.g. --modules 4")
    check_values({"modules": k, "cuts": cuts, "img_size": img_size, "in_chans": in_chans, "num_classes": num_classes})
    net = load_model(model, weights=weights, img_size=img_size, in_chans=in_chans, num_classes=num_classes)
    traced = trace(net, _example_input(net, img_size, in_chans), name=model)
    part = partition(traced, None if cuts else k, cost=cost, cuts=_split(cuts))
    return teacher_exportables(part, {"source": model, "teacher": model})


@cli.group()
def recipes() -> None:
    """Named conversion setups shipped with monomod (the paper's and quick demos)."""


@recipes.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def recipes_list(fmt: str) -> None:
    """List the shipped recipes.

    \b
    Example:
      monomod recipes list
    """
    from rich.table import Table

    from monomod.recipes import list_recipes

    found = list_recipes()
    if fmt == "json":
        click.echo(json.dumps([{"name": r.name, "description": r.description, **r.values} for r in found], indent=2))
        return
    table = Table(title="recipes (monomod convert --recipe NAME)", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("description")
    for r in found:
        table.add_row(r.name, r.description)
    out.print(table)


@recipes.command("show")
@click.argument("name")
def recipes_show(name: str) -> None:
    """Print recipe NAME (its YAML file, comments included).

    \b
    Example:
      monomod recipes show paper-nac-tinyimagenet
    """
    from monomod.recipes import load_recipe

    click.echo(load_recipe(name).path.read_text(), nl=False)


def _with_checkpointing(options, every: int | None, minutes: float | None, threads: int | None = None):
    """Options with the command line's checkpoint and thread settings (None: the recipe's or the default)."""
    from dataclasses import replace

    changes = {k: v for k, v in (("checkpoint_every", every), ("checkpoint_minutes", minutes), ("threads", threads))
               if v is not None}
    return replace(options, **changes) if changes else options


def _convert_options(ctx: click.Context, given: dict, recipe: str | None, sets: tuple[str, ...],
                     trust_code: bool = False):
    """ConvertOptions from the command line, or from a recipe overridden by explicit options and then ``--set``.

    Returns ``(options, data_info)``; ``data_info`` (a recipe's declared data facts) lets a dry run plan without
    the data folder. The values are checked by the option spec once, when the plan is compiled.
    """
    from monomod.recipes import check, load_recipe, parse_sets, to_convert_options

    if sets:
        check(parse_sets(sets), "--set", partial=True)
    if recipe is None:
        values = parse_sets(sets, given) if sets else dict(given)
        if values.get("modules") is None and values.get("cuts"):
            values["modules"] = len(values["cuts"]) + 1  # K follows from the cuts
        missing = [flag for flag, key in (("MODEL", "teacher"), ("--to", "student"), ("--modules", "modules"))
                   if values.get(key) is None]
        if missing:
            raise MonomodError(f"convert needs {', '.join(missing)}", "pass them, or start from a --recipe")
        return to_convert_options(values), values.get("data_info")

    from monomod.frontend import check_trusted

    loaded = load_recipe(recipe)
    explicit = {key: value for key, value in given.items()
                if ctx.get_parameter_source(key) == click.core.ParameterSource.COMMANDLINE}
    typed = {text.partition("=")[0].strip() for text in sets} | set(explicit)  # the user's own choices
    check_trusted({k: v for k, v in loaded.values.items() if k not in typed}, f"recipe {loaded.path.name}", trust_code)
    values = check(dict(loaded.values, **explicit), "command line", partial=True)
    values = parse_sets(sets, values)
    values.setdefault("description", loaded.description)
    check(values, f"{loaded.path.name} with overrides")
    return loaded.convert_options({k: v for k, v in values.items() if k != "data_info"}), values.get("data_info")


def _example_input(net, img_size: int | None, in_chans: int | None):
    """A one-sample input in the model's expected layout, on the model's device (meta for a shape-only trace)."""
    import torch

    cfg = getattr(net, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if img_size:
        h = w = img_size
    if in_chans:
        c = in_chans
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    return torch.randn(1, c, h, w, device=device)


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a whole file or nothing: readers never see half a page."""
    from monomod.io import atomic_write_text

    target = Path(path)
    if not target.parent.exists():
        raise MonomodError(f"directory {str(target.parent)!r} does not exist", "create it first or choose another path")
    atomic_write_text(target, text)


def log_to_console() -> None:
    """The library logs through ``logging`` (loggers under ``monomod``); the command line shows its warnings and
    notes on stderr through rich, once."""
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("monomod")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=err, show_time=False, show_path=False, markup=False))
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main() -> None:
    log_to_console()
    cli(prog_name="monomod")


if __name__ == "__main__":
    sys.exit(main())
