"""Extract pass: Partition -> K self-contained, batch-polymorphic fx GraphModules that chain to the model.

Each module is a fresh fx graph holding only its own nodes, plus copies of the parameter reads and shape arithmetic
it needs, so it references exactly the submodules and parameters it uses (shared with the traced model, not copied:
deep-copy a module if it must train independently). Shapes are read from the live inputs, as the original code
does, so no example batch size is baked in.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from monomod.ir import Partition


def extract(partition: Partition) -> list[fx.GraphModule]:
    """Build the K teacher modules of ``partition``.

    Module 0 takes the model's input; module i > 0 takes module i-1's outputs positionally (one value, or the
    tuple unpacked); the last returns the model's output. Each module carries ``index``, ``input_names`` and
    ``output_names`` attributes naming its boundary values.
    """
    source = partition.traced.graph_module
    fx_nodes = list(source.graph.nodes)
    output_node = fx_nodes[-1]
    k = partition.k
    modules = []
    for spec in partition.modules:
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        local = set(spec.nodes) | set(spec.recomputed)
        if spec.index > 0:
            for value in spec.inputs:
                env[value.name] = graph.placeholder(value.name)
        for node in fx_nodes:
            if node.name in local and node.op != "output":
                env[node.name] = graph.node_copy(node, lambda arg: env[arg.name])
        if spec.index == k - 1:
            graph.output(fx.map_arg(output_node.args[0], lambda arg: env[arg.name]))
        else:
            outputs = [env[v.name] for v in spec.outputs]
            graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        graph.lint()
        module = fx.GraphModule(source, graph, class_name=f"{type(partition.traced.model).__name__}Module{spec.index}")
        module.index = spec.index
        module.input_names = tuple(v.name for v in spec.inputs)
        module.output_names = tuple(v.name for v in spec.outputs)
        modules.append(module)
    return modules


class Chain(nn.Module):
    """Runs extracted modules one after another, unpacking multi-value boundaries positionally.

    ``Chain(extract(p))(x)`` equals the original model's ``forward(x)``.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, *inputs: Any) -> Any:
        values: Any = inputs
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            values = part(*values)
            if i < last and len(getattr(part, "output_names", ())) <= 1:
                values = (values,)
        return values
