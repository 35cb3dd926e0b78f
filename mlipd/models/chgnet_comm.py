"""CHGNet's one exchange besides the atom halo: the pair-sum over cut bonds.

A bond whose two atoms are owned by different ranks is held by both ranks (each sees
the directed edge centred at its own atom). Its BondConv aggregate is a sum over the
angles at both atoms, so each rank holds one part. ``CutBondSum`` gives both the full
sum with one all_to_all: each rank sends its part of every short cut bond to the
partner rank and adds what it receives (long bonds are in no angle: nothing to sum).
Its backward is the same pair-sum of the gradients (``comm.exchange``'s adjoint).
"""

from __future__ import annotations

import torch

from mlipd.engine.graph import LocalGraph
from mlipd.models.chgnet_graph import BondGraph


class CutBondSum:
    """``partial (U, F) -> partial + the partner rank's rows, on cut bonds``.

    Built once per forward. At one rank (``graph.comm is None``) it is the identity
    and never communicates. At P > 1 building it and every call are collective: all
    ranks do both, the same number of times. ``calls`` counts the exchanges made and
    ``rows`` the bond rows each one sends.
    """

    def __init__(self, graph: LocalGraph, bg: BondGraph) -> None:
        self.calls = 0
        self.comm = graph.comm
        self.cut = bg.cut
        self.rows = int(bg.cut.shape[0])
        self.plan = None
        if self.comm is None:
            return
        wanted = bg.bond_keys[bg.cut]
        partner = local_owners(graph)[graph.senders[bg.bond_edge[bg.cut]]]
        # each holder "owns" its own partial of a cut bond and wants its partner's. The
        # table offers every cut bond, short or not, so that a bond whose two ranks
        # disagree at round-off on "<= 3 Å" is still found (its partial is ~0 there:
        # the bond-graph weights vanish smoothly at the bond cutoff)
        self.held = bg.held_cut
        self.plan = self.comm.plan_from_keys(bg.bond_keys[bg.held_cut], wanted, partner)

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        if self.plan is None:
            return partial
        self.calls += 1
        received = self.comm.exchange(self.plan, partial[self.held])
        return partial.index_add(0, self.cut, received)


def local_owners(graph: LocalGraph) -> torch.Tensor:
    """(n_local,) int64 owner rank of each local atom.

    Uses ``graph.owner`` where the engine provides it; otherwise one all-reduce of a
    (N,) vector over the batch (collective).
    """
    owner = getattr(graph, "owner", None)
    if owner is not None:
        return owner
    n_total = int(graph.n_atoms.sum())
    mine = torch.zeros(n_total, dtype=torch.long, device=graph.global_ids.device)
    mine[graph.global_ids[: graph.n_owned]] = graph.rank
    return graph.comm.all_reduce_sum(mine)[graph.global_ids]
