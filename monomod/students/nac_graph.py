"""Graph priors over NAC cells, and the fit that turns a prior graph into unit signatures.

Shared by the faithful NAC (``nac.py``) and the ``simple`` preset (``nac_simple.py``). A config here is any object
with the graph fields (``graph_prior``, ``graph_seed``, ``scale_free_m``, ...) and the signature-fit fields
(``sig_dim``, ``signature_fit_steps``, ``signature_fit_lr``, ``signature_fit_margin``).
"""
from __future__ import annotations

from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F

GRAPH_PRIORS = ("scale_free", "erdos_renyi", "planted_partition", "ring_of_cliques")


def _group_sizes(n: int, size: int) -> list[int]:
    """Split n cells into groups of ``size``; the last group absorbs the remainder (at least one group)."""
    size = max(1, size)
    groups = max(1, n // size)
    return [size] * (groups - 1) + [n - size * (groups - 1)]


def prior_graph(cfg: Any, n_cells: int | None = None) -> nx.Graph:
    """The (seeded, deterministic) prior graph over the cells whose links the initial kernel should reproduce."""
    n = cfg.n_cells if n_cells is None else n_cells
    seed = cfg.graph_seed
    if cfg.graph_prior == "scale_free":
        graph = nx.barabasi_albert_graph(n, min(cfg.scale_free_m, n - 1), seed=seed)
    elif cfg.graph_prior == "erdos_renyi":
        graph = nx.erdos_renyi_graph(n, min(1.0, cfg.erdos_renyi_degree / max(1, n - 1)), seed=seed)
    elif cfg.graph_prior == "planted_partition":
        sizes = _group_sizes(n, cfg.partition_group_size)
        graph = nx.random_partition_graph(sizes, cfg.partition_p_in, cfg.partition_p_out, seed=seed)
    elif cfg.graph_prior == "ring_of_cliques":
        sizes = _group_sizes(n, cfg.clique_size)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        graph = nx.Graph()
        graph.add_nodes_from(range(n))
        for start, size in zip(starts, sizes):
            graph.add_edges_from(nx.complete_graph(range(start, start + size)).edges)
        if len(sizes) > 1:  # link the last cell of each clique to the first cell of the next one
            graph.add_edges_from((starts[i] + sizes[i] - 1, starts[(i + 1) % len(sizes)]) for i in range(len(sizes)))
    else:
        raise ValueError(f"unknown graph_prior {cfg.graph_prior!r}; allowed: {list(GRAPH_PRIORS)}")
    return nx.Graph(graph)  # plain Graph with nodes 0..n-1


def check_graph_fields(cfg: Any) -> None:
    """Raise ValueError on an unknown graph prior or an empty set of latents (the checks both NAC configs share)."""
    if cfg.graph_prior not in GRAPH_PRIORS:
        raise ValueError(f"unknown graph_prior {cfg.graph_prior!r}; allowed: {list(GRAPH_PRIORS)}")
    if min(cfg.num_input_latents, cfg.num_mediator_latents, cfg.num_output_latents) < 1:
        raise ValueError("every latent count must be >= 1")


def prior_adjacency(cfg: Any, n_cells: int | None = None) -> torch.Tensor:
    """``[n, n]`` 0/1 adjacency of ``prior_graph(cfg, n_cells)``."""
    n = cfg.n_cells if n_cells is None else n_cells
    return torch.from_numpy(nx.to_numpy_array(prior_graph(cfg, n), nodelist=range(n))).float()


def prior_fit_loss(signatures: torch.Tensor, adjacency: torch.Tensor, threshold: float,
                   margin: float) -> torch.Tensor:
    """Hinge of the signatures against a prior graph: linked cells should reach cosine >= threshold + margin,
    unlinked ones <= threshold - margin; each hinge is averaged over its own pairs, so the many non-edges do not
    drown the few edges."""
    n = adjacency.shape[0]
    hi, lo = min(threshold + margin, 0.99), threshold - margin
    off_diag = ~torch.eye(n, dtype=torch.bool, device=adjacency.device)
    edges = adjacency.bool() & off_diag
    non_edges = ~adjacency.bool() & off_diag
    sig = F.normalize(signatures, dim=-1)
    cos = sig @ sig.t()
    edge_term = (F.relu(hi - cos).square() * edges).sum() / edges.sum().clamp_min(1)
    return edge_term + (F.relu(cos - lo).square() * non_edges).sum() / non_edges.sum().clamp_min(1)


def fit_signatures(adjacency: torch.Tensor, cfg: Any, threshold: float) -> torch.Tensor:
    """Unit signatures whose truncated kernel reproduces ``adjacency`` (``[n, n]``, 0/1); ``threshold`` is the
    cosine similarity above which a link survives truncation.

    A spectral embedding keeps the graph's coarse structure but does not control which pairs fall above the
    truncation threshold (hubs of a scale-free graph are a bad case). Instead we run a short, seeded Adam fit:
    linked cells are pushed to cosine >= threshold + margin (kept by the truncation) and unlinked cells to
    cosine <= threshold - margin (cut), with the two hinge terms averaged separately so the many non-edges do not
    drown the few edges. It runs once at build time, in float32, on its own RNG (the global RNG is untouched).
    """
    gen = torch.Generator().manual_seed(cfg.graph_seed)
    raw = torch.randn(adjacency.shape[0], cfg.sig_dim, generator=gen, dtype=torch.float32)
    # A hand-rolled Adam (beta 0.9 / 0.999): torch.optim's first use costs ~1 s of lazy imports at build time.
    m, v = torch.zeros_like(raw), torch.zeros_like(raw)
    with torch.inference_mode(False), torch.enable_grad():
        raw = raw.clone().requires_grad_(True)
        for step in range(1, cfg.signature_fit_steps + 1):
            loss = prior_fit_loss(raw, adjacency, threshold, cfg.signature_fit_margin)
            if loss.item() == 0.0:  # every link and non-link already on the right side of its margin
                break
            (grad,) = torch.autograd.grad(loss, raw)
            m.mul_(0.9).add_(grad, alpha=0.1)
            v.mul_(0.999).addcmul_(grad, grad, value=0.001)
            with torch.no_grad():
                raw -= cfg.signature_fit_lr * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8)
    return F.normalize(raw.detach(), dim=-1)


__all__ = ["GRAPH_PRIORS", "fit_signatures", "prior_fit_loss", "prior_graph"]
