"""CHGNet's bond traffic besides the atom halo: bonds are computed by their owner.

A bond whose two atoms are owned by different ranks (a *cut* bond) is owned by one
of them and replicated on the other, which holds the directed edge centred at its own
atom (``chgnet_graph``). Each BondConv sums messages over the angles at both atoms, so
the replica sends its part of the sum home (``sum_home``), the owner alone computes
the new bond features, and sends them back to the replicas (``spread``), where the
next AngleUpdate and AtomConv read them. Both are one all_to_all of only the rows
that need it: short replica bonds (the only ones in angles) home, all replicas back.
Backward is the adjoint pair (``comm.scatter_home`` and ``comm.exchange``).
"""

from __future__ import annotations

import torch

from mlipd.engine.graph import LocalGraph
from mlipd.models.chgnet_graph import BondGraph


class BondExchange:
    """Owner-computes traffic of one rank's bond rows ``[owned | replicas]``.

    Built once per forward. At one rank (``graph.comm is None``) every bond is owned
    and nothing communicates. At P > 1 building it and every call are collective: all
    ranks do both, the same number of times. ``calls`` counts the exchanges made and
    ``rows_received`` the bond rows that arrived here.
    """

    def __init__(self, graph: LocalGraph, bg: BondGraph) -> None:
        self.calls = 0
        self.rows_received = 0
        self.n_owned = bg.n_owned_bonds
        self.comm = graph.comm
        if self.comm is None:
            return
        rep = torch.arange(bg.n_owned_bonds, bg.n_bonds, device=bg.bond_keys.device)
        partner = local_owners(graph)[graph.senders[bg.bond_edge[rep]]]
        short = bg.bond_short[rep]
        owned_keys = bg.bond_keys[: bg.n_owned_bonds]
        # the owner offers all its bonds: a bond whose two ranks disagree at round-off
        # on "<= 3 Å" is still found (its message is ~0: the weights vanish smoothly)
        self.all_plan = self.comm.plan_from_keys(owned_keys, bg.bond_keys[rep], partner)
        self.short = rep[short]
        self.short_plan = self.comm.plan_from_keys(owned_keys, bg.bond_keys[self.short],
                                                   partner[short])

    def owned(self, rows: torch.Tensor) -> torch.Tensor:
        """(U, ...) -> the owned rows (n_owned_bonds, ...)."""
        return rows if self.comm is None else rows[: self.n_owned]

    def sum_home(self, partial: torch.Tensor) -> torch.Tensor:
        """(U, F) partial sums -> (n_owned_bonds, F): each owned bond's part plus what
        its replica holds."""
        if self.comm is None:
            return partial
        self.calls += 1
        self.rows_received += sum(self.short_plan.send_counts)  # what peers asked, they send
        return partial[: self.n_owned] + self.comm.scatter_home(self.short_plan,
                                                                partial[self.short])

    def spread(self, owned: torch.Tensor) -> torch.Tensor:
        """(n_owned_bonds, F) -> (U, F): replica rows copied from their owners."""
        if self.comm is None:
            return owned
        self.calls += 1
        received = self.comm.exchange(self.all_plan, owned)
        self.rows_received += int(received.shape[0])
        return torch.cat([owned, received])


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
