"""fairchem's ``max_neighbors`` cap, per receiver, on a rank's local edges.

fairchem (graph/radius_graph_pbc.py ``get_max_neighbors_mask``, called by
``radius_graph_pbc_v2`` with ``enforce_max_strictly=False`` as eSCNMDBackbone always
does) caps each *target* atom's neighbours independently: if an atom has more than
``max_neighbors`` candidates within the cutoff, it keeps those whose **squared**
distance is at most the squared distance of its ``max_neighbors + 1``-th nearest plus
0.01 Å² (a degeneracy tolerance, so ties and near-ties are all kept; at least
``max_neighbors + 1`` survive). Atoms with at most ``max_neighbors`` candidates keep all.
The cap is not symmetric: i may keep j while j drops i. Because every edge of a
receiver lives on the receiver's owner rank, the rule applies locally, rank by rank.

Between rebuilds the edges are the topology's candidates (fixed), so the rule runs on
fixed shapes: ``NeighborSlots`` (made once per topology) lays each receiver's candidate
edges out in a row of a dense (n_owned, width) table, and ``capped_mask`` finds each
row's (max_neighbors + 1)-th smallest squared distance among the edges within the cutoff
now by a sort along the rows: no count or maximum read back by the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DEGENERACY_TOLERANCE = 0.01  # Å², fairchem's default in get_max_neighbors_mask


def max_neighbors_mask(receivers: torch.Tensor, vectors: torch.Tensor, *, n_owned: int,
                       max_neighbors: int, strict: bool = False) -> torch.Tensor:
    """(E,) bool: which edges fairchem keeps.

    receivers: (E,) int64 local index of each edge's receiver (< n_owned)
    vectors:   (E, 3) Å, edge vectors (only their lengths matter; not differentiated)
    """
    if strict:
        raise ValueError("esen: enforce_max_neighbors_strictly=True is not supported "
                         "(fairchem's eSCNMDBackbone always uses False)")
    n_edges = int(receivers.shape[0])
    keep = torch.ones(n_edges, dtype=torch.bool, device=receivers.device)
    if max_neighbors <= 0 or n_edges == 0:
        return keep
    with torch.no_grad():
        counts = torch.bincount(receivers, minlength=n_owned)
        if int(counts.max()) <= max_neighbors:
            return keep
        d2 = (vectors.detach() ** 2).sum(-1)
        # sort by (receiver, d2): by distance first, then stably by receiver
        order = torch.argsort(d2)
        order = order[torch.argsort(receivers[order], stable=True)]
        start = torch.cumsum(counts, 0) - counts
        capped = counts > max_neighbors
        bound = torch.full((n_owned,), float("inf"), dtype=d2.dtype, device=d2.device)
        bound[capped] = d2[order[start[capped] + max_neighbors]] + DEGENERACY_TOLERANCE
        return d2 <= bound[receivers]


@dataclass(frozen=True)
class NeighborSlots:
    """Each owned receiver's candidate edges as one row of a dense table.

    table: (n_owned, width) int64 edge ids, padded with E (a slot that is never within
    the cutoff); None when no receiver has more than max_neighbors candidates (the cap
    can never apply until the next rebuild)
    """

    table: torch.Tensor | None


def neighbor_slots(receivers: torch.Tensor, *, n_owned: int, max_neighbors: int,
                   widest: Callable[[int], int] | None = None) -> NeighborSlots:
    """The slots of a topology's candidate edges (receivers (E,) < n_owned): reads the
    widest row's length once, at the rebuild. ``widest``: this rank's widest row ->
    the widest over all ranks (collective), so that every rank lays its rows out as
    one rank would, and caps or not as one rank would (its work then sums to one
    rank's); None: this rank's alone."""
    n_edges = int(receivers.shape[0])
    if max_neighbors <= 0 or (n_edges == 0 and widest is None):
        return NeighborSlots(None)
    counts = torch.bincount(receivers, minlength=n_owned)
    width = int(counts.max()) if n_edges else 0
    if widest is not None:
        width = widest(width)
    if width <= max_neighbors:
        return NeighborSlots(None)
    order = torch.argsort(receivers, stable=True)
    start = torch.cumsum(counts, 0) - counts
    col = torch.arange(n_edges, device=receivers.device) - start[receivers[order]]
    table = torch.full((n_owned, width), n_edges, dtype=torch.long, device=receivers.device)
    table[receivers[order], col] = order
    return NeighborSlots(table)


def capped_mask(slots: NeighborSlots, receivers: torch.Tensor, vectors: torch.Tensor,
                within: torch.Tensor | None, *, max_neighbors: int) -> torch.Tensor | None:
    """(E,) bool, the candidate edges fairchem keeps now: within the cutoff (``within``;
    None: all) and inside the cap, equal to ``max_neighbors_mask`` on the edges within
    the cutoff. None when every edge is kept (no mask, no cap)."""
    if slots.table is None:
        return within
    with torch.no_grad():
        d2 = (vectors.detach() ** 2).sum(-1)
        inf = torch.full_like(d2[:1], float("inf"))
        live = d2 if within is None else torch.where(within, d2, inf)
        rows = torch.cat([live, inf])[slots.table]  # (n_owned, width), inf past the cutoff
        kth = torch.sort(rows, dim=1).values[:, max_neighbors]  # (max + 1)-th nearest
        # a row whose (max + 1)-th slot is finite has more than max_neighbors edges
        bound = torch.where(torch.isfinite(kth), kth + DEGENERACY_TOLERANCE, torch.inf)
        keep = d2 <= bound[receivers]
        return keep if within is None else keep & within
