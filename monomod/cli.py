"""The ``monomod`` command line."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console

from monomod.errors import MonomodError

out = Console()
err = Console(stderr=True)


class _Cli(click.Group):
    """Turns MonomodError into one line on stderr and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except MonomodError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="monomod")
def cli() -> None:
    """Compile a monolithic vision transformer into a modular student by module-to-module distillation.

    \b
    monomod inspect vit_base --modules 8      # how the teacher splits into modules
    monomod student nac --modules 4           # a student's stages, interfaces and costs
    """


@cli.command()
@click.argument("model")
@click.option("-k", "--modules", "k", type=int, default=4, show_default=True, help="Number of contiguous modules.")
@click.option("--cost", type=click.Choice(["flops", "params"]), default="flops", show_default=True, help="What the modules are balanced by.")
@click.option("--tolerance", type=float, default=0.25, show_default=True, help="Allowed imbalance: aim for max/mean cost <= 1 + tolerance.")
@click.option("--cuts", help="Manual cut points, comma-separated: where each new module begins (e.g. blocks.3,blocks.6).")
@click.option("--img-size", type=int, help="Input resolution (default: the model's own).")
@click.option("--in-chans", type=int, help="Input channels (default: the model's own).")
@click.option("--num-classes", type=int, help="Classifier size (default: the model's own).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local .safetensors or .pth state dict to load.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--dot", type=click.Path(dir_okay=False), help="Also write the partition graph as Graphviz DOT.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write a self-contained HTML page.")
def inspect(
    model: str, k: int, cost: str, tolerance: float, cuts: str | None, img_size: int | None, in_chans: int | None,
    num_classes: int | None, weights: str | None, fmt: str, dot: str | None, html_path: str | None,
) -> None:
    """Trace MODEL and show how it splits into K contiguous teacher modules.

    MODEL is a timm name or alias (vit_base, deit_small, resnet50), or pkg.module:factory.

    \b
    Examples:
      monomod inspect vit_base --modules 8
      monomod inspect vit_tiny --img-size 32 --modules 4 --format json
      monomod inspect deit_small --cuts blocks.4,blocks.8 --html deit.html --dot deit.dot
    """
    from monomod import report
    from monomod.frontend import load_model
    from monomod.passes.partition import partition
    from monomod.passes.trace import trace

    if k < 1:
        raise MonomodError(f"--modules must be at least 1, got {k}", "pass --modules 1 or more")
    started = time.perf_counter()
    with err.status(f"tracing {model} ...", spinner="dots"):
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
    out.print(report.partition_table(part))
    out.print(report.balance_line(part))
    out.print(f"[dim]traced {len(traced.nodes)} nodes and partitioned in {elapsed:.2f} s[/dim]")


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
    from monomod.students import build_student
    from monomod.students.summary import stage_costs

    model = build_student(kind, modules=k, num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                          preset=preset)
    costs = stage_costs(model)
    params, flops = sum(c.params for c in costs), sum(c.flops for c in costs)
    if fmt == "json":
        click.echo(json.dumps({"kind": kind, "preset": model.preset, "params": params, "flops": flops,
                               "stages": [c.to_json() for c in costs]}, indent=2))
        return
    table = Table(title=f"{kind} student: {len(costs)} stages (preset {model.preset}, {img_size} px)",
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
    """Write via a temporary file and rename, so a reader never sees half a file."""
    target = Path(path)
    if not target.parent.exists():
        raise MonomodError(f"directory {str(target.parent)!r} does not exist", "create it first or choose another path")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> None:
    cli(prog_name="monomod")


if __name__ == "__main__":
    sys.exit(main())
