"""Render a Partition for people and machines: rich table, JSON, Graphviz DOT, and a self-contained HTML page."""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from rich.table import Table
from rich.text import Text

from monomod.explorer import edge_records, explorer_html, model_explorer_files, node_records
from monomod.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from monomod.ir import Partition
from monomod.rundir import CURVES_PNG, REPORT_HTML, REPORT_JSON, REPORT_MD, RunDir
from monomod.safe import markdown_code, markdown_text, rich_text


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (decimal prefixes, as FLOPs and parameter counts are usually quoted)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g}{prefix}{unit}"
    return f"{n:.3g}{unit}"


def human_bytes(n: float) -> str:
    for factor, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.3g} {prefix}"
    return f"{int(n)} B"


def partition_table(p: Partition) -> Table:
    total = p.traced.flops if p.cost == "flops" else p.traced.params
    table = Table(title=rich_text(f"{p.traced.name}: {p.k} modules ({p.method}, balanced by {p.cost})"),
                  title_justify="left")
    for column, justify in (("#", "right"), ("covers", "left"), ("nodes", "right"), ("params", "right"),
                            ("FLOPs", "right"), ("share", "right"), ("outputs → next module", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for m in p.modules:
        outs = ", ".join(v.describe() for v in m.outputs)
        table.add_row(
            str(m.index), rich_text(", ".join(m.covers)), str(len(m.nodes)), human(m.params), human(m.flops),
            f"{100 * p.module_cost(m) / total:.1f}%" if total else "-", rich_text(outs),
        )
    return table


def balance_line(p: Partition) -> Text:
    costs = [p.module_cost(m) for m in p.modules]
    mean = sum(costs) / len(costs)
    tensors = sum(len(c) for c in p.cuts)
    optimum = "" if p.optimum is None else f", optimum {p.optimum:.3f} over {p.legal_points} legal cut points"
    return Text.assemble(
        ("balance ", "bold"), f"{p.balance:.3f} max/mean {p.cost} ({human(max(costs))} / {human(mean)}{optimum})",
        ("  ·  cut ", "bold"), f"{human_bytes(p.bytes_cut)} per sample in {tensors} tensor(s) over {p.k - 1} cut(s)",
        ("  ·  model ", "bold"), f"{human(p.traced.params)} params, {human(p.traced.flops)} FLOPs per sample",
    )


def optimum_note(p: Partition, tolerance: float) -> str | None:
    """One line when even the best cut of this model at this K is above the accepted imbalance (1 + tolerance):
    then no search or hand cut does better, and only fewer modules (or a finer trace) would; or when the search
    took cuts of several tensors to get closer, which a trained meta model cannot take."""
    if p.optimum is None:
        return None
    single = p.single_tensor_optimum
    several = single is None or single > p.optimum
    if p.optimum > 1 + tolerance:
        return (f"no {p.k}-module cut of {p.traced.name} balances {p.cost} within {1 + tolerance:.2f}: the optimum over "
                f"its {p.legal_points} legal cut points is {p.optimum:.3f}"
                + (" with cuts of several tensors" if several else "") + " (use fewer --modules, or another --cost)")
    if several:
        over = "none" if single is None else f"{single:.3f}"
        return (f"cuts of several tensors: single-tensor cuts balance {over} at best, above {1 + tolerance:.2f}; a "
                f"trained meta model needs single-tensor cuts (raise --tolerance, or --cuts)")
    return None


def partition_json(p: Partition) -> str:
    """The module-level summary plus one record per fx node and its edges (schema in the README)."""
    return json.dumps({**p.to_json(), "nodes": node_records(p), "edges": edge_records(p.traced)}, indent=2)


def model_explorer_json(p: Partition) -> dict[str, str]:
    """Google Model Explorer files as ``suffix -> text``: the graph and its node-data overlays."""
    return {suffix: json.dumps(data) for suffix, data in model_explorer_files(p).items()}


def partition_dot(p: Partition) -> str:
    """Graphviz DOT of the tensor data flow, one cluster per module; edges that cross a cut are red."""
    infos = p.traced.nodes
    shown = {name for name, info in infos.items() if info.holds_tensors and info.op != "get_attr"}
    lines = [f'digraph "{p.traced.name}" {{', "  rankdir=TB;", '  node [shape=box, fontsize=9, fontname="Helvetica"];']
    for m in p.modules:
        label = f"module {m.index}: {', '.join(m.covers)}\\n{human(m.params)} params, {human(m.flops)} FLOPs"
        lines.append(f"  subgraph cluster_{m.index} {{")
        lines.append(f'    label="{_dot_escape(label)}"; style=rounded; color="#4a6fa5";')
        for name in m.nodes:
            if name in shown:
                info = infos[name]
                shape = "×".join(map(str, info.symbolic_shape() or [])) or "tensors"
                lines.append(f'    "{name}" [label="{_dot_escape(info.target)}\\n{shape}"];')
        lines.append("  }")
    for node in p.traced.graph_module.graph.nodes:
        if node.name not in shown:
            continue
        for user in node.users:
            if user.name in shown:
                crossing = p.assignment[node.name] != p.assignment[user.name]
                style = f' [color=red, penwidth=2, label="{human_bytes(infos[node.name].bytes)}"]' if crossing else ""
                lines.append(f'  "{node.name}" -> "{user.name}"{style};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_escape(text: str) -> str:
    return text.replace('"', '\\"')


def partition_html(p: Partition) -> str:
    """The partition explorer: one offline page, node by node, re-cut by hand (``monomod.explorer``)."""
    return explorer_html(p)


# ------------------------------------------------------------------------------------------------ run reports

RESULT_ROWS = (
    ("teacher", "teacher"),
    ("meta", "meta model"),
    ("assembled", "m2mKD student, assembled (before fine-tune)"),
    ("student", "m2mKD student (assembled + fine-tuned)"),
    ("baseline", "baseline (same student from scratch, same fine-tune budget)"),
)


def write_run_report(run_dir: Path, plan: Any, results: dict[str, dict[str, Any]],
                     running: dict[str, float] | None = None, partition: Partition | None = None) -> dict[str, Any]:
    """Write report.json, report.md, curves.png and (given the run's ``partition``) report.html for a finished
    run; returns the JSON object.

    Wall times come from each finished job's record; ``running`` adds jobs still going (the one writing this).
    """
    run = RunDir(run_dir)
    records = {job.name: record for job in plan.jobs if (record := run.done(job)) is not None}
    jobs = {name: record.get("seconds") for name, record in records.items()}
    jobs.update(running or {})
    modules = module_results(records)
    classes = plan.settings.get("distill_num_classes") or plan.settings["num_classes"]
    report = {
        **{name: results[name] for name, _ in RESULT_ROWS if name in results},
        "modules": modules,
        "warnings": module_warnings(modules, classes, plan.settings.get("teacher_training", "end-to-end")),
        "jobs": {name: {"seconds": seconds} for name, seconds in jobs.items()},
        "total_seconds": round(sum(s for s in jobs.values() if s), 3),
        "settings": plan.settings,
    }
    atomic_write_json(run.report_file(REPORT_JSON), report)
    curves = _plot_curves(run, plan)
    atomic_write_text(run.report_file(REPORT_MD), run_report_markdown(report, curves))
    if partition is not None:
        write_run_html(run, report, partition)
    return report


def write_run_html(run: RunDir, report: dict[str, Any], partition: Partition) -> Path:
    """report.html: the partition explorer of the run's teacher, with its results, per-module hybrids and curves
    (``monomod report RUN_DIR --html`` redraws it from report.json)."""
    path = run.report_file(REPORT_HTML)
    atomic_write_text(path, explorer_html(partition, run_page_section(report, run.report_file(CURVES_PNG))))
    return path


def run_page_section(report: dict[str, Any], curves: Path | None = None) -> dict[str, Any]:
    """What the explorer page shows of a run: the same rows and columns as report.md, the curves inlined."""
    s = report["settings"]
    modules = report.get("modules") or []
    keys = _module_keys(modules)
    return {
        "title": f"{s['teacher']} → {s['student']} ({s['modules']} modules)",
        "description": f"data {s['data']} at {s['img_size']} px, preset {s['preset']}, meta {s['meta']}, seed {s['seed']}",
        "results": [{"label": label, "iid_acc": report[name]["iid_acc"], "ood_acc": report[name]["ood_acc"]}
                    for name, label in RESULT_ROWS if name in report],
        "modules": modules,
        "module_columns": [[key, MODULE_COLUMN_NAMES[key]] for key in keys],
        "warnings": report.get("warnings", []),
        "jobs": [[name, info["seconds"]] for name, info in report["jobs"].items()],
        "curves": ("data:image/png;base64," + base64.b64encode(curves.read_bytes()).decode()
                   if curves is not None and curves.exists() else None),
    }


MODULE_KEYS = ("teacher_hybrid_acc", "student_hybrid_acc", "agreement")
MODULE_COLUMN_NAMES = {"teacher_hybrid_acc": "teacher hybrid", "incubated_hybrid_acc": "incubated hybrid",
                       "student_hybrid_acc": "student hybrid", "agreement": "agreement"}


def module_results(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per module, what its m2mKD job measured on the val split at its end (see ``jobs.measure_hybrids``), and the
    teacher hybrid of its incubation when the teacher was incubated."""
    modules = []
    for name in sorted((n for n in records if n.startswith("m2mkd:")), key=lambda n: int(n.split(":")[1])):
        i = int(name.split(":")[1])
        result = records[name].get("result") or {}
        row: dict[str, Any] = {"module": i, **{key: result.get(key) for key in MODULE_KEYS}}
        incubated = (records.get(f"incubate:{i}", {}).get("result") or {}).get("teacher_hybrid_acc")
        if incubated is not None:
            row["incubated_hybrid_acc"] = incubated
        modules.append(row)
    return modules


def module_warnings(modules: list[dict[str, Any]], num_classes: int, teacher_training: str = "incubate",
                    margin: float = 0.10, distilled: float = 0.80) -> list[str]:
    """One line per module whose distillation did not work: its teacher hybrid is within ``margin`` of chance (the
    target was noise), or its student hybrid is below ``distilled`` times its teacher hybrid (the student did not
    learn the target)."""
    chance = 1.0 / max(num_classes, 1)
    noise = [m for m in modules
             if m.get("teacher_hybrid_acc") is not None and m["teacher_hybrid_acc"] < chance + margin]
    lagging = [m for m in modules if m not in noise and m.get("student_hybrid_acc") is not None
               and m.get("teacher_hybrid_acc") and m["student_hybrid_acc"] < distilled * m["teacher_hybrid_acc"]]
    return ([_noise_warning(m, chance, margin, teacher_training) for m in noise]
            + [_lagging_warning(m, distilled) for m in lagging])


def _noise_warning(m: dict[str, Any], chance: float, margin: float, teacher_training: str) -> str:
    if teacher_training == "end-to-end":
        cause = ("teacher module {i} was trained apart from the meta model and writes a representation the meta model "
                 "cannot read: train the teacher with --teacher-training incubate (the default with --meta trained) "
                 "or use --meta teacher")
    else:
        cause = ("incubation did not fit teacher module {i} into the meta model: raise budgets.incubate (and "
                 "budgets.meta if the meta model itself is weak)")
    return (f"module {m['module']}: its teacher hybrid reaches {_pct(m['teacher_hybrid_acc'])} on val, within "
            f"{round(100 * margin)} points of chance ({_pct(chance)}), so m2mKD distilled it towards noise; likely "
            "cause: " + cause.format(i=m["module"]))


def _lagging_warning(m: dict[str, Any], distilled: float) -> str:
    return (f"module {m['module']}: its student hybrid reaches {_pct(m['student_hybrid_acc'])} on val, below "
            f"{round(100 * distilled)} % of its teacher hybrid ({_pct(m['teacher_hybrid_acc'])}), so it did not distil; "
            "likely cause: too few m2mKD steps or a learning rate that does not suit this student: raise "
            "budgets.m2mkd.steps (e.g. --set budgets.m2mkd.steps=N) or try another budgets.m2mkd.lr")


def _module_keys(modules: list[dict[str, Any]]) -> list[str]:
    """The per-module columns a run has (the incubated one only when the teacher was incubated)."""
    incubated = ["incubated_hybrid_acc"] if any("incubated_hybrid_acc" in m for m in modules) else []
    return ["teacher_hybrid_acc", *incubated, "student_hybrid_acc", "agreement"]


def _module_columns(modules: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the per-module table (the incubated column only when the teacher was incubated)."""
    keys = _module_keys(modules)
    rows = [[str(m["module"])] + [_pct(m.get(key)) for key in keys] for m in modules]
    return ["module"] + [MODULE_COLUMN_NAMES[key] for key in keys], rows


def modules_markdown(modules: list[dict[str, Any]]) -> list[str]:
    if not modules:
        return []
    header, rows = _module_columns(modules)
    header = [f"{name} top-1" if name.endswith("hybrid") else name for name in header]
    lines = ["Per module (val split, measured at the end of each m2mKD job; a hybrid is `meta[:i] -> module i -> "
             "meta[i+1:]`):", "", "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def run_report_markdown(report: dict[str, Any], curves: str | None = "curves.png") -> str:
    s = report["settings"]
    md, code = markdown_text, markdown_code  # every name, path and tag in the page came from the user's files
    lines = [
        f"# {md(s['teacher'])} → {md(s['student'])} ({md(s['modules'])} modules)",
        "",
        f"Data: {code(s['data'])} at {md(s['img_size'])} px, preset {code(s['preset'])}, meta {code(s['meta'])}, "
        f"teacher training {code(s.get('teacher_training', 'end-to-end'))}, seed {md(s['seed'])}."
        + (f" Distilled on {code(s['distill_data'])} (teacher and meta rows measured there)."
           if s.get("distill_data", s["data"]) != s["data"] else ""),
        "",
        "| model | IID top-1 | OOD top-1 |",
        "|---|---:|---:|",
    ]
    for name, label in RESULT_ROWS:
        if name in report:
            lines.append(f"| {label} | {_pct(report[name]['iid_acc'])} | {_pct(report[name]['ood_acc'])} |")
    lines.append("")
    lines += _corruption_markdown(report)
    lines += modules_markdown(report.get("modules", []))
    lines += [f"> **warning:** {md(w)}" for w in report.get("warnings", [])] + ([""] if report.get("warnings") else [])
    lines += ["| job | wall time (s) |", "|---|---:|"]
    lines += [f"| {md(name)} | {info['seconds']:.1f} |" for name, info in report["jobs"].items() if info["seconds"] is not None]
    lines += [f"| **total** | **{report['total_seconds']:.1f}** |", ""]
    if curves:
        lines += [f"![training curves]({curves})", ""]
    return "\n".join(lines)


def _corruption_markdown(report: dict[str, Any]) -> list[str]:
    """OOD top-1 per corruption, one column per model, where the OOD split names its corruptions (digits)."""
    rows = [(label, report[name]["ood_by_corruption"]) for name, label in RESULT_ROWS
            if name in report and report[name].get("ood_by_corruption")]
    if not rows:
        return []
    tags = list(dict.fromkeys(tag for _, by_tag in rows for tag in by_tag))
    lines = ["| OOD corruption | " + " | ".join(label for label, _ in rows) + " |",
             "|---|" + "---:|" * len(rows)]
    lines += [f"| {markdown_text(tag)} | " + " | ".join(_pct(by_tag.get(tag)) for _, by_tag in rows) + " |" for tag in tags]
    return lines + [""]


def modules_table(report: dict[str, Any]) -> Table | None:
    """The per-module hybrids of a run (None when it has none)."""
    modules = report.get("modules") or []
    if not modules:
        return None
    header, rows = _module_columns(modules)
    table = Table(title="modules (val top-1 of each hybrid meta[:i] → module i → meta[i+1:])", title_justify="left")
    for column in header:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def results_table(report: dict[str, Any]) -> Table:
    table = Table(title="results", title_justify="left")
    table.add_column("model")
    table.add_column("IID top-1", justify="right")
    table.add_column("OOD top-1", justify="right")
    for name, label in RESULT_ROWS:
        if name in report:
            table.add_row(label, _pct(report[name]["iid_acc"]), _pct(report[name]["ood_acc"]))
    return table


def _plot_curves(run: RunDir, plan: Any) -> str | None:
    """Training loss of every job, and train accuracy of the fine-tuned student against the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {job.name: rows for job in plan.jobs if (rows := run.metrics(job))}
    if not series:
        return None
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in series.items():
        loss_ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name, linewidth=1.2)
    loss_ax.set(title="training loss", xlabel="step", yscale="log")
    loss_ax.legend(fontsize=7, ncol=2)
    for name in ("finetune", "baseline"):
        rows = [r for r in series.get(name, []) if r.get("acc") is not None]
        if rows:
            acc_ax.plot([r["step"] for r in rows], [r["acc"] for r in rows], label="m2mKD student" if name == "finetune" else "baseline")
    acc_ax.set(title="train accuracy (end-to-end phase)", xlabel="step", ylim=(0, 1))
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(run.report_file(CURVES_PNG), buffer.getvalue())
    return CURVES_PNG


def export_table(results: Sequence[Any], title: str = "ONNX export") -> Table:
    """One row per exported file (``passes.export.ExportResult``): size, largest difference from torch, latencies."""
    from monomod.passes.export import TOLERANCE

    batches = sorted({b for r in results for b in r.latency_ms})
    table = Table(title=title, title_justify="left")
    for column, justify in (("file", "left"), ("exporter", "left"), ("size", "right"), ("max |diff|", "right")):
        table.add_column(column, justify=justify)
    for b in batches:
        table.add_column(f"ort ms (B={b})", justify="right")
        table.add_column(f"torch ms (B={b})", justify="right")
    table.add_column("check", justify="left")
    for r in results:
        diff = f"{r.max_diff:.2e}" if math.isfinite(r.max_diff) else "failed"
        cells = [r.path.name, r.exporter, human_bytes(r.bytes), diff]
        for b in batches:
            lat = r.latency_ms.get(b, {})
            cells += [f"{lat['onnxruntime']:.2f}" if lat else "-", f"{lat['torch']:.2f}" if lat else "-"]
        status = "[green]ok[/green]" if r.ok else f"[red]> {TOLERANCE:g}[/red]"
        cells.append(status + (f" [dim]{r.note}[/dim]" if r.note else ""))
        table.add_row(*cells)
    return table
