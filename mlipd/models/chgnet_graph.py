"""CHGNet's bond and angle graphs, built vectorised from one rank's local atom graph.

chgnet builds these in Python loops (``Graph.line_graph_adjacency_list``,
chgnet/graph/graph.py); this module reproduces the same rows with tensor ops on the
engine's device. Conventions, from the package:

* every directed edge d (centre i = the engine's *receiver*, neighbour j = the
  *sender*, image S) belongs to one undirected **bond** u together with its reverse
  (j -> i, -S); bond features live on bonds, not on directed edges;
* an **angle row** ``[c, u1, d1, u2, d2]`` exists for every ordered pair of distinct
  directed edges d1, d2 centred at the same atom c with |d1| <= bond cutoff and
  |d2| < bond cutoff (graph.py:288, 318). Rows are directed: (u1, u2) and (u2, u1) are
  two rows. A bond to a periodic self-image has both of its directed edges at the
  same centre, so it makes an angle with itself reversed, as in the package.

Ownership (see ../shared/porting/PORTING_MAP.md §1.3): a directed edge and an angle
live with their centre atom, which is owned, so a rank builds exactly the angles whose
vertex it owns. A bond is owned by the rank that holds its *canonical* directed edge
(from its lower global id). A rank also holds a *replica* of every other bond that
touches one of its atoms (a cut bond, whose canonical edge is on another rank): the
owner computes the bond's features and sends them to the replica (``chgnet_comm``).
Local bond rows are ordered [owned | replicas], like atoms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlipd.engine.graph import LocalGraph


@dataclass
class BondGraph:
    """The bond and angle graph of one rank (all indices are local rows).

    edge_bond:   (E,) int64, bond of each directed edge of the local graph
    bond_edge:   (U,) int64, one local directed edge of each bond (its length and
                 direction define the bond's geometry); the canonical one on owned rows
    bond_keys:   (U, 5) int64 ``[gid_lo, gid_hi, S0, S1, S2]``: the bond's global
                 identity (global atom ids, lattice image from lo to hi)
    bond_short:  (U,) bool, bond length <= bond cutoff (the bond-graph vertices)
    n_owned_bonds: the first rows, the bonds this rank owns; the rest are replicas
    angles:      (A, 3) int64 ``[centre atom, u1, u2]``, CHGNet's 3-column bond graph
    angle_d1:    (A,) int64, directed edge of u1 at the centre
    angle_d2:    (A,) int64, directed edge of u2 at the centre
    """

    edge_bond: torch.Tensor
    bond_edge: torch.Tensor
    bond_keys: torch.Tensor
    bond_short: torch.Tensor
    n_owned_bonds: int
    angles: torch.Tensor
    angle_d1: torch.Tensor
    angle_d2: torch.Tensor

    @property
    def n_bonds(self) -> int:
        return int(self.bond_edge.shape[0])

    @property
    def n_angles(self) -> int:
        return int(self.angles.shape[0])

    @property
    def replicas(self) -> slice:
        return slice(self.n_owned_bonds, self.n_bonds)


def undirected_keys(graph: LocalGraph) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, 5) canonical bond key of each directed edge, and (E,) bool "is canonical".

    The canonical direction goes from the lower to the higher global id; between an
    atom and its own image, towards the lexicographically positive image.
    """
    gid = graph.global_ids
    a, b = gid[graph.receivers], gid[graph.senders]
    img = graph.images
    # sign of the first non-zero image component, -1/0/+1
    first = torch.where(img[:, 1] != 0, img[:, 1], img[:, 2])
    first = torch.where(img[:, 0] != 0, img[:, 0], first)
    canonical = (a < b) | ((a == b) & (first > 0))
    lo = torch.where(canonical, a, b)
    hi = torch.where(canonical, b, a)
    s = torch.where(canonical.unsqueeze(1), img, -img)
    return torch.cat([lo.unsqueeze(1), hi.unsqueeze(1), s], dim=1), canonical


def _unique_rows(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique rows of an (E, 5) int64 key table and the inverse map, via one int64 code
    where it fits (much faster than ``unique(dim=0)``)."""
    if keys.shape[0] == 0:
        return keys, torch.zeros(0, dtype=torch.long, device=keys.device)
    n = int(keys[:, :2].max()) + 1
    lo_img = keys[:, 2:].min(dim=0).values
    span = keys[:, 2:].max(dim=0).values - lo_img + 1
    radix = [n, n, *span.tolist()]
    total = 1.0
    for r in radix:
        total *= r
    if total >= 2.0**62:
        uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
        return uniq, inverse
    shifted = torch.cat([keys[:, :2], keys[:, 2:] - lo_img], dim=1)
    code = torch.zeros(keys.shape[0], dtype=torch.long, device=keys.device)
    for col, r in enumerate(radix):
        code = code * r + shifted[:, col]
    _, inverse = torch.unique(code, return_inverse=True)
    n_u = int(inverse.max()) + 1
    first = torch.full((n_u,), keys.shape[0], dtype=torch.long, device=keys.device)
    first = first.scatter_reduce(0, inverse, torch.arange(keys.shape[0], device=keys.device),
                                 reduce="amin")
    return keys[first], inverse


def build_bond_graph(graph: LocalGraph, *, bond_cutoff: float,
                     lengths: torch.Tensor | None = None) -> BondGraph:
    """Bonds, angle rows and cut bonds of ``graph`` for a bond-graph cutoff (Å).

    Integer structure only: nothing here is differentiable, the geometry is computed
    by the model from ``graph.edge_vectors()``. ``lengths``: (E,) float64 edge lengths
    if the caller has them (else computed here).
    """
    dev = graph.receivers.device
    n_edges = int(graph.receivers.shape[0])
    keys, canonical = undirected_keys(graph)
    bond_keys, edge_bond = _unique_rows(keys)
    n_bonds = int(bond_keys.shape[0])
    owned = torch.zeros(n_bonds, dtype=torch.bool, device=dev)
    owned[edge_bond[canonical]] = True
    n_owned_bonds = int(owned.sum())
    if n_owned_bonds < n_bonds:  # renumber bonds: owned rows first
        order = torch.argsort((~owned).to(torch.int8), stable=True)
        new_row = torch.empty_like(order)
        new_row[order] = torch.arange(n_bonds, device=dev)
        bond_keys, edge_bond = bond_keys[order], new_row[edge_bond]
    ar = torch.arange(n_edges, device=dev)
    # each bond's geometry from one local directed edge: the canonical one where local
    pick = torch.where(canonical, ar, ar + n_edges)
    bond_edge = torch.full((n_bonds,), 2 * n_edges, dtype=torch.long, device=dev)
    bond_edge = bond_edge.scatter_reduce(0, edge_bond, pick, reduce="amin") % max(n_edges, 1)

    if lengths is None:  # float64, as the package's neighbour lists
        with torch.no_grad():
            lengths = graph.edge_vectors(torch.float64).norm(dim=1)
    length = lengths.detach()
    le = length <= bond_cutoff  # d1 (and u1): "<=" as graph.py:288
    lt = length < bond_cutoff  # d2: "<" as graph.py:318
    bond_short = le[bond_edge] if n_bonds else torch.zeros(0, dtype=torch.bool, device=dev)

    # every ordered pair (d1, d2) of distinct short edges around the same centre
    cand = torch.nonzero(le).squeeze(1)
    centre = graph.receivers[cand]
    order = torch.argsort(centre, stable=True)
    cand, centre = cand[order], centre[order]
    counts = torch.bincount(centre, minlength=graph.n_owned)
    starts = torch.cumsum(counts, 0) - counts
    k = counts[centre]
    first = torch.repeat_interleave(torch.arange(cand.shape[0], device=dev), k)
    pos = torch.arange(first.shape[0], device=dev) - (torch.cumsum(k, 0) - k)[first]
    d1 = cand[first]
    d2 = cand[starts[centre[first]] + pos]
    keep = (d1 != d2) & lt[d2]
    d1, d2 = d1[keep], d2[keep]
    angles = torch.stack([graph.receivers[d1], edge_bond[d1], edge_bond[d2]], dim=1)
    return BondGraph(edge_bond=edge_bond, bond_edge=bond_edge, bond_keys=bond_keys,
                     bond_short=bond_short, n_owned_bonds=n_owned_bonds, angles=angles,
                     angle_d1=d1, angle_d2=d2)
