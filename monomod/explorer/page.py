"""The explorer page: a partition's nodes, layout and cut rule as data, inlined with the page's own JS and CSS.

Everything the page needs travels inside it (no network, no server): the data as ``<script type="application/json">``
and the code from ``explorer.js`` / ``explorer.css`` (package data). Node fields travel as columns (one list per
field), which keeps a 1,000-node graph around 100 KB.
"""
from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

from monomod.explorer.layout import layered_layout
from monomod.explorer.records import drawn_nodes, shape_text
from monomod.ir import Partition
from monomod.passes.partition import cut_points, partition, path_prefixes

# Bit flags of ``nodes.kind`` (the JS reads the same numbers).
REMAT, COMPUTE, DRAWN = 1, 2, 4


def explorer_html(p: Partition, run: dict[str, Any] | None = None) -> str:
    """The whole page. ``run`` (``monomod.report.run_page_section``'s data) adds a run's results and hybrids."""
    data = page_data(p, run)
    title = f"monomod · {p.traced.name}" + (" · run report" if run else "")
    return _TEMPLATE.format(
        title=html.escape(title),
        css=_asset("explorer.css"),
        js=_asset("explorer.js"),
        data=embed_json(data),
    )


def embed_json(data: Any) -> str:
    """JSON safe inside a ``<script>`` element. Script text is raw: no entity is decoded, so html.escape would
    corrupt it. What must not appear is ``</script`` or ``<!--``; every ``<`` (only ever inside a JSON string)
    becomes ``\\u003c``, which JSON.parse turns back into ``<``."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def page_data(p: Partition, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the page draws and recomputes: node columns, inputs per node, the layout, legal cut points, the
    partition's cuts as node positions and the figures the CLI gives for them (the page must reproduce these)."""
    traced = p.traced
    names = list(traced.nodes)
    index = {name: i for i, name in enumerate(names)}
    drawn = drawn_nodes(traced)
    layout = layered_layout(traced, drawn)
    positions = _cut_positions(p, index)
    labels = cut_points(traced)
    return {
        "model": traced.name, "cost": p.cost, "method": p.method, "k": p.k,
        "input_shape": ["B", *traced.input_shape[1:]], "params": traced.params, "flops": traced.flops,
        "nodes": _node_columns(p, layout, labels),
        "inputs": [[index[a.name] for a in node.all_input_nodes] for node in traced.graph_module.graph.nodes],
        "cuts": positions,
        "collapsed": block_paths(info.module for name, info in traced.nodes.items() if name in layout),
        "reference": figures(partition(traced, cost=p.cost, cuts=[labels.get(names[i], names[i]) for i in positions]) if positions else p),
        "found": figures(p),
        "optimum": p.optimum,  # the best balance any legal cut reaches at this K
        "run": run,
    }


def _node_columns(p: Partition, layout: dict[str, tuple[float, int]], points: dict[str, str]) -> dict[str, list]:
    traced = p.traced
    paths = sorted({info.module for info in traced.nodes.values()})
    path_index = {path: i for i, path in enumerate(paths)}
    infos = list(traced.nodes.values())
    return {
        "paths": paths,
        "name": [i.name for i in infos],
        "op": [i.op for i in infos],
        "target": [i.target for i in infos],
        "path": [path_index[i.module] for i in infos],
        "shape": [shape_text(i) for i in infos],
        "dtype": [i.dtype or "" for i in infos],
        "flops": [i.flops for i in infos],
        "params": [i.params for i in infos],
        "bytes": [i.bytes for i in infos],
        "kind": [_kind(i, i.name in layout) for i in infos],
        "x": [layout[i.name][0] if i.name in layout else 0 for i in infos],
        "layer": [layout[i.name][1] if i.name in layout else -1 for i in infos],
        "cut": [points.get(i.name, "") for i in infos],
    }


def _kind(info, drawn: bool) -> int:
    compute = info.op.startswith("call_") and not info.rematerializable
    return (REMAT if info.rematerializable else 0) | (COMPUTE if compute else 0) | (DRAWN if drawn else 0)


def _cut_positions(p: Partition, index: dict[str, int]) -> list[int]:
    """Where each module after the first begins, as a node index: its first compute node (what a plan records
    and replays, see ``compiler.stage.record_partition``)."""
    infos = p.traced.nodes
    return [index[next(n for n in m.nodes if infos[n].op.startswith("call_") and not infos[n].rematerializable)]
            for m in p.modules[1:]]


def figures(p: Partition) -> dict[str, Any]:
    """The numbers the page shows for a partition, as ``inspect`` computes them."""
    return {
        "flops": [m.flops for m in p.modules], "params": [m.params for m in p.modules],
        "balance": p.balance, "bytes_cut": p.bytes_cut,
        "cut_bytes": [sum(v.bytes for v in cut) for cut in p.cuts],
    }


def block_paths(paths) -> list[str]:
    """The module paths the page starts collapsed at: one per repeated block, else a top-level part
    (``patch_embed``). A block is the deepest indexed path that holds more than one module (``blocks.3``,
    ``layers.1.blocks.0``, ``layer2.1``; not ``layer2.0.downsample.0``, a single conv).

    A stage that holds blocks (``layers.1``) stays open and its other children (``layers.1.downsample``) collapse
    on their own, so no block hides inside a bigger box. ``paths`` has one entry per drawn node.
    """
    paths = [path for path in paths if path]
    distinct = set(paths)
    composite = {prefix for path in distinct for prefix in path_prefixes(path)[:-1]}
    deepest = {path: _deepest_index_prefix(path, composite) for path in distinct}
    blocks = {d for d in deepest.values() if d}
    holders = {prefix for b in blocks for prefix in path_prefixes(b)[:-1]}
    chosen = set()
    for path, block in deepest.items():
        depth = block.count(".") + 2 if block else 1
        candidate = block if block and block not in holders else ".".join(path.split(".")[:depth])
        if candidate not in holders:
            chosen.add(candidate)
    counts = {c: sum(1 for path in paths if path == c or path.startswith(c + ".")) for c in chosen}
    return sorted(c for c in chosen if counts[c] > 1)


def _deepest_index_prefix(path: str, composite: set[str]) -> str:
    """The deepest prefix ending in an index that holds other modules ("" when there is none)."""
    return next((p for p in reversed(path_prefixes(path)) if p.rpartition(".")[2].isdigit() and p in composite), "")


def _asset(name: str) -> str:
    return resources.files("monomod.explorer").joinpath(name).read_text(encoding="utf-8")


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style></head>
<body>
<div id="app"><noscript>This page draws the partition with JavaScript: allow scripts for this file.</noscript></div>
<script type="application/json" id="monomod-data">{data}</script>
<script>{js}</script>
</body></html>
"""
