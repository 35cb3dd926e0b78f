"""CHGNet's bond traffic besides the atom halo: bonds are computed by their owner.

A bond whose two atoms are owned by different ranks (a *cut* bond) is owned by one
of them and replicated on the other, which holds the directed edge centred at its own
atom (``chgnet_graph``). Each BondConv sums messages over the angles at both atoms, so
the replica sends its part of the sum home (``sum_home``), the owner alone computes
the new bond features, and sends them back to the replicas (``spread``), where the
next AngleUpdate and AtomConv read them (``comm.sum_home`` and ``comm.extend``, each the
other's adjoint in backward).

The plans are made once per topology on the skin graph (``BondPlans``, collective):
every replica bond for ``spread``, the replicas that may be short (within bond cutoff
+ skin) for ``sum_home``. A step runs on every skin bond (fixed shapes): a bond that is
not short now has no angle of this step, so its partial sum is exactly zero.
"""

from __future__ import annotations

import torch

from mlipd.model_api import LocalGraph
from mlipd.models.chgnet_graph import SkinGraph


class BondPlans:
    """One rank's bond plans for a topology (collective: every rank builds them)."""

    def __init__(self, graph: LocalGraph, skin: SkinGraph, senders: torch.Tensor) -> None:
        comm = graph.comm
        n_own = skin.n_owned_bonds
        rep = torch.arange(n_own, skin.n_bonds, device=skin.bond_keys.device)
        partner = local_owners(graph)[senders[skin.bond_edge[rep]]]
        owned_keys = skin.bond_keys[:n_own]
        # the owner offers all its bonds: a bond whose two ranks disagree at round-off
        # on "<= 3 Å" is still found (its message is ~0: the weights vanish smoothly)
        self.all_plan = comm.plan_from_keys(owned_keys, skin.bond_keys[rep], partner)
        short = skin.near[rep]
        self.short = torch.nonzero(short).squeeze(1)  # among the replica rows
        self.short_plan = comm.plan_from_keys(owned_keys, skin.bond_keys[rep[short]],
                                              partner[short])
        # owned bonds that receive a replica's partial sum: the only rows ``sum_home`` adds
        self.homed = torch.unique(self.short_plan.send_rows)


class BondExchange:
    """Owner-computes traffic of one step's bond rows ``[owned | replicas]``: the fixed
    graph's (every skin bond, fixed shapes; absent bonds carry unused values).

    At one rank (``plans is None``) every bond is owned and nothing communicates. At
    P > 1 every call is collective: all ranks make it the same number of times (the
    rows moved are counted by the communicator's ``traffic``).
    """

    def __init__(self, plans: BondPlans | None, comm=None) -> None:
        self.plans = plans
        self.comm = comm

    def sum_home(self, partial: torch.Tensor) -> torch.Tensor:
        """(U, F) partial sums -> (n_owned_bonds, F): each owned bond's part plus what
        its replica holds (a bond without angles now has an exact zero part)."""
        if self.plans is None:
            return partial
        p = self.plans
        return self.comm.sum_home(p.short_plan, partial, p.short, p.homed)

    def spread(self, *owned: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(n_owned_bonds, F_k) tensors -> (U, F_k) each: replica rows copied from their
        owners, in one exchange."""
        if self.plans is None:
            return owned
        return self.comm.extend(self.plans.all_plan, *owned)


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
