"""Google Model Explorer files: a graph collection (namespaces from module paths) and node-data overlays.

Model Explorer (``pip install 'monomod[model-explorer]'``) opens a JSON file of ``{"label", "graphs": [...]}`` with
its built-in JSON loader, nests nodes by ``namespace`` ("blocks/3/attn"), and colours nodes by a node-data file
(``{graph id: {"results": {node id: {"value": ...}}, ...}}``). It knows nothing of cuts, so monomod's modules come as
node data: load ``*.modules.json`` to see them, ``*.flops.json`` for the cost.
"""
from __future__ import annotations

from typing import Any

from monomod.explorer.records import shape_text
from monomod.ir import NodeInfo, Partition

# One colour per module, cycled (the page's palette, darker, as Model Explorer draws it as a node background).
MODULE_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                  "#9c755f", "#bab0ac", "#86bcb6", "#d37295")


def model_explorer_files(p: Partition) -> dict[str, Any]:
    """``suffix -> JSON object``: ``graph.json`` (the graph collection), ``modules.json`` and ``flops.json``."""
    graph_id = p.traced.name
    return {
        "graph.json": {"label": graph_id, "graphs": [_graph(p, graph_id)]},
        "modules.json": {graph_id: _modules_data(p)},
        "flops.json": {graph_id: _flops_data(p)},
    }


def _graph(p: Partition, graph_id: str) -> dict[str, Any]:
    nodes = []
    for node in p.traced.graph_module.graph.nodes:
        info = p.traced.nodes[node.name]
        nodes.append({
            "id": node.name,
            "label": _label(info),
            "namespace": _namespace(info),
            "attrs": _attrs(info, p.assignment[node.name]),
            "incomingEdges": [{"sourceNodeId": arg.name, "sourceNodeOutputId": "0", "targetNodeInputId": str(i)}
                              for i, arg in enumerate(node.all_input_nodes)],
            "outputsMetadata": [{"id": "0", "attrs": [{"key": "shape", "value": shape_text(info)},
                                                      {"key": "dtype", "value": info.dtype or "-"},
                                                      {"key": "bytes", "value": str(info.bytes)}]}],
        })
    return {"id": graph_id, "nodes": nodes}


def _label(info: NodeInfo) -> str:
    """The node's own name inside its namespace: the last path component of a module call, else the target."""
    if info.op == "call_module":
        return info.target.rpartition(".")[2]
    return info.target if info.op.startswith("call_") else info.op


def _namespace(info: NodeInfo) -> str:
    """Module path as Model Explorer's "/" hierarchy; a module call sits in its parent (its label is the leaf)."""
    path = info.module
    if info.op == "call_module" and path == info.target:
        path = path.rpartition(".")[0]
    return path.replace(".", "/")


def _attrs(info: NodeInfo, module: int) -> list[dict[str, str]]:
    values = {"op": info.op, "target": info.target, "module_path": info.module or "-", "monomod_module": str(module),
              "flops": str(info.flops), "params": str(info.params)}
    return [{"key": key, "value": value} for key, value in values.items()]


def _modules_data(p: Partition) -> dict[str, Any]:
    """Module index per node, one colour per module (thresholds at i + 0.5)."""
    return {
        "name": f"monomod module (K={p.k})",
        "results": {name: {"value": module} for name, module in p.assignment.items()},
        "thresholds": [{"value": i + 0.5, "bgColor": MODULE_COLOURS[i % len(MODULE_COLOURS)]} for i in range(p.k)],
    }


def _flops_data(p: Partition) -> dict[str, Any]:
    return {
        "name": "FLOPs per sample",
        "results": {name: {"value": info.flops} for name, info in p.traced.nodes.items()},
        "gradient": [{"stop": 0, "bgColor": "#f7fbff"}, {"stop": 1, "bgColor": "#08306b"}],
    }
