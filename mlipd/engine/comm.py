"""The communicator models and the engine use across ranks (``LocalGraph.comm``).

API (all collective: every rank of the group calls them in the same order):

    plan = comm.plan_from_keys(owned_keys, wanted_keys, wanted_owner)
        owned_keys   (m, k) int64: keys of the rows this rank owns (unique)
        wanted_keys  (n, k) int64: keys of the rows this rank needs from others
        wanted_owner (n,)   int64: group rank that owns each wanted key
        Keys are anything the ranks agree on, e.g. (global atom id,) for atoms or
        (global id i, global id j, image a, b, c) for bonds. A wanted key missing at
        its owner raises ``CalculationFailed``.
    comm.exchange(plan, owned_rows (m, ...)) -> (n, ...)
        copies from the owners; differentiable (backward sums gradients at the owners)
    comm.scatter_home(plan, wanted_rows (n, ...)) -> (m, ...)
        the adjoint: every owner receives the sum of what its holders sent
    comm.extend(plan, *owned (m, F_k)) -> ((m + n, F_k), ...)
        rows kept as [owned | copies]: each tensor followed by the copies it receives
    comm.sum_home(plan, partial (m + n', ...), rows, homed) -> (m, ...)
        partial sums on such rows completed at the owners
    comm.all_reduce_sum(tensor) -> tensor summed over ranks; differentiable
    comm.traffic: rows sent and received by every exchange so far (``Traffic``)

At one rank use ``None`` for ``comm``: models call ``graph.exchange`` for atom
features, which is the identity there.

Tensors live on the rank's compute ``device``; collectives run on ``wire``: the same
device under NCCL, the host under gloo (several ranks sharing a GPU, or CPU ranks),
where rows are staged through host memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mlipd.engine.halo import (
    AllReduceSum,
    Exchange,
    Extend,
    HaloPlan,
    ScatterHome,
    SumHome,
    Traffic,
    all_to_all_rows,
)
from mlipd.errors import CalculationFailed


class Comm:
    """A process group seen from one rank (``rank``/``world_size`` are group ranks).

    device: where this rank computes; wire: where its collectives run (default: device)
    """

    def __init__(self, *, group=None, device: torch.device | str = "cpu",
                 wire: torch.device | str | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = torch.device(device)
        self.wire = self.device if wire is None else torch.device(wire)
        self.traffic = Traffic()  # rows moved by every exchange on this rank's plans
        self._root = dist.get_global_rank(group, 0) if group is not None else 0

    # --- halo plans and exchanges -------------------------------------------------
    def plan_from_keys(self, owned_keys: torch.Tensor, wanted_keys: torch.Tensor,
                       wanted_owner: torch.Tensor) -> HaloPlan:
        p, dev, wire = self.world_size, self.device, self.wire
        owned_keys = _as_2d(owned_keys).to(wire)
        wanted_keys = _as_2d(wanted_keys).to(wire)
        wanted_owner = wanted_owner.to(wire, torch.long)
        if wanted_keys.shape[1] != owned_keys.shape[1] and wanted_keys.shape[0]:
            raise ValueError("owned_keys and wanted_keys need the same number of columns")
        if bool((wanted_owner == self.rank).any()):
            raise ValueError("a wanted key is owned by the asking rank itself")
        order = torch.argsort(wanted_owner, stable=True)
        recv_counts_t = torch.bincount(wanted_owner, minlength=p)
        send_counts_t = all_to_all_rows(recv_counts_t.view(p, 1), [1] * p, [1] * p, self.group)
        recv_counts, send_counts = recv_counts_t.tolist(), send_counts_t.view(-1).tolist()
        asked = all_to_all_rows(wanted_keys[order], recv_counts, send_counts, self.group)
        send_rows = _lookup(owned_keys, asked)
        if bool((send_rows < 0).any()):
            missing = asked[send_rows < 0][:3].tolist()
            raise CalculationFailed(f"rank {self.rank}: peers asked for keys it does not own, "
                                    f"e.g. {missing}")
        recv_order = torch.empty_like(order)
        recv_order[order] = torch.arange(order.numel(), device=wire)
        return HaloPlan(n_owned=int(owned_keys.shape[0]), n_wanted=int(wanted_keys.shape[0]),
                        send_rows=send_rows.to(dev), send_counts=send_counts,
                        recv_counts=recv_counts, recv_order=recv_order.to(dev),
                        group=self.group, wire=None if wire == dev else wire,
                        traffic=self.traffic)

    def exchange(self, plan: HaloPlan, owned_rows: torch.Tensor) -> torch.Tensor:
        return Exchange.apply(owned_rows, plan)

    def extend(self, plan: HaloPlan, *owned: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor of owned rows (m, F_k) followed by the rows ``plan`` receives of
        it, (m + n, F_k), several tensors in one exchange (``halo.Extend``)."""
        return Extend.apply(plan, *owned)

    def sum_home(self, plan: HaloPlan, partial: torch.Tensor, rows: torch.Tensor,
                 homed: torch.Tensor) -> torch.Tensor:
        """Partial sums on [owned (m) | copies] rows (m + n, ...) -> the owned rows' sums
        (m, ...): the copies ``rows`` (``plan``'s wanted rows) added at their owners,
        to the owned rows ``homed`` (``halo.SumHome``)."""
        return SumHome.apply(partial, plan, plan.n_owned, rows, homed)

    def scatter_home(self, plan: HaloPlan, wanted_rows: torch.Tensor) -> torch.Tensor:
        return ScatterHome.apply(wanted_rows, plan)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return AllReduceSum.apply(tensor, self.group, None if self.wire == self.device
                                  else self.wire)

    # --- rank-0 traffic (not differentiable) ----------------------------------------
    def broadcast_object(self, obj: Any = None) -> Any:
        """Pickle ``obj`` on group rank 0 and return it everywhere."""
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=self._root, group=self.group)
        return box[0]

    def broadcast_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Group rank 0's ``tensor`` on every rank (others pass one of the same shape and
        dtype to receive into); returned on ``tensor``'s device."""
        t = tensor.to(self.wire).contiguous()
        dist.broadcast(t, src=self._root, group=self.group)
        return t.to(tensor.device)

    def broadcast_array(self, array: np.ndarray | None, *, shape: tuple[int, ...],
                        dtype: torch.dtype) -> np.ndarray:
        """Rank 0's ``array`` (given ``shape``/``dtype``) on every rank, as numpy."""
        if self.rank == 0:
            t = torch.as_tensor(np.ascontiguousarray(array)).to(dtype).reshape(shape)
        else:
            t = torch.empty(shape, dtype=dtype)
        return self.broadcast_tensor(t).numpy()

    def gather_rows(self, rows: torch.Tensor, *, n_max: int) -> list[torch.Tensor] | None:
        """Rows (r, c) of every rank padded to ``n_max`` rows; the list (on the host) on
        rank 0 only."""
        buf = rows.new_zeros((n_max, rows.shape[1]))
        buf[: rows.shape[0]] = rows
        buf = buf.to(self.wire)
        out = [torch.empty_like(buf) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(buf, out, dst=self._root, group=self.group)
        return None if out is None else [t.cpu() for t in out]

    def atom_exchange(self, plan: HaloPlan):
        """The ``LocalGraph.exchange`` callable: (n_owned, ...) -> (n_owned + n_halo, ...)."""

        def exchange(owned: torch.Tensor) -> torch.Tensor:
            return torch.cat([owned, Exchange.apply(owned, plan)])

        return exchange


def _as_2d(keys: torch.Tensor) -> torch.Tensor:
    keys = torch.as_tensor(keys, dtype=torch.long)
    return keys.view(-1, 1) if keys.dim() == 1 else keys


def _lookup(table_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Row of each query key in ``table_keys`` (both (r, k) int64), -1 where absent."""
    m = table_keys.shape[0]
    if query.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=table_keys.device)
    both = torch.cat([table_keys, query.reshape(-1, table_keys.shape[1])])
    _, inverse = torch.unique(both, dim=0, return_inverse=True)
    table = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.long, device=both.device)
    table[inverse[:m]] = torch.arange(m, device=both.device)
    return table[inverse[m:]]
