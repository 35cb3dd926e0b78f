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
"""

from __future__ import annotations

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
