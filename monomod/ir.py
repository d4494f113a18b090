"""The values passed between compiler passes: a traced model and its partition.

They are plain dataclasses over a torch.fx graph. Node annotations are keyed by fx node name and listed in graph
order (which is topological), so every pass can walk them without re-deriving the order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch.fx as fx
from torch import nn

Shape = tuple[int, ...]


@dataclass(frozen=True)
class NodeInfo:
    """What the trace pass measured for one fx node, at batch size 1."""

    name: str
    op: str  # fx opcode: placeholder, get_attr, call_module, call_function, call_method, output
    target: str  # readable target: module path, function or method name
    module: str  # qualified path of the innermost nn.Module the node was traced in ("" at top level)
    shape: Shape | None  # output shape for tensors, None otherwise
    batch_dims: tuple[int, ...]  # axes of ``shape`` that grow with the batch
    dtype: str | None
    bytes: int  # bytes of every tensor in the output, per sample
    flops: int  # per sample; multiply-add = 2 FLOPs, as torch.utils.flop_counter counts them
    params: int  # parameters first used by this node (shared parameters are counted once)
    is_tensor: bool  # output is a single tensor
    holds_tensors: bool  # output is a tensor or a container of tensors

    @property
    def rematerializable(self) -> bool:
        """Free to recompute in any module: parameter/buffer reads and values that hold no tensor (ints, shapes)."""
        return self.op == "get_attr" or (not self.holds_tensors and self.op not in ("placeholder", "output"))

    def symbolic_shape(self) -> list[int | str] | None:
        """The shape with batch axes written as ``"B"``, as ONNX writes dynamic axes."""
        if self.shape is None:
            return None
        return ["B" if i in self.batch_dims else d for i, d in enumerate(self.shape)]


@dataclass
class TracedModel:
    """An fx graph of ``model`` with per-node shapes, bytes, FLOPs and parameter counts."""

    name: str
    model: nn.Module
    graph_module: fx.GraphModule
    nodes: dict[str, NodeInfo]  # graph order
    input_shape: Shape  # example input, batch 1

    @property
    def flops(self) -> int:
        return sum(n.flops for n in self.nodes.values())

    @property
    def params(self) -> int:
        return sum(n.params for n in self.nodes.values())

    def fx_nodes(self) -> list[fx.Node]:
        return list(self.graph_module.graph.nodes)

    def to_networkx(self) -> nx.DiGraph:
        """The data-flow graph: one vertex per fx node (with its NodeInfo fields), one edge per use."""
        g = nx.DiGraph()
        for node in self.graph_module.graph.nodes:
            g.add_node(node.name, **self.nodes[node.name].__dict__)
            for user in node.users:
                g.add_edge(node.name, user.name)
        return g


@dataclass(frozen=True)
class BoundaryValue:
    """A value that crosses from one module to the next."""

    name: str
    shape: list[int | str] | None  # batch axes as "B"
    dtype: str | None
    bytes: int  # per sample

    @property
    def token_width(self) -> int | None:
        """D for a ``[B, T, D]`` token tensor; None for any other layout (a stitch there would need a conv)."""
        shape = self.shape
        return int(shape[2]) if shape is not None and len(shape) == 3 and shape[0] == "B" else None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype, "bytes": self.bytes}

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name}: {self.dtype or 'value'}"
        return f"{self.name} {'×'.join(map(str, self.shape))}"


@dataclass(frozen=True)
class ModuleSpec:
    """One contiguous teacher module: the fx nodes it computes and the values on its boundary."""

    index: int
    nodes: tuple[str, ...]  # nodes assigned to this module, graph order
    recomputed: tuple[str, ...]  # parameter reads and shape arithmetic copied in from other modules
    inputs: tuple[BoundaryValue, ...]
    outputs: tuple[BoundaryValue, ...]  # for the last module: the model's output
    params: int
    flops: int
    covers: tuple[str, ...]  # human summary of the model parts it holds, e.g. ("blocks.2-3", "blocks.4 (attn)")

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "covers": list(self.covers),
            "params": self.params,
            "flops": self.flops,
            "nodes": len(self.nodes),
            "inputs": [v.to_json() for v in self.inputs],
            "outputs": [v.to_json() for v in self.outputs],
        }


@dataclass
class Partition:
    """K contiguous modules of a traced model, closed under data dependencies, in execution order."""

    traced: TracedModel
    modules: list[ModuleSpec]
    cost: str  # "flops" or "params": what the parts are balanced by
    method: str  # "optimal" (the exact search) or "manual"
    assignment: dict[str, int] = field(repr=False)  # node name -> module index
    optimum: float | None = None  # the best balance any legal cut reaches at this K (what "optimal" achieves)
    legal_points: int = 0  # how many legal cut points the search chose from
    single_tensor_optimum: float | None = None  # the optimum over single-tensor cut points (None: fewer than K-1)

    @property
    def k(self) -> int:
        return len(self.modules)

    def module_cost(self, spec: ModuleSpec) -> int:
        return spec.flops if self.cost == "flops" else spec.params

    @property
    def balance(self) -> float:
        """max/mean of the chosen cost over modules: 1.0 is perfect balance."""
        costs = [self.module_cost(m) for m in self.modules]
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean else 1.0

    @property
    def cuts(self) -> list[tuple[BoundaryValue, ...]]:
        """The values crossing each of the K-1 cuts."""
        return [m.outputs for m in self.modules[:-1]]

    @property
    def bytes_cut(self) -> int:
        """Bytes per sample crossing all cuts together."""
        return sum(v.bytes for cut in self.cuts for v in cut)

    def to_json(self) -> dict[str, Any]:
        t = self.traced
        return {
            "model": t.name,
            "input_shape": ["B", *t.input_shape[1:]],
            "params": t.params,
            "flops": t.flops,
            "cost": self.cost,
            "method": self.method,
            "balance": round(self.balance, 4),
            "optimum": None if self.optimum is None else round(self.optimum, 4),
            "legal_cut_points": self.legal_points,
            "single_tensor_optimum": None if self.single_tensor_optimum is None else round(self.single_tensor_optimum, 4),
            "bytes_cut": self.bytes_cut,
            "modules": [m.to_json() for m in self.modules],
        }
