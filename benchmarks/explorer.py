"""The partition explorer page in headless Chromium: size, first render, and how a big graph handles.

For vit_base at K=8 (the issue's bar: at most 1.5 MB and a first render within 2 s on 2 cores) and for the timm
model under 100M parameters with the most fx nodes (found by ``scan``; see RESULTS.md): the page's size, its node and
edge counts, the time from navigation start to the first frame (``window.monomodRendered``, medians of repeats),
and on the big one, fully expanded: the time to expand everything, to redraw the whole graph and a zoomed-in view,
to move a cut (the --cuts rule over every node) and to search. Pages are traced on the meta device, as ``inspect``
does. Needs Debian's ``chromium`` (``tests/headless.py`` drives it over a pipe).
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from monomod.explorer import explorer_html
from monomod.frontend import load_model
from monomod.passes.partition import partition
from monomod.passes.trace import trace
from tests.headless import Chromium

BASE = ("vit_base_patch16_224", 8)
# The largest fx graph among timm models under 100M parameters (a scan of every timm.list_models() name).
LARGE = ("regnetz_d8_evos", 8)
BUDGET_BYTES, BUDGET_SECONDS = 1.5e6, 2.0
SCAN = Path(__file__).parent / "results" / "explorer_scan.jsonl"


def build_page(model: str, k: int, out: Path) -> dict[str, Any]:
    """``monomod inspect MODEL --modules K --html`` without the CLI: the page and what it holds."""
    import torch

    net = load_model(model, device="meta")
    size = net.pretrained_cfg.get("input_size", (3, 224, 224))
    traced = trace(net, torch.randn(1, *size, device="meta"), name=model)
    part = partition(traced, k)
    out.write_text(explorer_html(part))
    graph = traced.graph_module.graph
    return {"model": model, "k": k, "params": traced.params, "fx_nodes": len(traced.nodes),
            "fx_edges": sum(len(n.all_input_nodes) for n in graph.nodes), "page_bytes": out.stat().st_size}


def first_render_ms(browser: Chromium, page: Path, repeats: int, expanded: bool = False) -> float:
    """Navigation start to the first frame; ``expanded`` opens the page with every node drawn (``#expanded``)."""
    times = []
    for _ in range(repeats):
        browser.load("about:blank")  # a real navigation each time (only the #fragment would differ)
        browser.load(page.resolve().as_uri() + ("#expanded" if expanded else ""))
        times.append(browser.wait_for("window.monomodRendered"))
    return statistics.median(times)


def handling(browser: Chromium, page: Path) -> dict[str, Any]:
    """Fully expanded: expand-all, redraws, a moved cut and a search, in ms (each a median of 5)."""
    browser.load(page)
    browser.wait_for("window.monomodRendered")
    collapsed = browser.eval("monomod.visibleCount()")
    expand = _timed(browser, "monomod.collapseToBlocks(); const t = performance.now(); monomod.expandAll(); "
                             "return performance.now() - t;")
    stats = browser.eval("document.querySelector('#status').textContent")
    return {
        "boxes_collapsed": collapsed, "boxes_expanded": browser.eval("monomod.visibleCount()"), "status": stats,
        "expand_all_ms": expand,
        "redraw_fit_ms": _timed(browser, "return monomod.redraw();"),
        "redraw_zoom1_ms": _timed(browser, "monomod.zoom(1); return monomod.redraw();"),
        "move_cut_ms": _timed(browser, "const t = performance.now(); monomod.stepCut(3, 1); monomod.stepCut(3, -1); "
                                       "return (performance.now() - t) / 2;"),
        "search_ms": _timed(browser, "const t = performance.now(); monomod.search('attn'); return performance.now() - t;"),
        "console_errors": browser.console_errors(),
    }


def _timed(browser: Chromium, body: str, repeats: int = 5) -> float:
    return round(statistics.median(browser.eval(f"(() => {{ {body} }})()") for _ in range(repeats)), 1)


def run(quick: bool = False) -> dict[str, Any]:
    repeats = 2 if quick else 7
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Chromium(width=1400, height=900) as browser:
        version = browser.send("Browser.getVersion", session=None)["product"]
        for model, k in (BASE, LARGE):
            page = Path(tmp) / f"{model}.html"
            row = build_page(model, k, page)
            row["first_render_ms"] = round(first_render_ms(browser, page, repeats), 1)
            row["first_render_expanded_ms"] = round(first_render_ms(browser, page, repeats, expanded=True), 1)
            row.update(handling(browser, page))
            rows.append(row)
    return {"rows": rows, "browser": f"{version}, headless, 1400x900", "repeats": repeats,
            "budget": {"page_bytes": BUDGET_BYTES, "first_render_s": BUDGET_SECONDS},
            "scan": _scan_summary(SCAN)}


def _scan_summary(path: Path) -> dict[str, Any] | None:
    """The largest graphs of the last ``scan`` (run apart: ``python -m benchmarks.explorer``)."""
    import json

    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    counted = sorted((r for r in rows if "nodes" in r), key=lambda r: -r["nodes"])
    return {"models": len(rows), "under_limit": len(counted), "failed": sum(1 for r in rows if "error" in r),
            "top": counted[:8]}


def scan(out: Path, limit: float = 100e6) -> list[dict[str, Any]]:
    """fx node count (eval mode, as ``trace`` sees it) of every ``timm.list_models()`` architecture under ``limit``
    parameters, built on the meta device; one JSON line per model appended to ``out`` (so it resumes); the 15
    largest graphs. About 20 minutes on one core."""
    import json
    import signal

    import timm
    import torch

    from monomod.passes.trace import symbolic_trace

    done = {json.loads(line)["model"] for line in out.read_text().splitlines()} if out.exists() else set()

    def give_up(*_: Any) -> None:
        raise TimeoutError("over 60 s")

    signal.signal(signal.SIGALRM, give_up)
    with out.open("a") as sink:
        for name in (n for n in timm.list_models() if n not in done):
            sink.write(json.dumps(_count(name, limit, torch, timm, symbolic_trace)) + "\n")
            sink.flush()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return sorted((r for r in rows if "nodes" in r), key=lambda r: -r["nodes"])[:15]


def _count(name: str, limit: float, torch: Any, timm: Any, symbolic_trace: Any) -> dict[str, Any]:
    import signal

    row: dict[str, Any] = {"model": name}
    signal.alarm(60)
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False).eval()
        row["params"] = sum(p.numel() for p in model.parameters())
        if row["params"] < limit:
            row["nodes"] = len(symbolic_trace(model).graph.nodes)
    except Exception as e:  # noqa: BLE001 - an architecture fx cannot trace is recorded, not fatal
        row["error"] = f"{type(e).__name__}: {str(e)[:80]}"
    finally:
        signal.alarm(0)
    return row


def markdown(result: dict[str, Any]) -> str:
    head = ("| model | K | params | fx nodes | fx edges | page | first render (ms) | first render, all expanded (ms) | "
            "boxes at block level / expanded | expand all (ms) | redraw, all in view (ms) | redraw at zoom 1 (ms) | "
            "move a cut (ms) | search (ms) |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['k']} | {r['params'] / 1e6:.1f}M | {r['fx_nodes']} | {r['fx_edges']} | "
                     f"{r['page_bytes'] / 1e6:.3f} MB | {r['first_render_ms']} | {r['first_render_expanded_ms']} | {r['boxes_collapsed']} / "
                     f"{r['boxes_expanded']} | {r['expand_all_ms']} | {r['redraw_fit_ms']} | {r['redraw_zoom1_ms']} | "
                     f"{r['move_cut_ms']} | {r['search_ms']} |")
    b = result["budget"]
    lines += ["", f"Browser: {result.get('browser', 'Chromium')}; first renders are medians of "
              f"{result.get('repeats', '?')} loads, the rest of 5.", "", f"Bars (issue 24): vit_base K=8 page at most {b['page_bytes'] / 1e6:g} MB, first render at most "
              f"{b['first_render_s']:g} s. First render: navigation start to the first frame in headless Chromium "
              "(median). The expanded figures draw every node of the graph; edges and boxes outside the view are "
              "culled, labels drawn from zoom 0.45 up.", ""]
    if result.get("scan"):
        scan_ = result["scan"]
        lines += [f"Largest fx graphs (eval mode, as `inspect` traces them) of the {scan_['models']} names in "
                  f"`timm.list_models()`: {scan_['under_limit']} under 100M parameters traced, "
                  f"{scan_['models'] - scan_['under_limit'] - scan_['failed']} at or over 100M, {scan_['failed']} "
                  "failed to build or trace (`python -m benchmarks.explorer`, results/explorer_scan.jsonl):", "",
                  "| model | params | fx nodes |", "|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['nodes']} |" for r in scan_["top"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    top = scan(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("benchmarks/results/explorer_scan.jsonl"))
    print(json.dumps(top, indent=1))
