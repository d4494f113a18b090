"""Per-node records of a partition: the one source for ``--format json``, Model Explorer files and the page."""
from __future__ import annotations

from typing import Any

from monomod.ir import NodeInfo, Partition, TracedModel

NODE_FIELDS = ("name", "op", "target", "module_path", "shape", "dtype", "flops", "params", "bytes", "module")


def node_records(p: Partition) -> list[dict[str, Any]]:
    """One record per fx node, graph order: what it is, what it costs, and which module (index) holds it."""
    return [node_record(info, p.assignment[name]) for name, info in p.traced.nodes.items()]


def node_record(info: NodeInfo, module: int) -> dict[str, Any]:
    return {
        "name": info.name, "op": info.op, "target": info.target, "module_path": info.module,
        "shape": info.symbolic_shape(), "dtype": info.dtype, "flops": info.flops, "params": info.params,
        "bytes": info.bytes, "module": module,
    }


def edge_records(traced: TracedModel) -> list[list[str]]:
    """``[producer, consumer]`` per use of a value, in graph order of the consumer (fx's own data flow)."""
    return [[arg.name, node.name] for node in traced.graph_module.graph.nodes for arg in node.all_input_nodes]


def shape_text(info: NodeInfo) -> str:
    """``B×197×768`` for a tensor, ``tensors``/``value`` for anything else (how the page and labels show it)."""
    shape = info.symbolic_shape()
    if shape is not None:
        return "×".join(map(str, shape))
    return "tensors" if info.holds_tensors else "value"


def drawn_nodes(traced: TracedModel) -> list[str]:
    """The nodes the page draws, graph order: all but shape arithmetic (ints, sizes), which says nothing about the
    cut and would double the picture, and a module's reads of its own parameters (a functional norm's weight and
    bias), which the page folds into the node that uses them. Both stay in the JSON records."""
    drawn = []
    for node in traced.graph_module.graph.nodes:
        info = traced.nodes[node.name]
        if not (info.holds_tensors or info.op in ("placeholder", "output")):
            continue
        if info.op == "get_attr" and node.users and all(traced.nodes[u.name].module == info.module for u in node.users):
            continue
        drawn.append(node.name)
    return drawn
