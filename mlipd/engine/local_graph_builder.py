"""One rank's share of the atom graph, built without the whole edge list.

At a rebuild, each rank takes the atoms it owns, finds (with ``BinGrid``) every atom
that may lie within ``radius = cutoff + skin`` of them, and runs vesin on that subset
only: the pairs it returns are exactly the pairs of the full list that touch the
subset, with the same integer image shifts. Edges are kept when their receiver is
owned, so across ranks every edge exists exactly once.

A halo atom is a distinct global atom: several periodic images of one atom are one
halo row, and the edges that reach it carry their own integer image shifts.

Between rebuilds the same topology serves: ``edge_mask`` drops edges that are now
at ``r >= cutoff``, so results equal a fresh neighbour list exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from vesin import NeighborList

from mlipd.engine.bins import BinGrid


@dataclass(frozen=True)
class Topology:
    """Atoms and candidate edges of one rank, fixed between rebuilds.

    local_ids:  (n_local,) int64 batch-global index of each local atom: owned atoms
                first (ascending), then halo atoms grouped by owner rank
    n_owned:    number of owned atoms
    local_owner: (n_local,) int64 owner rank of each local atom
    batch:      (n_local,) int64 structure index of each local atom
    receivers:  (E,) int64 local index (< n_owned)
    senders:    (E,) int64 local index
    images:     (E, 3) int64 lattice image of the sender
    edge_batch: (E,) int64 structure index of each edge
    n_candidates: atoms given to vesin (owned + possible halo), for benchmarks
    """

    local_ids: np.ndarray
    n_owned: int
    local_owner: np.ndarray
    batch: np.ndarray
    receivers: np.ndarray
    senders: np.ndarray
    images: np.ndarray
    edge_batch: np.ndarray
    n_candidates: int

    @property
    def n_local(self) -> int:
        return int(self.local_ids.shape[0])

    @property
    def halo_ids(self) -> np.ndarray:
        return self.local_ids[self.n_owned:]


def _structure_edges(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                     owned: np.ndarray, radius: float) -> tuple[np.ndarray, ...]:
    """Edges (receiver, sender, image) of one structure whose receiver is owned.

    owned: (N,) bool. Returns structure-local indices and the number of vesin inputs.
    """
    subset = np.flatnonzero(BinGrid(positions, cell, pbc, radius=radius).candidates(owned))
    nl = NeighborList(cutoff=float(radius), full_list=False)
    i, j, s = nl.compute(positions[subset], cell, [bool(p) for p in pbc], quantities="ijS")
    i, j = subset[i.astype(np.int64)], subset[j.astype(np.int64)]
    s = s.astype(np.int64)
    fwd, bwd = owned[i], owned[j]  # a half-list pair i-j gives edge i<-j and edge j<-i
    recv = np.concatenate([i[fwd], j[bwd]])
    send = np.concatenate([j[fwd], i[bwd]])
    img = np.concatenate([s[fwd], -s[bwd]])
    return recv, send, img, subset.size


def build_topology(*, positions: np.ndarray, cells: np.ndarray, pbc: np.ndarray,
                   offsets: np.ndarray, owner: np.ndarray, rank: int,
                   radius: float) -> Topology:
    """This rank's topology for a batch.

    positions: (N, 3) Å, the whole batch; cells (B, 3, 3) Å; pbc (B, 3) bool;
    offsets: (B + 1,) first atom of each structure; owner: (N,) int64 rank per atom.
    """
    mine = owner == rank
    recv, send, img, eb = [], [], [], []
    n_candidates = 0
    for b in range(len(offsets) - 1):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        owned = mine[lo:hi]
        if not owned.any():
            continue
        r, s, i, n = _structure_edges(positions[lo:hi], cells[b], pbc[b], owned, radius)
        recv.append(r + lo)
        send.append(s + lo)
        img.append(i)
        eb.append(np.full(r.size, b, dtype=np.int64))
        n_candidates += n
    cat = lambda parts, shape: (  # noqa: E731
        np.concatenate(parts) if parts else np.zeros(shape, dtype=np.int64))
    recv_g, send_g = cat(recv, (0,)), cat(send, (0,))
    images, edge_batch = cat(img, (0, 3)), cat(eb, (0,))
    owned_ids = np.flatnonzero(mine)
    halo = np.unique(send_g[~mine[send_g]])
    halo = halo[np.lexsort((halo, owner[halo]))]
    local_ids = np.concatenate([owned_ids, halo])
    to_local = np.full(owner.shape[0], -1, dtype=np.int64)
    to_local[local_ids] = np.arange(local_ids.size)
    structure_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return Topology(
        local_ids=local_ids,
        n_owned=int(owned_ids.size),
        local_owner=owner[local_ids],
        batch=structure_of[local_ids],
        receivers=to_local[recv_g],
        senders=to_local[send_g],
        images=images,
        edge_batch=edge_batch,
        n_candidates=n_candidates,
    )
