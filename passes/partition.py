"""Partition pass: TracedModel -> Partition of K contiguous modules, the exact most balanced cut of the graph order.

The modules are runs of the fx graph's order (which is topological), so a partition is K-1 cut positions in that
order, and the modules chain without cycles. A position is a **legal cut point** when exactly one tensor crosses it
(non-tensor values such as ``.shape`` ints and parameter reads cost nothing: the extract pass recomputes them where
they are needed, or passes the tiny value on). One tensor is what the students' stitches and the trained meta model
take: inside a ViT block, between its attention and MLP halves, is as legal as between blocks. Where the
single-tensor points cannot balance within ``1 + tolerance`` (models with parallel branches, such as CoaT), cuts
that carry several tensors are considered too, within a byte budget: at most the bytes of the model's largest
activation; they are taken only when they balance strictly better.

Over the chosen points the search is exact (``optimal_cuts``): it finds the smallest possible largest module cost
(FLOPs or parameters) by bisection on that bound, with a greedy feasibility test (a cut as late as the bound allows
is never worse), and then, among the cuts that reach it, those that carry the fewest bytes, by a dynamic programme
over the points with a sliding-window minimum. Same model and K give the same partition.
"""
from __future__ import annotations

import bisect
import difflib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import nn

from monomod.errors import MonomodError
from monomod.ir import BoundaryValue, ModuleSpec, NodeInfo, Partition, TracedModel

COSTS = ("flops", "params")


BALANCE_TOLERANCE = 0.25  # the default allowed imbalance (max/mean cost <= 1 + tolerance); the option spec reads it

def partition(
    traced: TracedModel,
    modules: int | None = None,
    *,
    cost: str = "flops",
    cuts: Sequence[str] | None = None,
    tolerance: float = BALANCE_TOLERANCE,
    single_tensor: bool = False,
) -> Partition:
    """Split ``traced`` into ``modules`` contiguous parts with the smallest possible largest part.

    ``cost`` ("flops" or "params") is what the parts are balanced by. The search is exact over the legal cut
    points (see the module doc); among equally balanced cuts it takes those that carry the fewest bytes.
    ``tolerance`` is the imbalance the caller accepts (max/mean <= 1 + tolerance): it never trades balance away;
    above it, cuts of several tensors are tried (see the module doc), and ``Partition.optimum`` says when even the
    optimum is above it. ``cuts`` overrides the search: each name (a
    module path such as ``"blocks.3"`` or an fx node name) is where a new module begins; the partition still
    carries the optimum for its K, for comparison. ``single_tensor`` keeps every cut to one tensor (a trained meta
    model needs it). Same model and K give the same partition.
    """
    if cost not in COSTS:
        raise MonomodError(f"unknown cost {cost!r}", f"use one of {', '.join(COSTS)}")
    if cuts is not None:
        cuts = list(cuts)
        if modules is not None and modules != len(cuts) + 1:
            raise MonomodError(f"{len(cuts)} cuts make {len(cuts) + 1} modules, not {modules}", "drop --modules or give K-1 cuts")
        k = len(cuts) + 1
        assignment, method = _manual_assignment(traced, cuts), "manual"
        best = search(traced, k, cost, tolerance)
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
        if single_tensor:
            return _single_tensor_partition(traced, k, cost, tolerance)
        best = search(traced, k, cost, tolerance)
        assignment, method = _assignment_at(traced, best.positions), "optimal"
    part = _build_partition(traced, assignment, k, cost, method)
    part.optimum, part.legal_points = best.balance, best.points
    part.single_tensor_optimum = best.balance if best.single_tensor else best.single_balance
    return part


def _single_tensor_partition(traced: TracedModel, k: int, cost: str, tolerance: float) -> Partition:
    """The most balanced cut whose every boundary carries one value. A cut point where one tensor crosses can
    still pass values the search counts as free to recompute (shape numbers read from a tensor made before the
    cut): such points are set aside and the search runs again, until every boundary is one tensor."""
    banned: set[int] = set()
    for _ in range(64):
        best = search(traced, k, cost, tolerance, single_tensor=True, banned=banned)
        part = _build_partition(traced, _assignment_at(traced, best.positions), k, cost, "optimal")
        bad = {p for p, values in zip(best.positions, part.cuts) if len(values) != 1}
        if not bad:
            part.optimum, part.legal_points = best.balance, best.points
            part.single_tensor_optimum = best.balance
            return part
        banned |= bad
    raise MonomodError(f"cannot cut {traced.name} into {k} modules at single-tensor boundaries",
                       "use fewer --modules, manual --cuts or --meta teacher")


def max_modules(traced: TracedModel) -> int:
    """The most modules ``traced`` can be cut into: one compute node each (checked before a plan is built)."""
    return sum(1 for n in traced.nodes.values() if _is_compute(n))


def _is_compute(info: NodeInfo) -> bool:
    return info.op.startswith("call_") and not info.rematerializable


def cost_prefix(traced: TracedModel, cost: str = "flops") -> list[int]:
    """``prefix[p]``: the cost of every node before graph position ``p`` (the last entry is the total)."""
    prefix = [0]
    for value in _node_costs(traced, cost).values():
        prefix.append(prefix[-1] + value)
    return prefix


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


@dataclass(frozen=True)
class CutSearch:
    """The exact search's answer for one K: where the modules begin and how balanced that is."""

    positions: tuple[int, ...]  # graph-order index of each module's first node, modules 1..K-1
    largest: int  # the largest module's cost: the smallest any legal cut reaches
    balance: float  # largest * K / total cost: the optimum max/mean
    points: int  # how many legal cut points the search chose from
    single_tensor: bool  # every cut carries one tensor (False: cuts within the byte budget, see ``search``)
    single_balance: float | None = None  # when not single_tensor: the optimum over single-tensor cuts (None: none)


def search(traced: TracedModel, k: int, cost: str = "flops", tolerance: float = BALANCE_TOLERANCE,
           single_tensor: bool = False, banned: set[int] | frozenset[int] = frozenset()) -> CutSearch:
    """The exact most balanced K-module cut of ``traced`` over its legal cut points (see the module doc).

    Single-tensor cut points first; where their optimum is above ``1 + tolerance`` and cuts within the byte budget
    (at most the bytes of the model's largest activation, however many tensors) do strictly better, those; never
    with ``single_tensor``."""
    prefix = cost_prefix(traced, cost)
    crossing = cut_crossings(traced)
    compute = [i for i, info in enumerate(traced.nodes.values()) if _is_compute(info)]
    between = compute[1:]  # a cut before any compute node but the first leaves no module empty
    single = [p for p in between if crossing[p][1] == 1 and crossing[p][2] and p not in banned]
    best = _search_over(prefix, crossing, single, k, True) if len(single) >= k - 1 else None
    if best is not None and (best.balance <= 1 + tolerance or single_tensor):
        return best
    if single_tensor:
        raise MonomodError(f"cannot cut {traced.name} into {k} modules at single-tensor boundaries "
                           f"({len(single) + 1} at most)", "use fewer --modules, manual --cuts or --meta teacher")
    budget = max((i.bytes for i in traced.nodes.values() if i.is_tensor and not i.rematerializable), default=0)
    within = [p for p in between if crossing[p][0] <= budget]
    if len(within) >= k - 1:
        wide = _search_over(prefix, crossing, within, k, False)
        if best is None or wide.largest < best.largest:
            return replace(wide, single_balance=best.balance if best else None)
    if best is None:
        raise MonomodError(f"cannot cut {traced.name} into {k} non-empty modules within the byte budget "
                           f"({max(len(single), len(within)) + 1} at most)", "use fewer --modules or manual --cuts")
    return best


def _search_over(prefix: list[int], crossing: list[tuple[int, int, bool]], points: list[int], k: int,
                 single: bool) -> CutSearch:
    positions, largest = optimal_cuts(prefix, points, [crossing[p][0] for p in points], k)
    total = prefix[-1]
    return CutSearch(positions=tuple(positions), largest=largest, balance=largest * k / total if total else 1.0,
                     points=len(points), single_tensor=single)


def cut_crossings(traced: TracedModel) -> list[tuple[int, int, bool]]:
    """Per graph position p (a cut just before node p): (bytes, values, all tensors) of what crosses it.

    A value crosses p when it is made before p and used at or after p; values free to recompute never cross.
    """
    names = list(traced.nodes)
    order = {name: i for i, name in enumerate(names)}
    starts: list[list[str]] = [[] for _ in range(len(names) + 1)]
    ends: list[list[str]] = [[] for _ in range(len(names) + 1)]
    for node in traced.graph_module.graph.nodes:
        info = traced.nodes[node.name]
        last = max((order[u.name] for u in node.users), default=order[node.name])
        if info.rematerializable or last == order[node.name]:
            continue
        starts[order[node.name] + 1].append(node.name)
        ends[last + 1].append(node.name)
    out, size, count, containers = [], 0, 0, 0
    for p in range(len(names) + 1):
        for name in starts[p]:
            info = traced.nodes[name]
            size, count, containers = size + info.bytes, count + 1, containers + (not info.is_tensor)
        for name in ends[p]:
            info = traced.nodes[name]
            size, count, containers = size - info.bytes, count - 1, containers - (not info.is_tensor)
        out.append((size, count, containers == 0))
    return out


def optimal_cuts(prefix: Sequence[int], points: Sequence[int], cut_bytes: Sequence[int], k: int) -> tuple[list[int], int]:
    """K-1 of ``points`` that minimise the largest part, then the bytes cut; returns (cuts, largest part).

    ``prefix[p]`` is the cost of everything before position p (non-decreasing, ``prefix[0] == 0``; the last entry is
    the total), ``points`` the legal positions in increasing order (strictly inside), ``cut_bytes[i]`` what
    cutting at ``points[i]`` carries. Exact: the largest part by bisection on integers with a greedy test, the
    bytes by a dynamic programme over the points.
    """
    if k == 1:
        return [], prefix[-1]
    at = [prefix[p] for p in points]
    low, high = max(0, -(-prefix[-1] // k) - 1), prefix[-1]  # low is infeasible (parts below the mean), high is not
    while high - low > 1:
        middle = (low + high) // 2
        if _fits(at, prefix[-1], middle, k):
            high = middle
        else:
            low = middle
    return [points[i] for i in _fewest_bytes(at, prefix[-1], cut_bytes, high, k)], high


def _fits(at: Sequence[int], total: int, bound: int, k: int) -> bool:
    """Can the cuts at prefix costs ``at`` make at most ``k`` parts of cost <= bound? (Greedy: cut as late as
    possible; an earlier cut never helps a later part.) Fewer parts are enough: more legal cuts only split parts."""
    done, index, parts = 0, -1, 1
    while total - done > bound:
        reach = bisect.bisect_right(at, done + bound) - 1
        if reach <= index or parts == k:
            return False
        index, done, parts = reach, at[reach], parts + 1
    return True


def _fewest_bytes(at: Sequence[int], total: int, cut_bytes: Sequence[int], bound: int, k: int) -> list[int]:
    """Indices of the K-1 cuts with the fewest bytes among those whose parts all cost <= bound.

    ``best[i]`` is the fewest bytes of j cuts ending at point i; its predecessors are the points i' < i with
    ``at[i] - at[i'] <= bound``, a window that only moves forward, so a monotone deque keeps its minimum.
    """
    n, inf = len(at), float("inf")
    best = [cut_bytes[i] if at[i] <= bound else inf for i in range(n)]
    parents: list[list[int]] = []
    for _ in range(k - 2):
        new, parent, window, left = [inf] * n, [-1] * n, deque(), 0
        for i in range(n):
            if i > 0:
                while window and best[window[-1]] > best[i - 1]:
                    window.pop()
                window.append(i - 1)
            while left < i and at[i] - at[left] > bound:
                left += 1
            while window and window[0] < left:
                window.popleft()
            if window and best[window[0]] < inf:
                new[i], parent[i] = best[window[0]] + cut_bytes[i], window[0]
        best = new
        parents.append(parent)
    last = min((i for i in range(n) if total - at[i] <= bound and best[i] < inf), key=lambda i: (best[i], i))
    chosen = [last]
    for parent in reversed(parents):
        chosen.append(parent[chosen[-1]])
    return chosen[::-1]


def _assignment_at(traced: TracedModel, positions: Sequence[int]) -> dict[str, int]:
    """Node -> module for modules that begin at the given graph positions (as the manual path assigns)."""
    return {name: bisect.bisect_right(positions, i) for i, name in enumerate(traced.nodes)}


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
    if positions != sorted(set(positions)) or positions[:1] == [0]:
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
