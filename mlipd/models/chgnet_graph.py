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

Built once per topology: the engine keeps candidate edges (pairs within cutoff + skin)
between neighbour-list rebuilds, so ``build_skin_graph`` enumerates bonds and angle
candidates on them once (angles of edges within bond cutoff + skin). The step then runs
on all of them with fixed shapes (``fixed_bond_graph``), weighting each message by
whether its edge is within the cutoff and its angle within the bond cutoff now
(``angle_weights``): no selection, so no host read, and a masked message adds exactly
zero. ``select`` (a step's own bonds and angles, by selection) builds the package's
rows for ``build_bond_graph``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mlipd.model_api import LocalGraph


@dataclass
class BondGraph:
    """The bond and angle graph of one rank (all indices are local rows).

    edge_bond:   (E,) int64, bond of each directed edge of the local graph
    bond_edge:   (U,) int64, one local directed edge of each bond (its length and
                 direction define the bond's geometry); the canonical one on owned rows
    bond_keys:   (U, 5) int64 ``[gid_lo, gid_hi, S0, S1, S2]``: the bond's global
                 identity (global atom ids, lattice image from lo to hi)
    bond_short:  (U,) bool, bond length <= bond cutoff (the bond-graph vertices); None
                 in a ``fixed_bond_graph`` (lengths change at every step)
    n_owned_bonds: the first rows, the bonds this rank owns; the rest are replicas
    angles:      (A, 3) int64 ``[centre atom, u1, u2]``, CHGNet's 3-column bond graph
    angle_d1:    (A,) int64, directed edge of u1 at the centre
    angle_d2:    (A,) int64, directed edge of u2 at the centre
    """

    edge_bond: torch.Tensor
    bond_edge: torch.Tensor
    bond_keys: torch.Tensor
    bond_short: torch.Tensor | None
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


def undirected_keys(receivers: torch.Tensor, senders: torch.Tensor, images: torch.Tensor,
                    global_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, 5) canonical bond key of each directed edge, and (E,) bool "is canonical".

    The canonical direction goes from the lower to the higher global id; between an
    atom and its own image, towards the lexicographically positive image.
    """
    a, b = global_ids[receivers], global_ids[senders]
    img = images
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


@dataclass
class SkinGraph:
    """Bonds and angle candidates of one rank on its candidate edges (fixed until the
    next rebuild). Indices of edges are into the candidates; bonds are [owned | replicas].

    edge_bond:   (E_c,) int64 bond of each candidate edge
    bond_edge:   (U_c,) int64 one local candidate edge of each bond (canonical if local)
    bond_keys:   (U_c, 5) int64 global identity of each bond (see ``BondGraph``)
    n_owned_bonds: the owned bonds (first rows)
    angle_d1, angle_d2: (A_c,) int64 ordered pairs of distinct candidate edges at the
                 same centre, both within bond cutoff + skin when built
    near:        (U_c,) bool, bonds within bond cutoff + skin when built (the only ones
                 that can be short before the next rebuild)
    """

    edge_bond: torch.Tensor
    bond_edge: torch.Tensor
    bond_keys: torch.Tensor
    n_owned_bonds: int
    angle_d1: torch.Tensor
    angle_d2: torch.Tensor
    near: torch.Tensor

    @property
    def n_bonds(self) -> int:
        return int(self.bond_edge.shape[0])


def build_skin_graph(receivers: torch.Tensor, senders: torch.Tensor, images: torch.Tensor,
                     lengths: torch.Tensor, *, global_ids: torch.Tensor, n_owned: int,
                     reach: float) -> SkinGraph:
    """The ``SkinGraph`` of candidate edges (receivers, senders (E_c,) local rows,
    images (E_c, 3), lengths (E_c,) Å now); angle candidates of edges within ``reach``
    (bond cutoff + skin) Å."""
    dev = receivers.device
    n_edges = int(receivers.shape[0])
    keys, canonical = undirected_keys(receivers, senders, images, global_ids)
    bond_keys, edge_bond = _unique_rows(keys)
    n_bonds = int(bond_keys.shape[0])
    owned = torch.zeros(n_bonds, dtype=torch.bool, device=dev)
    owned[edge_bond[canonical]] = True
    n_owned_bonds = int(owned.sum())
    # renumber bonds, owned rows first (the identity at one rank, done all the same: a
    # rank's share of the build is then the same work per bond at every P)
    order = torch.argsort((~owned).to(torch.int8), stable=True)
    new_row = torch.empty_like(order)
    new_row[order] = torch.arange(n_bonds, device=dev)
    bond_keys, edge_bond = bond_keys[order], new_row[edge_bond]
    ar = torch.arange(n_edges, device=dev)
    # each bond's geometry from one local directed edge: the canonical one where local
    pick = torch.where(canonical, ar, ar + n_edges)
    bond_edge = torch.full((n_bonds,), 2 * n_edges, dtype=torch.long, device=dev)
    bond_edge = bond_edge.scatter_reduce(0, edge_bond, pick, reduce="amin") % max(n_edges, 1)
    within = torch.nonzero(lengths <= reach).squeeze(1)
    near = torch.zeros(n_bonds, dtype=torch.bool, device=dev)
    near[edge_bond[within]] = True
    d1, d2 = _pairs_at_centres(within, receivers, n_owned)
    return SkinGraph(edge_bond=edge_bond, bond_edge=bond_edge, bond_keys=bond_keys,
                     n_owned_bonds=n_owned_bonds, angle_d1=d1, angle_d2=d2, near=near)


def _pairs_at_centres(cand: torch.Tensor, receivers: torch.Tensor,
                      n_owned: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair (d1, d2) of distinct edges of ``cand`` with the same receiver."""
    dev = cand.device
    centre = receivers[cand]
    order = torch.argsort(centre, stable=True)
    cand, centre = cand[order], centre[order]
    counts = torch.bincount(centre, minlength=n_owned)
    starts = torch.cumsum(counts, 0) - counts
    k = counts[centre]
    first = torch.repeat_interleave(torch.arange(cand.shape[0], device=dev), k)
    pos = torch.arange(first.shape[0], device=dev) - (torch.cumsum(k, 0) - k)[first]
    d1 = cand[first]
    d2 = cand[starts[centre[first]] + pos]
    keep = d1 != d2
    return d1[keep], d2[keep]


def fixed_bond_graph(skin: SkinGraph, receivers: torch.Tensor) -> BondGraph:
    """Every bond and every candidate angle of ``skin`` as a ``BondGraph`` (receivers:
    (E_c,) of the candidate edges), fixed until the next rebuild; a step weights its
    angles with ``angle_weights``."""
    d1, d2 = skin.angle_d1, skin.angle_d2
    angles = torch.stack([receivers[d1], skin.edge_bond[d1], skin.edge_bond[d2]], dim=1)
    return BondGraph(edge_bond=skin.edge_bond, bond_edge=skin.bond_edge,
                     bond_keys=skin.bond_keys, bond_short=None,
                     n_owned_bonds=skin.n_owned_bonds, angles=angles, angle_d1=d1,
                     angle_d2=d2)


def angle_weights(bg: BondGraph, lengths: torch.Tensor, *, bond_cutoff: float
                  ) -> torch.Tensor:
    """(A, 1) bool: the angles of this step, as the package selects them (lengths (E,)
    Å of the candidate edges): |d1| <= bond cutoff (graph.py:288) and |d2| < bond
    cutoff (graph.py:318); both then lie within the cutoff, so both edges count."""
    length = lengths.detach()
    return ((length[bg.angle_d1] <= bond_cutoff) & (length[bg.angle_d2] < bond_cutoff)
            ).unsqueeze(1)


def select(skin: SkinGraph, graph: LocalGraph, lengths: torch.Tensor, *,
           bond_cutoff: float) -> tuple[BondGraph, torch.Tensor]:
    """This step's ``BondGraph`` from ``skin`` and the graph's edges (``graph.edge_ids``
    into the candidates; lengths (E,) Å of the graph's edges), and (U_c,) bool: which
    skin bonds are this step's bonds."""
    dev = lengths.device
    n_edges = int(lengths.shape[0])
    ids = graph.edge_ids
    n_cand = int(skin.edge_bond.shape[0])
    if ids is None:
        ids = torch.arange(n_cand, device=dev)
    position = torch.full((n_cand,), -1, dtype=torch.long, device=dev)
    position[ids] = torch.arange(n_edges, device=dev)  # candidate -> this step's edge
    edge_bond_c = skin.edge_bond[ids]
    kept = torch.zeros(skin.n_bonds, dtype=torch.bool, device=dev)
    kept[edge_bond_c] = True
    new_row = torch.cumsum(kept, 0) - 1
    bonds = torch.nonzero(kept).squeeze(1)
    # a bond is kept with its edges: both directions of a pair have the same length
    bond_edge = position[skin.bond_edge[bonds]]
    length = lengths.detach()
    le = length <= bond_cutoff  # d1 (and u1): "<=" as graph.py:288
    lt = length < bond_cutoff  # d2: "<" as graph.py:318
    d1, d2 = position[skin.angle_d1], position[skin.angle_d2]
    present = (d1 >= 0) & (d2 >= 0)
    d1, d2 = d1[present], d2[present]
    use = le[d1] & lt[d2]
    d1, d2 = d1[use], d2[use]
    edge_bond = new_row[edge_bond_c]
    angles = torch.stack([graph.receivers[d1], edge_bond[d1], edge_bond[d2]], dim=1)
    bg = BondGraph(edge_bond=edge_bond, bond_edge=bond_edge, bond_keys=skin.bond_keys[bonds],
                   bond_short=le[bond_edge], n_owned_bonds=int(kept[: skin.n_owned_bonds].sum()),
                   angles=angles, angle_d1=d1, angle_d2=d2)
    return bg, kept


def build_bond_graph(graph: LocalGraph, *, bond_cutoff: float,
                     lengths: torch.Tensor | None = None) -> BondGraph:
    """Bonds, angle rows and cut bonds of ``graph``'s own edges, built from scratch
    (no topology cache): the skin graph of those edges, all selected."""
    if lengths is None:  # float64, as the package's neighbour lists
        with torch.no_grad():
            lengths = graph.edge_vectors(torch.float64).norm(dim=1)
    skin = build_skin_graph(graph.receivers, graph.senders, graph.images, lengths.detach(),
                            global_ids=graph.global_ids, n_owned=graph.n_owned,
                            reach=bond_cutoff)
    return select(skin, replace(graph, edge_ids=None), lengths, bond_cutoff=bond_cutoff)[0]
