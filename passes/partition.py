"""Partition pass: TracedModel -> Partition of K contiguous modules, found with networkx minimum cuts.

Each cut is an s-t minimum cut of a flow network built from the fx graph:

* every value ``v`` becomes a gadget ``v_in -> v_out`` whose capacity is the bytes ``v`` holds, so cutting it
  costs what must be sent to the next module, once, however many consumers it has;
* every use ``v -> w`` becomes ``v_out -> w_in`` (infinite), and ``w_in -> v_in`` (infinite, reversed), so the
  source side is closed under predecessors: every module is contiguous and the modules chain without cycles;
* balance comes from windows: nodes whose cumulative cost (in graph order) ends before ``target - w`` are pinned
  to the source, nodes that start after ``target + w`` to the sink; ``target`` adapts to what earlier cuts took;
* among cuts of equal bytes (every residual stream of a ViT has the same size) a tie-break term, too small ever
  to outweigh one byte, prefers tensors produced closest to the target, which gives the balance.

Values that hold no tensor (ints from ``.shape``, None, asserts) and parameter reads cost nothing to cut: the
extract pass recomputes them where they are needed, or passes the (tiny) value on.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence

import networkx as nx
from torch import nn

from monomod.errors import MonomodError
from monomod.ir import BoundaryValue, ModuleSpec, NodeInfo, Partition, TracedModel

COSTS = ("flops", "params")
_SOURCE, _SINK = "__source__", "__sink__"
_TIE_RESOLUTION = 10**6  # tie-break steps across the whole cost range


def partition(
    traced: TracedModel,
    modules: int | None = None,
    *,
    cost: str = "flops",
    cuts: Sequence[str] | None = None,
    tolerance: float = 0.25,
) -> Partition:
    """Split ``traced`` into ``modules`` contiguous parts, minimising the bytes crossing each cut.

    ``cost`` ("flops" or "params") is what the parts are balanced by. ``tolerance`` bounds the imbalance: the
    search aims for max/mean cost <= 1 + tolerance, narrowing its balance windows until it gets there (where the
    model's granularity allows; otherwise the best balance found is returned). ``cuts`` overrides the search: each name (a module path such as
    ``"blocks.3"`` or an fx node name) is where a new module begins. Same model and K give the same partition.
    """
    if cost not in COSTS:
        raise MonomodError(f"unknown cost {cost!r}", f"use one of {', '.join(COSTS)}")
    if cuts is not None:
        cuts = list(cuts)
        if modules is not None and modules != len(cuts) + 1:
            raise MonomodError(f"{len(cuts)} cuts make {len(cuts) + 1} modules, not {modules}", "drop --modules or give K-1 cuts")
        assignment, k, method = _manual_assignment(traced, cuts), len(cuts) + 1, "manual"
    else:
        k = 1 if modules is None else modules
        if not isinstance(k, int) or k < 1:
            raise MonomodError(f"--modules must be a positive integer, got {k!r}", "pass K >= 1")
        limit = max_modules(traced)
        if k > limit:
            raise MonomodError(
                f"K={k} is more modules than {traced.name} has places to cut ({limit} compute nodes)",
                f"use --modules {limit} or fewer",
            )
        assignment, method = _balanced_mincut_assignment(traced, k, cost, tolerance), "mincut"
    return _build_partition(traced, assignment, k, cost, method)


def max_modules(traced: TracedModel) -> int:
    """The most modules ``traced`` can be cut into: one compute node each (checked before a plan is built)."""
    return sum(1 for n in traced.nodes.values() if _is_compute(n))


def _is_compute(info: NodeInfo) -> bool:
    return info.op.startswith("call_") and not info.rematerializable


def _node_costs(traced: TracedModel, cost: str) -> dict[str, int]:
    """Cost per node; a parameter read is charged to its first consumer, which is where it will live."""
    costs = {name: (info.flops if cost == "flops" else info.params) for name, info in traced.nodes.items()}
    order = _order(traced)
    for node in traced.graph_module.graph.nodes:
        if node.op == "get_attr" and costs[node.name] and node.users:
            first_user = min(node.users, key=lambda u: order[u.name])
            costs[first_user.name] += costs[node.name]
            costs[node.name] = 0
    return costs


def _order(traced: TracedModel) -> dict[str, int]:
    return {name: i for i, name in enumerate(traced.nodes)}


def _balanced_mincut_assignment(traced: TracedModel, k: int, cost: str, tolerance: float, attempts: int = 5) -> dict[str, int]:
    """Min-cut partitions with ever narrower windows until max/mean cost <= 1 + tolerance."""
    costs = _node_costs(traced, cost)
    best: tuple[float, dict[str, int]] | None = None
    window = tolerance
    for _ in range(attempts):
        assignment = _mincut_assignment(traced, k, costs, window)
        per_part = [0] * k
        for name, part in assignment.items():
            per_part[part] += costs[name]
        balance = max(per_part) * k / max(sum(per_part), 1)
        if best is None or balance < best[0]:
            best = (balance, assignment)
        if balance <= 1 + tolerance:
            break
        window /= 2
    return best[1]


def _mincut_assignment(traced: TracedModel, k: int, costs: dict[str, int], tolerance: float) -> dict[str, int]:
    names = list(traced.nodes)
    start, end, running = {}, {}, 0
    for name in names:
        start[name] = running
        running += costs[name]
        end[name] = running
    total = max(running, 1)
    compute = [n for n in names if _is_compute(traced.nodes[n])]
    source_side = {n for n in names if traced.nodes[n].op == "placeholder"}
    assignment = {n: 0 for n in source_side}
    for cut in range(1, k):
        done = sum(costs[n] for n in source_side)
        target = done + (total - done) / (k - cut + 1)
        width = tolerance * total / k
        # Every module gets at least one compute node: take the next one, leave one for each later module.
        pin_source = source_side | {next(n for n in compute if n not in source_side)}
        pin_sink = set(compute[len(compute) - (k - cut):])
        new_side = _min_cut(traced, pin_source, pin_sink, start, end, target, target - width, target + width, total)
        fresh = new_side - source_side
        if not any(_is_compute(traced.nodes[n]) for n in fresh):
            raise MonomodError(
                f"cannot find {k} non-empty contiguous modules in {traced.name} (module {cut - 1} came out empty)",
                "use fewer --modules or a looser balance tolerance",
            )
        for n in fresh:
            assignment[n] = cut - 1
        source_side = new_side
    for n in names:
        assignment.setdefault(n, k - 1)
    if not any(_is_compute(traced.nodes[n]) for n in names if assignment[n] == k - 1):
        raise MonomodError(f"cannot find {k} non-empty contiguous modules in {traced.name} (the last came out empty)", "use fewer --modules")
    return assignment


def _min_cut(
    traced: TracedModel,
    pinned_source: set[str],
    pinned_sink: set[str],
    start: dict[str, int],
    end: dict[str, int],
    target: float,
    lo: float,
    hi: float,
    total: int,
) -> set[str]:
    """One s-t minimum cut; returns the names of the nodes on the source side."""
    graph = nx.DiGraph()
    infos = traced.nodes
    fx_nodes = traced.fx_nodes()
    byte_weight = _TIE_RESOLUTION * (len(fx_nodes) + 1) + 1  # one byte outweighs every tie-break term together
    for node in fx_nodes:
        info = infos[node.name]
        v_in, v_out = ("in", node.name), ("out", node.name)
        if not info.rematerializable:
            tie = round(_TIE_RESOLUTION * abs(end[node.name] - target) / total)
            # Containers (tuples of tensors) cost one byte more than their tensors, so cuts land on tensors.
            size = info.bytes + (0 if info.is_tensor else 1)
            graph.add_edge(v_in, v_out, capacity=size * byte_weight + tie)
        for user in node.users:
            if not info.rematerializable:  # a recomputable value is free to cut: no edge forward
                graph.add_edge(v_out, ("in", user.name))  # infinite
            graph.add_edge(("in", user.name), v_in)  # infinite: a module holds its inputs' producers
        if node.name in pinned_source or node.op == "placeholder" or end[node.name] <= lo:
            graph.add_edge(_SOURCE, v_in)
        elif node.op == "output" or node.name in pinned_sink or start[node.name] >= hi:
            graph.add_edge(v_in, _SINK)
    graph.add_node(_SOURCE)
    graph.add_node(_SINK)
    try:
        _, (reachable, _) = nx.minimum_cut(graph, _SOURCE, _SINK)
    except nx.NetworkXUnbounded:
        raise MonomodError(
            f"no finite cut of {traced.name} near cost {target:.3g}: the balance window pins a node to both sides",
            "use fewer --modules or manual --cuts",
        ) from None
    return {name for side, name in (v for v in reachable if v not in (_SOURCE, _SINK)) if side == "in"}


def cut_points(traced: TracedModel) -> dict[str, str]:
    """Every legal cut point of ``traced``: compute node name -> the ``--cuts`` name that starts a module there.

    The name is the one ``_manual_assignment`` resolves back to that very node: a module path (preferring one that
    ends in an index, such as ``blocks.3``) whose first compute node it is, else the node's own name. Viewers offer
    exactly these points, so a cut moved by hand always replays through ``--cuts``.
    """
    first: dict[str, int] = {}
    names = list(traced.nodes)
    for i, name in enumerate(names):
        info = traced.nodes[name]
        if _is_compute(info):
            for key in (name, *path_prefixes(info.module)):
                first.setdefault(key, i)
    points = {}
    for i, name in enumerate(names):
        info = traced.nodes[name]
        if i == 0 or not _is_compute(info):
            continue
        mine = [key for key in path_prefixes(info.module) if first[key] == i]
        indexed = [key for key in mine if key.rpartition(".")[2].isdigit()]
        label = (indexed or mine or [name])[0]
        if first[label] == i:
            points[name] = label
    return points


def path_prefixes(path: str) -> list[str]:
    """"a.b.c" -> ["a", "a.b", "a.b.c"] (what a cut name can match at a segment boundary)."""
    parts = path.split(".") if path else []
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


def _manual_assignment(traced: TracedModel, cuts: list[str]) -> dict[str, int]:
    names = list(traced.nodes)
    positions = []
    for cut in cuts:
        hits = [
            i for i, name in enumerate(names)
            if _is_compute(traced.nodes[name])
            and (name == cut or traced.nodes[name].module == cut or traced.nodes[name].module.startswith(cut + "."))
        ]
        if not hits:
            known = sorted({info.module for info in traced.nodes.values() if info.module} | set(names))
            close = difflib.get_close_matches(cut, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "name a module path (e.g. blocks.3) or an fx node (see inspect --format json)"
            raise MonomodError(f"cut point {cut!r} matches no module or node of {traced.name}", hint)
        positions.append(hits[0])
    if positions != sorted(set(positions)) or positions[0] == 0:
        raise MonomodError(f"cuts {cuts} are not in forward order or leave an empty module", "list distinct cut points in the order the model runs them")
    return {name: sum(1 for p in positions if p <= i) for i, name in enumerate(names)}


def _build_partition(traced: TracedModel, assignment: dict[str, int], k: int, cost: str, method: str) -> Partition:
    """Turn a node -> module assignment into ModuleSpecs with their boundaries.

    Parameter reads and shape arithmetic are recomputed in the module that uses them when their inputs are at hand
    there; otherwise the value itself is passed on, so a non-tensor never drags a tensor across a cut.
    """
    fx_nodes = traced.fx_nodes()
    infos = traced.nodes
    order = _order(traced)
    inputs_of = {n.name: [a.name for a in n.all_input_nodes] for n in fx_nodes}
    has_users = {n.name: bool(n.users) for n in fx_nodes}
    members: list[set[str]] = [set() for _ in range(k)]
    for name, part in assignment.items():
        if not infos[name].rematerializable or not has_users[name]:
            members[part].add(name)
    needs: list[set[str]] = [set() for _ in range(k)]  # values a module receives from earlier modules
    exports: list[set[str]] = [set() for _ in range(k)]  # values of remat nodes a later module asked for
    recomputed: list[set[str]] = [set() for _ in range(k)]
    for j in reversed(range(k)):
        direct = {u for m in members[j] for u in inputs_of[m] if u not in members[j] and not infos[u].rematerializable}

        def local(u: str, j: int = j, direct: set[str] = direct) -> bool:
            """Can ``u`` be computed inside module j from what it holds or receives anyway?"""
            if u in members[j] or u in direct:
                return True
            return infos[u].rematerializable and all(local(a) for a in inputs_of[u])

        def resolve(u: str, j: int = j) -> None:
            if u in members[j] or u in recomputed[j]:
                return
            if infos[u].rematerializable and (assignment[u] == j or local(u)):
                recomputed[j].add(u)
                for a in inputs_of[u]:
                    resolve(a)
            else:
                needs[j].add(u)

        for root in sorted(members[j] | exports[j], key=order.__getitem__):
            if root in exports[j] and root not in members[j]:
                resolve(root)
            for u in inputs_of[root]:
                resolve(u)
        for u in needs[j]:
            exports[assignment[u]].add(u)
    boundaries = [
        sorted({u for j in range(b + 1, k) for u in needs[j] if assignment[u] <= b}, key=order.__getitem__)
        for b in range(k - 1)
    ]
    output_node = fx_nodes[-1]
    specs = []
    for j in range(k):
        local_nodes = members[j] | recomputed[j]
        inputs = tuple(_boundary_value(infos[u]) for u in boundaries[j - 1]) if j else tuple(
            _boundary_value(infos[n.name]) for n in fx_nodes if n.op == "placeholder"
        )
        outputs = tuple(_boundary_value(infos[u]) for u in boundaries[j]) if j < k - 1 else tuple(
            _boundary_value(infos[a.name]) for a in output_node.all_input_nodes
        )
        specs.append(ModuleSpec(
            index=j,
            nodes=tuple(sorted(members[j], key=order.__getitem__)),
            recomputed=tuple(sorted(recomputed[j] - members[j], key=order.__getitem__)),
            inputs=inputs,
            outputs=outputs,
            params=sum(infos[n].params for n in local_nodes),
            flops=sum(infos[n].flops for n in local_nodes),
            covers=tuple(_covers(traced, local_nodes, assignment)),
        ))
    return Partition(traced=traced, modules=specs, cost=cost, method=method, assignment=dict(assignment))


def _boundary_value(info: NodeInfo) -> BoundaryValue:
    return BoundaryValue(
        name=info.name,
        shape=info.symbolic_shape(),
        dtype=info.dtype if info.is_tensor else ("tensors" if info.holds_tensors else "value"),
        bytes=info.bytes,
    )


def _covers(traced: TracedModel, local_nodes: set[str], assignment: dict[str, int]) -> list[str]:
    """Summarise which parts of the model a module holds: whole units ("blocks.2-4") or pieces ("blocks.5 (attn)")."""
    model = traced.model
    unit_parts: dict[str, set[int]] = {}
    for name, info in traced.nodes.items():
        if info.module and not info.rematerializable:
            unit_parts.setdefault(_unit(model, info.module), set()).add(assignment[name])
    mine: dict[str, list[str]] = {}
    for name in traced.nodes:
        info = traced.nodes[name]
        if name in local_nodes and info.module and (info.flops or info.params):  # skip Identity, Dropout
            unit = _unit(model, info.module)
            pieces = mine.setdefault(unit, [])
            rest = info.module[len(unit) + 1:]
            if rest:
                piece = _unit(model.get_submodule(unit), rest) if _has(model, unit) else rest
                if piece not in pieces:
                    pieces.append(piece)
    labels = []
    for unit, pieces in mine.items():
        whole = len(unit_parts.get(unit, ())) <= 1
        if not whole and all(info.rematerializable for n, info in traced.nodes.items() if n in local_nodes and _unit(model, info.module) == unit):
            continue  # only a parameter read or shape arithmetic of a unit that lives elsewhere
        labels.append(unit if whole or not pieces else f"{unit} ({', '.join(_compress(pieces))})")
    return _compress(labels)


def _unit(model: nn.Module, path: str) -> str:
    """The natural unit a module path belongs to: its first component, descending through containers."""
    parts = path.split(".")
    unit: list[str] = []
    module: nn.Module | None = model
    for part in parts:
        unit.append(part)
        module = getattr(module, part, None) if module is not None else None
        if not isinstance(module, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            break
    return ".".join(unit)


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _compress(labels: list[str]) -> list[str]:
    """["blocks.2", "blocks.3", "blocks.4", "norm"] -> ["blocks.2-4", "norm"]."""
    out: list[str] = []
    run: tuple[str, int, int] | None = None
    for label in labels + [""]:
        prefix, _, last = label.rpartition(".")
        if run and last.isdigit() and prefix == run[0] and int(last) == run[2] + 1:
            run = (run[0], run[1], int(last))
            continue
        if run:
            out.append(f"{run[0]}.{run[1]}" + (f"-{run[2]}" if run[2] != run[1] else ""))
            run = None
        if label and last.isdigit() and prefix:
            run = (prefix, int(last), int(last))
        elif label:
            out.append(label)
    return out
