"""CHGNet's bond traffic besides the atom halo: bonds are computed by their owner.

A bond whose two atoms are owned by different ranks (a *cut* bond) is owned by one
of them and replicated on the other, which holds the directed edge centred at its own
atom (``chgnet_graph``). Each BondConv sums messages over the angles at both atoms, so
the replica sends its part of the sum home (``sum_home``), the owner alone computes
the new bond features, and sends them back to the replicas (``spread``), where the
next AngleUpdate and AtomConv read them. Backward is the adjoint pair
(``comm.scatter_home`` and ``comm.exchange``).

The plans are made once per topology on the skin graph (``BondPlans``, collective):
every replica bond for ``spread``, the replicas that may be short (within bond cutoff
+ skin) for ``sum_home``. A step runs on every skin bond (fixed shapes): a bond that is
not short now has no angle of this step, so its partial sum is exactly zero.
"""

from __future__ import annotations

import torch

from mlipd.model_api import LocalGraph
from mlipd.models.chgnet_graph import BondGraph, SkinGraph


class BondPlans:
    """One rank's bond plans for a topology (collective: every rank builds them).

    near: (U_c,) bool, skin bonds within bond cutoff + skin (the only ones ever short)
    """

    def __init__(self, graph: LocalGraph, skin: SkinGraph, senders: torch.Tensor,
                 near: torch.Tensor) -> None:
        comm = graph.comm
        n_own = skin.n_owned_bonds
        rep = torch.arange(n_own, skin.n_bonds, device=skin.bond_keys.device)
        partner = local_owners(graph)[senders[skin.bond_edge[rep]]]
        owned_keys = skin.bond_keys[:n_own]
        # the owner offers all its bonds: a bond whose two ranks disagree at round-off
        # on "<= 3 Å" is still found (its message is ~0: the weights vanish smoothly)
        self.all_plan = comm.plan_from_keys(owned_keys, skin.bond_keys[rep], partner)
        short = near[rep]
        self.short = torch.nonzero(short).squeeze(1)  # among the replica rows
        self.short_plan = comm.plan_from_keys(owned_keys, skin.bond_keys[rep[short]],
                                              partner[short])
        # owned bonds that receive a replica's partial sum: the only rows ``sum_home`` adds
        self.homed = torch.unique(self.short_plan.send_rows)
        self.n_owned = n_own
        self.n_replicas = int(rep.shape[0])


class BondExchange:
    """Owner-computes traffic of one step's bond rows ``[owned | replicas]``: the fixed
    graph's (every skin bond, fixed shapes; absent bonds carry unused values).

    At one rank (``plans is None``) every bond is owned and nothing communicates. At
    P > 1 every call is collective: all ranks make it the same number of times (the
    rows moved are counted by the communicator's ``traffic``).
    """

    def __init__(self, plans: BondPlans | None, bg: BondGraph, comm=None) -> None:
        self.n_owned = bg.n_owned_bonds
        self.plans = plans
        self.comm = comm

    def owned(self, rows: torch.Tensor) -> torch.Tensor:
        """(U, ...) -> the owned rows (n_owned_bonds, ...)."""
        return rows if self.plans is None else rows[: self.n_owned]

    def sum_home(self, partial: torch.Tensor) -> torch.Tensor:
        """(U, F) partial sums -> (n_owned_bonds, F): each owned bond's part plus what
        its replica holds (a bond without angles now has an exact zero part)."""
        if self.plans is None:
            return partial
        p = self.plans
        home = self.comm.scatter_home(p.short_plan, partial[self.n_owned:][p.short])
        # added to the bonds that received a part only (not a dense add over all bonds)
        return partial[: self.n_owned].index_add(0, p.homed, home[p.homed])

    def spread(self, owned: torch.Tensor) -> torch.Tensor:
        """(n_owned_bonds, F) -> (U, F): replica rows copied from their owners."""
        if self.plans is None:
            return owned
        return torch.cat([owned, self.comm.exchange(self.plans.all_plan, owned)])


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
