"""Trace pass: nn.Module -> TracedModel (fx graph annotated with shapes, bytes, FLOPs and parameters).

FLOPs follow torch.utils.flop_counter's convention (a multiply-add is 2 FLOPs) for matmul-like ops, convolutions and
attention, and add the element-wise work it leaves out (norms, activations, residual adds, softmax), so totals sit a
little above FlopCounterMode's. Ops we have no formula for are measured with FlopCounterMode itself.
"""
from __future__ import annotations

import contextlib
import math
import operator
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from monomod.errors import MonomodError, first_line
from monomod.ir import NodeInfo, TracedModel

# Ops that only move or relabel data.
_FREE_FUNCTIONS = {
    getattr, operator.getitem, torch.reshape, torch.flatten, torch.cat, torch.stack, torch.split, torch.chunk,
    torch.unbind, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.narrow, torch.roll,
    torch.zeros, torch.ones, torch.zeros_like, torch.ones_like, torch.arange, torch.full, torch._assert,
    torch.select, torch.movedim, torch.swapaxes, torch.tile, torch.index_select, torch.gather, torch.take_along_dim,
    F.pad, F.dropout, F.pixel_shuffle, F.pixel_unshuffle,
}
_FREE_METHODS = {
    "size", "dim", "reshape", "view", "view_as", "permute", "transpose", "flatten", "unflatten", "expand",
    "expand_as", "contiguous", "squeeze", "unsqueeze", "chunk", "split", "unbind", "narrow", "to", "type", "float",
    "half", "bfloat16", "double", "int", "long", "bool", "detach", "clone", "repeat", "flip", "roll", "gather",
    "index_select", "select", "movedim", "new_zeros", "new_ones", "new_empty", "type_as", "masked_fill",
    "__getitem__", "numel", "tile", "swapaxes",
}
_FREE_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten, nn.Unflatten)
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm, nn.RMSNorm)
_NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm, F.rms_norm, F.normalize}
_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm", "__matmul__"}
_ADDMM = {torch.addmm, torch.baddbmm, "addmm", "baddbmm"}
_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
NORM_FLOPS_PER_ELEMENT = 5  # mean, variance, normalise, scale, shift
SOFTMAX_FLOPS_PER_ELEMENT = 3  # exp, sum, divide


class MonomodTracer(fx.Tracer):
    """fx tracer that keeps timm's no-trace modules as leaves and wraps its no-trace functions."""

    def __init__(self, leaf_modules: Iterable[type[nn.Module]] = ()) -> None:
        from timm.layers import get_notrace_functions, get_notrace_modules

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self._leaf_types = tuple({*get_notrace_modules(), *leaf_modules})

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaf_types) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module, leaf_modules: Iterable[type[nn.Module]] = ()) -> fx.GraphModule:
    """Trace ``model`` with its first forward argument symbolic and every other argument fixed to its default.

    Fixing optional arguments (``attn_mask=None``, ``is_causal=False``) keeps them out of the graph, so they can
    never cross a cut. Raises MonomodError naming the construct fx could not trace.
    """
    import inspect

    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {
        p.name: p.default
        for p in params[1:]
        if p.default is not inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    tracer = MonomodTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError ... depending on the construct
        raise MonomodError(
            f"cannot trace {type(model).__name__} with torch.fx: {first_line(e)} ({_where(e)})",
            "mark the enclosing module as a leaf (trace(..., leaf_modules=[Cls])) or simplify that code path",
        ) from None
    _drop_specialised_placeholders(graph, keep=len(params) - len(concrete))
    graph.lint()
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    return gm


def _drop_specialised_placeholders(graph: fx.Graph, keep: int) -> None:
    """Remove placeholders fixed by concrete_args (all but the first ``keep``) and the guards fx adds for them."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[keep:]:
        doomed: list[fx.Node] = []
        frontier = [node]
        while frontier:
            n = frontier.pop()
            if n not in doomed:
                doomed.append(n)
                frontier.extend(n.users)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for n in sorted(doomed, key=order.__getitem__, reverse=True):
            graph.erase_node(n)


def trace(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    name: str | None = None,
    leaf_modules: Iterable[type[nn.Module]] = (),
) -> TracedModel:
    """Trace ``model`` and annotate every node with shape, dtype, bytes, FLOPs and parameters at batch size 1.

    ``example_input`` may have any batch size; only its first sample is used. Axes that grow with the batch are
    found by propagating a batch of 2 as well, so they can be reported as ``B``.
    """
    model = model.eval()
    gm = symbolic_trace(model, leaf_modules)
    x1 = example_input[:1]
    annotator = _Annotator(gm)
    shapes2 = _ShapeRecorder(gm)
    with _frozen_parameters(model):
        try:
            annotator.run(x1)
            shapes2.run(x1.expand(2, *x1.shape[1:]).contiguous())
        except MonomodError:
            raise
        except Exception as e:
            raise MonomodError(
                f"{name or type(model).__name__} cannot take an input of shape {tuple(x1.shape)}: {first_line(e)}",
                "pick an --img-size the model accepts (e.g. a multiple of its patch size)",
            ) from None
    nodes: dict[str, NodeInfo] = {}
    for node in gm.graph.nodes:
        info = annotator.info[node.name]
        shape2 = shapes2.shapes.get(node.name)
        batch_dims = tuple(
            i for i, (a, b) in enumerate(zip(info["shape"] or (), shape2 or ())) if a != b
        ) if info["shape"] is not None and shape2 is not None and len(shape2) == len(info["shape"]) else ()
        nodes[node.name] = NodeInfo(name=node.name, batch_dims=batch_dims, **info)
    return TracedModel(
        name=name or type(model).__name__, model=model, graph_module=gm, nodes=nodes, input_shape=tuple(x1.shape)
    )


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Propagate without autograd. Not ``torch.no_grad()``: views of parameters made under it still claim
    ``requires_grad`` without a grad_fn, which FlopCounterMode's module tracker rejects."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Annotator(fx.Interpreter):
    """Runs the graph once and records, per node, what the partitioner needs to know."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.info: dict[str, dict[str, Any]] = {}
        self._seen_params: set[int] = set()

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        with FlopCounterMode(display=False) as counter:
            result = getattr(self, n.op)(n.target, args, kwargs)
        measured = counter.get_total_flops()
        tensors = list(_tensors(result))
        first = result if isinstance(result, torch.Tensor) else None
        self.info[n.name] = dict(
            op=n.op,
            target=_target_name(n),
            module=_module_path(n),
            shape=tuple(first.shape) if first is not None else None,
            dtype=str(first.dtype).removeprefix("torch.") if first is not None else None,
            bytes=sum(t.numel() * t.element_size() for t in tensors),
            flops=_flops(n, self._callee(n), args, kwargs, result, measured) if n.op not in ("placeholder", "get_attr", "output") else 0,
            params=self._new_params(n),
            is_tensor=first is not None,
            holds_tensors=bool(tensors),
        )
        return result

    def _callee(self, n: fx.Node) -> Any:
        return self.fetch_attr(n.target) if n.op == "call_module" else n.target

    def _new_params(self, n: fx.Node) -> int:
        if n.op == "call_module":
            candidates = list(self.fetch_attr(n.target).parameters())
        elif n.op == "get_attr":
            attr = self.fetch_attr(n.target)
            candidates = [attr] if isinstance(attr, nn.Parameter) else []
        else:
            return 0
        fresh = [p for p in candidates if id(p) not in self._seen_params]
        self._seen_params.update(id(p) for p in fresh)
        return sum(p.numel() for p in fresh)


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n.name] = tuple(result.shape)
        return result


def _flops(n: fx.Node, callee: Any, args: tuple, kwargs: dict, out: Any, measured: int) -> int:
    """FLOPs of one node, per the conventions in the module docstring."""
    if not isinstance(out, torch.Tensor):
        return measured
    out_numel = out.numel()
    key = callee if n.op != "call_method" else n.target
    ins = [a for a in _tensors((args, kwargs))]
    biggest_in = max((t.numel() for t in ins), default=0)

    if isinstance(callee, nn.Module):
        if isinstance(callee, _FREE_MODULES):
            return 0
        if isinstance(callee, nn.Linear):
            return _linear(out, callee.in_features, callee.bias is not None)
        if isinstance(callee, nn.modules.conv._ConvNd):
            return _conv(callee, args[0], out)
        if isinstance(callee, _NORM_MODULES):
            return NORM_FLOPS_PER_ELEMENT * out_numel
        if isinstance(callee, (nn.Softmax, nn.LogSoftmax)):
            return SOFTMAX_FLOPS_PER_ELEMENT * out_numel
        if isinstance(callee, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                               nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
            return biggest_in
        # Leaf modules we have no formula for (timm no-trace blocks, attention modules ...): trust the counter,
        # and count at least one FLOP per output element for the element-wise work it cannot see.
        return measured + (out_numel if measured == 0 else 0)

    if key in _FREE_FUNCTIONS or key in _FREE_METHODS:
        return 0
    if key is F.linear:
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return _linear(out, weight.shape[-1], bias is not None)
    if key in _MATMUL:
        return 2 * out_numel * args[0].shape[-1]
    if key in _ADDMM:
        return 2 * out_numel * args[1].shape[-1] + out_numel
    if key in _CONV:
        weight = args[1]
        return 2 * out_numel * math.prod(weight.shape[1:]) + (out_numel if _arg(args, kwargs, 2, "bias") is not None else 0)
    if key is F.scaled_dot_product_attention:
        q, k, v = args[:3]
        scores = math.prod(q.shape[:-1]) * k.shape[-2]
        return 2 * scores * q.shape[-1] + 2 * scores * v.shape[-1] + SOFTMAX_FLOPS_PER_ELEMENT * scores
    if key in _NORM_FUNCTIONS:
        return NORM_FLOPS_PER_ELEMENT * out_numel
    if key in _SOFTMAX:
        return SOFTMAX_FLOPS_PER_ELEMENT * out_numel
    if measured:  # einsum and other contractions we have no formula for
        return measured
    # Element-wise ops and reductions: one FLOP per element touched.
    return max(out_numel, biggest_in)


def _linear(out: torch.Tensor, in_features: int, bias: bool) -> int:
    return 2 * out.numel() * in_features + (out.numel() if bias else 0)


def _conv(conv: nn.modules.conv._ConvNd, x: torch.Tensor, out: torch.Tensor) -> int:
    macs_per_output = (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
    if conv.transposed:  # each input element scatters into out_channels/groups x kernel outputs
        macs = x.numel() * (conv.out_channels // conv.groups) * math.prod(conv.kernel_size)
    else:
        macs = out.numel() * macs_per_output
    return 2 * macs + (out.numel() if conv.bias is not None else 0)


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _target_name(n: fx.Node) -> str:
    if isinstance(n.target, str):
        return n.target
    return getattr(n.target, "__name__", str(n.target))


def _module_path(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    if n.op in ("get_attr", "call_module") and isinstance(n.target, str):
        return (n.target.rpartition(".")[0] or n.target) if n.op == "get_attr" else n.target
    return ""


def _where(e: BaseException) -> str:
    """file:line of the innermost frame outside torch, i.e. the model code fx tripped over."""
    frames = traceback.extract_tb(e.__traceback__)
    torch_dir = torch.__file__.rsplit("/", 2)[0]
    user = [f for f in frames if not f.filename.startswith(torch_dir) and "monomod" not in f.filename]
    frame = user[-1] if user else (frames[-1] if frames else None)
    return f"at {frame.filename}:{frame.lineno} in {frame.name}" if frame else "location unknown"


__all__ = ["MonomodTracer", "symbolic_trace", "trace"]
