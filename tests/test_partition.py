import itertools
import random

import pytest
import torch
from torch import nn

import monomod
from monomod.passes.partition import cut_crossings, optimal_cuts


def test_vit_cuts_are_single_residual_stream_tensors(traced_models):
    part = monomod.partition(traced_models["vit"], 4)
    assert part.k == 4 and part.method == "optimal"
    for cut in part.cuts:
        assert len(cut) == 1 and cut[0].shape == ["B", 5, 192]
    assert part.balance <= 1.10
    assert part.modules[0].covers[:3] == ("patch_embed", "cls_token", "pos_embed")
    assert part.modules[-1].covers[-2:] == ("norm", "head")


def test_vit_base_eight_modules_is_balanced_by_half_block_cuts():
    model = monomod.load_model("vit_base", device="meta")
    traced = monomod.trace(model, torch.randn(1, 3, 224, 224, device="meta"), name="vit_base")
    part = monomod.partition(traced, 8)
    assert all(len(cut) == 1 and cut[0].shape == ["B", 197, 768] for cut in part.cuts)
    assert part.balance <= 1.10
    assert any("(norm1, attn)" in label for m in part.modules for label in m.covers)  # a cut between halves


def test_partition_is_deterministic(traced_models):
    first = monomod.partition(traced_models["swin"], 4)
    second = monomod.partition(traced_models["swin"], 4)
    assert first.assignment == second.assignment
    assert first.to_json() == second.to_json()


@pytest.mark.parametrize("family", ["vit", "resnet", "convnext", "swin", "deit"])
@pytest.mark.parametrize("cost", ["flops", "params"])
def test_parts_are_contiguous_closed_and_cover_everything(traced_models, family, cost):
    traced = traced_models[family]
    part = monomod.partition(traced, 3, cost=cost)
    for node in traced.graph_module.graph.nodes:
        for user in node.users:  # no edge runs backwards: every module only reads from earlier ones
            assert part.assignment[node.name] <= part.assignment[user.name]
    assert sum(m.flops for m in part.modules) >= traced.flops
    assert sum(m.params for m in part.modules) == traced.params
    assert all(m.nodes for m in part.modules)


def test_params_cost_balances_parameters(traced_models):
    part = monomod.partition(traced_models["vit"], 2, cost="params")
    assert part.cost == "params"
    assert part.balance == pytest.approx(max(m.params for m in part.modules) * 2 / traced_models["vit"].params)
    assert part.balance <= 1.10


def test_manual_cuts_by_module_name(traced_models):
    part = monomod.partition(traced_models["vit"], cuts=["blocks.4", "blocks.8"])
    assert part.method == "manual" and part.k == 3
    assert part.modules[0].covers[-1] == "blocks.0-3"
    assert part.modules[1].covers == ("blocks.4-7",)
    assert part.modules[2].covers[0] == "blocks.8-11"


def test_bad_partition_requests(traced_models):
    traced = traced_models["vit"]
    with pytest.raises(monomod.MonomodError, match="positive integer"):
        monomod.partition(traced, 0)
    with pytest.raises(monomod.MonomodError, match="more modules than .* places to cut"):
        monomod.partition(traced, 10_000)
    with pytest.raises(monomod.MonomodError, match="matches no module.*did you mean"):
        monomod.partition(traced, cuts=["blocks.40"])
    with pytest.raises(monomod.MonomodError, match="not in forward order"):
        monomod.partition(traced, cuts=["blocks.6", "blocks.3"])
    with pytest.raises(monomod.MonomodError, match="make 3 modules, not 4"):
        monomod.partition(traced, 4, cuts=["blocks.4", "blocks.8"])
    with pytest.raises(monomod.MonomodError, match="unknown cost"):
        monomod.partition(traced, 2, cost="bytes")


class _LateShapeUse(nn.Module):
    """Reads the batch size at the very start and uses it at the very end (a common timm idiom)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])

    def forward(self, x):
        batch = x.shape[0]
        h = self.layers(x.flatten(1))
        return h.reshape(batch, 8, 8)


def test_non_tensor_values_never_force_a_bad_cut():
    traced = monomod.trace(_LateShapeUse(), torch.randn(1, 8, 8))
    part = monomod.partition(traced, 3)
    for cut in part.cuts:  # one activation per cut; the int travels for free or is recomputed
        assert sum(1 for v in cut if v.shape is not None) == 1
        assert sum(v.bytes for v in cut) == 64 * 4
    chain = monomod.Chain(monomod.extract(part))
    for batch in (2, 5):
        x = torch.randn(batch, 8, 8)
        torch.testing.assert_close(chain(x), traced.model(x))


def _brute_force(prefix, points, cut_bytes, k):
    """(largest part, bytes) of the best of all K-1 subsets of the points, lexicographically."""
    best = None
    for chosen in itertools.combinations(range(len(points)), k - 1):
        bounds = [0, *(points[i] for i in chosen), len(prefix) - 1]
        largest = max(prefix[b] - prefix[a] for a, b in zip(bounds, bounds[1:]))
        key = (largest, sum(cut_bytes[i] for i in chosen))
        best = key if best is None or key < best else best
    return best


def test_optimal_cuts_match_brute_force():
    """Property test: on 500 small random instances the search equals exhaustive enumeration."""
    for seed in range(500):
        rng = random.Random(seed)
        n = rng.randint(2, 14)
        costs = [rng.choice([0, 0, 1, 2, 3, 5, 8, 13, 40, 100]) for _ in range(n)]
        prefix = list(itertools.accumulate(costs, initial=0))
        points = sorted(rng.sample(range(1, n), rng.randint(0, n - 1)))
        k = rng.randint(1, len(points) + 1)
        cut_bytes = [rng.choice([4, 8, 8, 16, 64]) for _ in points]
        cuts, largest = optimal_cuts(prefix, points, cut_bytes, k)
        assert len(cuts) == k - 1 and cuts == sorted(set(cuts)) and set(cuts) <= set(points), seed
        bounds = [0, *cuts, n]
        assert largest == max(prefix[b] - prefix[a] for a, b in zip(bounds, bounds[1:])), seed
        chosen_bytes = sum(cut_bytes[points.index(c)] for c in cuts)
        expected = _brute_force(prefix, points, cut_bytes, k) if k > 1 else (prefix[-1], 0)
        assert (largest, chosen_bytes) == expected, seed


class _RandomGraph(nn.Module):
    """A random DAG of linears and sums over [B, 8] activations: skips make some positions carry two tensors."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = random.Random(seed)
        self.layers = nn.ModuleList(nn.Linear(8, rng.choice([8, 8, 8]), bias=rng.random() < 0.5) for _ in range(rng.randint(4, 8)))
        self.skips = [rng.randrange(0, i + 1) if rng.random() < 0.4 else None for i in range(len(self.layers))]
        self.widths = [rng.choice([1, 2, 4]) for _ in self.layers]  # repeated matmuls: uneven FLOPs per layer

    def forward(self, x):
        values = [x]
        for layer, skip, width in zip(self.layers, self.skips, self.widths):
            h = values[-1]
            for _ in range(width):
                h = layer(h)
            values.append(h + values[skip] if skip is not None else torch.relu(h))
        return values[-1]


@pytest.mark.parametrize("seed", range(12))
def test_partition_is_the_optimum_of_every_single_tensor_cut_on_random_graphs(seed):
    """End to end on small traced graphs: no single-tensor manual cut beats the search; its modules run exactly."""
    torch.manual_seed(seed)
    model = _RandomGraph(seed).eval()
    traced = monomod.trace(model, torch.randn(1, 8))
    names = list(traced.nodes)
    crossing = cut_crossings(traced)
    compute = [i for i, n in enumerate(names) if traced.nodes[n].op.startswith("call_") and not traced.nodes[n].rematerializable]
    single = [p for p in compute[1:] if crossing[p][1] == 1 and crossing[p][2]]
    k = min(3, len(single) + 1)
    found = monomod.partition(traced, k, tolerance=float("inf"))  # single-tensor cuts, however unbalanced
    best = None
    for chosen in itertools.combinations(single, k - 1):
        manual = monomod.partition(traced, cuts=[names[p] for p in chosen])
        assert all(len(cut) == 1 and cut[0].shape is not None for cut in manual.cuts)  # the sweep agrees with the boundaries
        key = (max(manual.module_cost(m) for m in manual.modules), manual.bytes_cut)
        best = key if best is None or key < best else best
    assert (max(found.module_cost(m) for m in found.modules), found.bytes_cut) == best
    assert found.optimum == pytest.approx(found.balance, abs=1e-4)
    chain = monomod.Chain(monomod.extract(found))
    x = torch.randn(3, 8)
    torch.testing.assert_close(chain(x), model(x), rtol=0, atol=0)


def test_finer_cuts_inside_blocks_extract_exactly(traced_models):
    """Cuts between a block's attention and MLP halves carry one tensor and chain back to the model, bit for bit."""
    traced = traced_models["vit"]
    part = monomod.partition(traced, 7)
    assert part.optimum == pytest.approx(part.balance, abs=1e-4) and part.legal_points > 12
    assert any("(norm1, attn)" in label for m in part.modules for label in m.covers)
    assert all(len(cut) == 1 for cut in part.cuts)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(monomod.Chain(monomod.extract(part))(x), traced.model(x), rtol=0, atol=0)


def test_manual_cuts_carry_the_optimum_for_comparison(traced_models):
    manual = monomod.partition(traced_models["vit"], cuts=["blocks.1", "blocks.2"])
    best = monomod.partition(traced_models["vit"], 3)
    assert manual.optimum == best.optimum and best.balance == pytest.approx(best.optimum, abs=1e-4)
    assert best.balance < manual.balance


class _TwoBranches(nn.Module):
    """Two parallel branches from the stem to the head (as CoaT's scales): single-tensor cuts only at the ends."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(8, 16), nn.Linear(4, 8)  # the stem's output is the largest activation
        self.left = nn.Sequential(nn.Linear(16, 4), *[nn.Linear(4, 4) for _ in range(6)])
        self.right = nn.Sequential(nn.Linear(16, 4), *[nn.Linear(4, 4) for _ in range(6)])

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.left(h) + self.right(h))


def test_cuts_of_several_tensors_only_where_single_tensor_cuts_cannot_balance():
    traced = monomod.trace(_TwoBranches(), torch.randn(1, 8))
    strict = monomod.partition(traced, 3, tolerance=float("inf"))
    assert all(len(cut) == 1 for cut in strict.cuts) and strict.optimum == strict.single_tensor_optimum > 1.5
    part = monomod.partition(traced, 3)
    assert part.optimum < part.single_tensor_optimum == strict.optimum and strict.optimum > 1.25
    assert part.balance == pytest.approx(part.optimum, abs=1e-4) and any(len(cut) == 2 for cut in part.cuts)
    budget = max(i.bytes for i in traced.nodes.values() if i.is_tensor and not i.rematerializable)
    assert all(sum(v.bytes for v in cut) <= budget for cut in part.cuts)
    x = torch.randn(4, 8)
    torch.testing.assert_close(monomod.Chain(monomod.extract(part))(x), traced.model(x), rtol=0, atol=0)
    from monomod.report import optimum_note
    assert "cuts of several tensors: single-tensor cuts balance 2.011 at best" in optimum_note(part, 0.5)
    assert "is 1.379 with cuts of several tensors" in optimum_note(part, 0.25)
    assert optimum_note(strict, float("inf")) is None


@pytest.mark.parametrize("family", ["vit", "resnet", "convnext", "swin"])
def test_no_partition_beats_the_order_bound(traced_models, family):
    """The K=8 survey's order bound (every position a cut point) is a true lower bound of the chosen cuts."""
    from benchmarks.partition import order_bound

    traced = traced_models[family]
    for k in (2, 3, 4):
        bound = order_bound(traced, k)
        assert 1.0 <= bound <= monomod.partition(traced, k).balance + 1e-9
