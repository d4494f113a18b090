"""A layered layout of a traced graph, computed once in Python and shipped with the page.

fx lists nodes in topological order, so layers need no search: a node sits one layer below its lowest input
(longest-path layering), and a parameter read sits just above its first consumer. A few barycentre sweeps (down,
then up) order each layer to cut crossings, and a final down pass pulls every node under the mean of its inputs,
keeping a minimum gap. That is enough here: the modules are contiguous, so the picture is one long column with short
side branches (attention's q/k/v, residual adds, downsample paths), which a general-purpose layout engine would
spend seconds on.
"""
from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

import networkx as nx

from monomod.ir import TracedModel


def layered_layout(traced: TracedModel, drawn: Sequence[str], sweeps: int = 4) -> dict[str, tuple[float, int]]:
    """``name -> (x, layer)`` for the ``drawn`` nodes; x is in node widths (one unit = one node slot)."""
    graph = _drawn_graph(traced, drawn)
    layers = _layers(graph, drawn, [n for n in drawn if traced.nodes[n].op == "placeholder"])
    rows: dict[int, list[str]] = {}
    for name in drawn:
        rows.setdefault(layers[name], []).append(name)
    ordered = [rows[r] for r in sorted(rows)]
    slot = _slots(ordered)
    for sweep in range(sweeps):
        down = sweep % 2 == 0
        for row in (ordered if down else reversed(ordered)):
            neighbours = graph.predecessors if down else graph.successors
            row.sort(key=lambda n, nb=neighbours: _mean_slot(nb(n), slot, slot[n]))
            slot.update(_centred(row))
    x = _coordinates(graph, ordered)
    return {name: (x[name], layers[name]) for name in drawn}


def _drawn_graph(traced: TracedModel, drawn: Sequence[str]) -> nx.DiGraph:
    keep = set(drawn)
    graph = nx.DiGraph()
    graph.add_nodes_from(drawn)
    for node in traced.graph_module.graph.nodes:
        if node.name in keep:
            graph.add_edges_from((arg.name, node.name) for arg in node.all_input_nodes if arg.name in keep)
    return graph


def _layers(graph: nx.DiGraph, order: Sequence[str], inputs: Sequence[str]) -> dict[str, int]:
    """Longest-path layers from the inputs, in graph order. What does not depend on an input (parameter reads and
    what is computed from them alone, such as a relative position bias) goes as late as its first user allows,
    so it sits beside the block that uses it and not at the top of the picture."""
    fed = set(inputs).union(*(nx.descendants(graph, name) for name in inputs))
    layer: dict[str, int] = {}
    for name in order:
        if name in fed:
            layer[name] = 1 + max((layer[p] for p in graph.predecessors(name) if p in fed), default=-1)
    for name in reversed(order):
        if name not in fed:
            layer[name] = max(0, min((layer[u] for u in graph.successors(name)), default=1) - 1)
    return layer


def _slots(rows: list[list[str]]) -> dict[str, float]:
    slot: dict[str, float] = {}
    for row in rows:
        slot.update(_centred(row))
    return slot


def _centred(row: list[str]) -> dict[str, float]:
    return {name: i - (len(row) - 1) / 2 for i, name in enumerate(row)}


def _mean_slot(neighbours, slot: dict[str, float], default: float) -> float:
    values = [slot[n] for n in neighbours]
    return fmean(values) if values else default


def _coordinates(graph: nx.DiGraph, rows: list[list[str]], gap: float = 1.0) -> dict[str, float]:
    """Each node under the mean of its inputs, pushed apart to ``gap`` in layer order, the row kept centred on
    where its nodes wanted to be (so the main column stays straight)."""
    x: dict[str, float] = {}
    for row in rows:
        wanted = [_mean_slot(graph.predecessors(n), x, i - (len(row) - 1) / 2) for i, n in enumerate(row)]
        placed = []
        for want in wanted:
            placed.append(max(want, placed[-1] + gap) if placed else want)
        shift = fmean(w - p for w, p in zip(wanted, placed))
        for name, pos in zip(row, placed):
            x[name] = round(pos + shift, 3)
    return x
