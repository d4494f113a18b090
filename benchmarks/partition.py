"""Partition quality and speed: monomod's exact search against the splits pipeline libraries and the reference use.

For each model and K: the wall time of trace + partition + extract against one forward pass at batch 2 (medians
of repeats), and for three partitioners the FLOPs balance (max/mean) and the bytes per sample that cross the cuts:

* ``optimal``: monomod.partition (the exact most balanced cut over single-tensor cut points; before issue 25,
  networkx minimum cuts with balance windows);
* ``greedy-params``: walk the graph in order and cut when a module's parameters reach total/K (as pipeline
  libraries split by parameter count);
* ``uniform-blocks``: split the model's repeated blocks into K equal runs by count (as the m2mKD reference scripts
  do with hand-written depth lists).

Also how partition time grows with graph size, vit_tiny -> vit_huge (traced on the meta device, no weights), and
the FLOPs balance at K=8 across timm: the smallest model (by parameters) of each model family (timm module) that
timm's own fx test covers, traced on the meta device at its default input size (``run_families``, registered as
``python -m benchmarks.run --only partition_families``; standalone: ``python -m benchmarks.partition families
OUT.jsonl``, one JSON line per family as it goes).
"""
from __future__ import annotations

import fnmatch
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch

import monomod
from monomod.passes.partition import _is_compute, _unit, cost_prefix, optimal_cuts, search

# (name, timm kwargs, image size): ViT, DeiT, Swin, ConvNeXt, ResNet and friends, small enough for 2 CPU cores.
MODELS: list[tuple[str, dict[str, Any], int]] = [
    ("vit_small_patch16_224", {}, 224),
    ("deit_small_patch16_224", {}, 224),
    ("vit_base_patch16_224", {}, 224),
    ("swin_tiny_patch4_window7_224", {}, 224),
    ("convnext_tiny", {}, 224),
    ("resnet50", {}, 224),
    ("efficientnet_b0", {}, 224),
    ("mobilenetv3_large_100", {}, 224),
    ("regnety_016", {}, 224),
]
QUICK_MODELS = MODELS[:2] + [MODELS[5]]
# timm's tests/test_models.py, test_model_forward_fx, off GitHub's runners: EXCLUDE_FILTERS + EXCLUDE_FX_FILTERS.
FX_TEST_EXCLUDE = ["*enormous*", "*_7b_*", "vit_gi*", "hiera*", "gemma4_vit*"]
FAMILY_K = 8
RESULTS = Path(__file__).parent / "results"
BEFORE = RESULTS / "partition_families_before.jsonl"  # the same survey with the min-cut search (commit 17fc561)
PICKS = RESULTS / "partition_family_picks.json"  # the survey's models: choosing them builds every timm model
SCALING = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"]


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def greedy_params_cuts(traced: monomod.TracedModel, k: int) -> list[str]:
    """Cut before the node at which the running parameter count passes each multiple of total/K."""
    total, running, cuts = traced.params, 0, []
    for name, info in traced.nodes.items():
        if len(cuts) == k - 1:
            break
        if _is_compute(info) and running >= total * (len(cuts) + 1) / k:
            cuts.append(name)
        running += info.params
    return cuts


def uniform_block_cuts(traced: monomod.TracedModel, k: int) -> list[str] | None:
    """K equal runs of the model's repeated units (blocks.i, layers.i.blocks.j, stages.i ...), by count."""
    units: list[str] = []
    for info in traced.nodes.values():
        if info.module and _is_compute(info):
            unit = _unit(traced.model, info.module)
            if unit[-1:].isdigit() and unit not in units:
                units.append(unit)
    if len(units) < k:
        return None
    return [units[round(i * len(units) / k)] for i in range(1, k)]


def _describe(part: monomod.Partition) -> dict[str, Any]:
    return {"balance": round(part.balance, 4), "bytes_cut": part.bytes_cut, "tensors_cut": sum(len(c) for c in part.cuts)}


def run(quick: bool = False) -> dict[str, Any]:
    with torch.no_grad():  # scoped: the harness runs other benchmarks, which train, in this process
        return _run(quick)


def _run(quick: bool) -> dict[str, Any]:
    repeats = 1 if quick else 3
    rows = []
    for name, kwargs, size in QUICK_MODELS if quick else MODELS:
        model = monomod.load_model(name, **kwargs)
        x1, x2 = torch.randn(1, 3, size, size), torch.randn(2, 3, size, size)
        forward_s = _median_time(lambda: model(x2), repeats)
        for k in (4, 8):
            timings = {}

            def compile_once():
                start = time.perf_counter()
                traced = monomod.trace(model, x1, name=name)
                timings["trace"] = time.perf_counter() - start
                part = monomod.partition(traced, k)
                timings["partition"] = time.perf_counter() - start - timings["trace"]
                monomod.extract(part)
                return traced, part

            compile_s = _median_time(compile_once, repeats)
            traced, part = compile_once()
            row = {
                "model": name, "k": k, "nodes": len(traced.nodes), "forward_b2_s": round(forward_s, 4),
                "compile_s": round(compile_s, 4), "trace_s": round(timings["trace"], 4),
                "partition_s": round(timings["partition"], 4), "compile_over_forward": round(compile_s / forward_s, 2),
                "optimal": _describe(part),
                "greedy-params": _describe(monomod.partition(traced, cuts=greedy_params_cuts(traced, k))),
            }
            uniform = uniform_block_cuts(traced, k)
            row["uniform-blocks"] = _describe(monomod.partition(traced, cuts=uniform)) if uniform else None
            rows.append(row)
            print(f"  {name} K={k}: balance {row['optimal']['balance']} vs greedy {row['greedy-params']['balance']}"
                  f" vs uniform {row['uniform-blocks'] and row['uniform-blocks']['balance']}", flush=True)
    scaling = []
    for name in SCALING[:2] if quick else SCALING:
        model = monomod.load_model(name, device="meta")
        size = model.pretrained_cfg["input_size"][-1]
        x = torch.randn(1, 3, size, size, device="meta")
        traced = monomod.trace(model, x, name=name)
        partition_s = _median_time(lambda: monomod.partition(traced, 8), repeats)
        scaling.append({"model": name, "nodes": len(traced.nodes), "params": traced.params, "partition_k8_s": round(partition_s, 4)})
    return {"rows": rows, "scaling": scaling}


def run_families(quick: bool = False) -> dict[str, Any]:
    """The K=8 survey (``python -m benchmarks.run --only partition_families``), beside the min-cut search's numbers
    on the same models (``BEFORE``, measured on the same traces with commit 17fc561's partition pass)."""
    found = families(limit=5 if quick else None)
    before = [json.loads(line) for line in BEFORE.read_text().splitlines()] if BEFORE.is_file() else []
    return {"families": found, "family_summary": family_summary(found),
            "before_summary": family_summary(before) if before else None,
            "before": {r["family"]: r.get("balance") for r in before}}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| model | K | nodes | trace+partition+extract (s) | forward b=2 (s) | ratio | balance monomod | greedy-params | uniform-blocks | bytes cut monomod | greedy-params | uniform-blocks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        u = r["uniform-blocks"] or {"balance": "-", "bytes_cut": "-"}
        lines.append(
            f"| {r['model']} | {r['k']} | {r['nodes']} | {r['compile_s']} | {r['forward_b2_s']} | {r['compile_over_forward']} "
            f"| {r['optimal']['balance']} | {r['greedy-params']['balance']} | {u['balance']} "
            f"| {r['optimal']['bytes_cut']} | {r['greedy-params']['bytes_cut']} | {u['bytes_cut']} |"
        )
    lines += ["", "| model | fx nodes | params | partition K=8 (s) |", "|---|---:|---:|---:|"]
    lines += [f"| {s['model']} | {s['nodes']} | {s['params']} | {s['partition_k8_s']} |" for s in result["scaling"]]
    return "\n".join(lines) + "\n"


def family_markdown(result: dict[str, Any]) -> list[str]:
    """The K=8 survey: a summary line before/after, then one row per family, worst first."""
    now, then = result["family_summary"], result.get("before_summary")
    lines = [f"K={FAMILY_K} FLOPs balance on the smallest model (by parameters) of each of the {now['families']} timm "
             "families (modules) timm's fx test covers, traced on the meta device at its default input size; 'before' "
             "is commit 17fc561's min-cut search on the same traces:", ""]
    lines += ["| search | partitioned | median balance | worst | families above 1.5 | slowest partition (s) |",
              "|---|---:|---:|---:|---:|---:|"]
    for label, s in (("min-cut with balance windows (before)", then), ("exact (this search)", now)):
        if s:
            lines.append(f"| {label} | {s['partitioned']} | {s['median']} | {s['worst']} ({s['worst_model']}) "
                         f"| {s['above_1_5']} | {s['max_partition_s']} |")
    if "median_order_bound" in now:
        lines.append(f"| bound: every position a cut point, whatever crosses it | {now['partitioned']} "
                     f"| {now['median_order_bound']} | {now['worst_order_bound']} | {now['above_1_5_order_bound']} | - |")
    lines += ["", "Before, a cut could carry several tensors and modules need not be runs of the graph order; now a cut "
              "carries one tensor unless single-tensor cuts cannot balance within 1.25 (then several, within the byte "
              "budget, when strictly better), and the balance is the exact optimum over those cut points.", "",
              "The last column is the optimum where any cut within the byte budget may be taken, however many tensors "
              "it carries (what single-tensor cuts cost). The order bound is the optimum with every position "
              "of the graph order a cut point, whatever crosses it: no contiguous partition of this trace can "
              "balance better.", "",
              "| family | model | fx nodes | legal cut points | balance before | balance | optimum | tensors cut "
              "| optimum, any cut | order bound |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    before = result.get("before", {})
    for r in sorted(result["families"], key=lambda r: -r.get("balance", 0)):
        lines.append(f"| {r['family']} | {r['model']} | {r.get('nodes', '-')} | {r.get('cut_points', '-')} "
                     f"| {before.get(r['family'], '-')} | {r.get('balance', r.get('error', '-'))} | {r.get('optimum', '-')} "
                     f"| {r.get('tensors_cut', '-')} | {r.get('any_cut_optimum', '-')} | {r.get('order_bound', '-')} |")
    return lines


def smallest_per_family() -> list[tuple[str, str, int]]:
    """(family, model, params) for the smallest model of each timm module that timm's fx test covers (meta device).

    Cached in ``PICKS`` per timm version: choosing builds all ~1,400 models."""
    if PICKS.is_file():
        cached = json.loads(PICKS.read_text())
        if cached["timm"] == timm.__version__:
            return [tuple(p) for p in cached["picks"]]
    picks = []
    known = _scanned_params()
    for family in sorted(timm.list_modules()):
        best: tuple[int, str] | None = None
        for name in timm.list_models(module=family):
            if any(fnmatch.fnmatch(name, pattern) for pattern in FX_TEST_EXCLUDE):
                continue
            params = known.get(name)
            if params is None:
                try:
                    model = monomod.load_model(name, device="meta")
                except Exception:  # noqa: BLE001 - a model timm cannot build is no candidate
                    continue
                params = sum(p.numel() for p in model.parameters())
            if best is None or (params, name) < best:
                best = (params, name)
        if best is not None:
            picks.append((family, best[1], best[0]))
    PICKS.write_text(json.dumps({"timm": timm.__version__, "picks": picks}, indent=1) + "\n")
    return picks


def _scanned_params() -> dict[str, int]:
    """Parameter counts the explorer benchmark's scan of every timm model recorded (results/explorer_scan.jsonl),
    so that choosing builds only the models it does not list."""
    scan = RESULTS / "explorer_scan.jsonl"
    if not scan.is_file():
        return {}
    rows = (json.loads(line) for line in scan.read_text().splitlines() if line.strip())
    return {r["model"]: r["params"] for r in rows if isinstance(r.get("params"), int)}


def family_row(family: str, name: str, params: int, k: int = FAMILY_K, baseline: Any = None) -> dict[str, Any]:
    """Trace one model on the meta device at its default input size and partition it at ``k``; ``baseline``, a
    partition function of the same signature, is measured on the same trace as ``baseline_balance``."""
    row: dict[str, Any] = {"family": family, "model": name, "params": params}
    try:
        model = monomod.load_model(name, device="meta")
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        traced = monomod.trace(model, torch.zeros(1, *size, device="meta"), name=name)
        start = time.perf_counter()
        part = monomod.partition(traced, k)
        row.update(nodes=len(traced.nodes), partition_s=round(time.perf_counter() - start, 4),
                   balance=round(part.balance, 4), tensors_cut=sum(len(c) for c in part.cuts),
                   optimum=_round(getattr(part, "optimum", None)), cut_points=getattr(part, "legal_points", None))
        wide = search(traced, k, tolerance=-1.0)  # cuts of several tensors considered whatever the balance
        row["any_cut_optimum"] = round(wide.balance, 4)
        row["order_bound"] = round(order_bound(traced, k), 4)
        if baseline is not None:
            row["baseline_balance"] = round(baseline(traced, k).balance, 4)
    except Exception as e:  # noqa: BLE001 - recorded, not fatal: one family must not stop the survey
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return row


def order_bound(traced: Any, k: int) -> float:
    """The best FLOPs balance of any split of ``traced``'s graph order into ``k`` runs, every position a cut point
    whatever crosses it: what no contiguous partition of this trace can beat."""
    prefix = cost_prefix(traced)
    compute = [i for i, info in enumerate(traced.nodes.values()) if _is_compute(info)]
    _, largest = optimal_cuts(prefix, compute[1:], [0] * (len(compute) - 1), k)
    return largest * k / prefix[-1] if prefix[-1] else 1.0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def families(out: Path | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """One row per family (see ``family_row``; the first ``limit`` families); with ``out``, each row is appended
    to it as it is measured."""
    rows = []
    for family, name, params in smallest_per_family()[:limit]:
        row = family_row(family, name, params)
        rows.append(row)
        if out is not None:
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"  {family}: {name} balance {row.get('balance')} {row.get('error', '')}", flush=True)
    return rows


def family_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and worst balance, and how many families are above 1.5, over the rows that partitioned."""
    done = [r for r in rows if "balance" in r]
    if not done:
        return {"families": len(rows), "partitioned": 0}
    worst = max(done, key=lambda r: r["balance"])
    anywhere = [r["any_cut_optimum"] for r in done if "any_cut_optimum" in r]
    return {"families": len(rows), "partitioned": len(done), "median": round(statistics.median(r["balance"] for r in done), 4),
            "median_any_cut": round(statistics.median(anywhere), 4) if anywhere else None,
            "above_1_5_any_cut": sum(a > 1.5 for a in anywhere) if anywhere else None,
            "median_order_bound": round(statistics.median(r.get("order_bound", 0) for r in done), 4),
            "worst_order_bound": max(r.get("order_bound", 0) for r in done),
            "above_1_5_order_bound": sum(r.get("order_bound", 0) > 1.5 for r in done),
            "worst": worst["balance"], "worst_model": worst["model"], "above_1_5": sum(r["balance"] > 1.5 for r in done),
            "max_partition_s": max((r["partition_s"] for r in done if "partition_s" in r), default="-")}


if __name__ == "__main__" and sys.argv[1:2] == ["families"]:
    families(Path(sys.argv[2]))
