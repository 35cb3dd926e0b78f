"""Halo plans and the differentiable exchanges built on them.

A ``HaloPlan`` says, on one rank, which of its owned rows every peer wants
(``send_rows``, grouped by peer) and how many rows it receives from each peer for the
rows it wants (``recv_counts``; received rows arrive grouped by peer, and
``recv_order`` puts them back in the order they were asked for). Plans are made by
``Comm.plan_from_keys`` (collective) and are reused until the partition changes.

Two adjoint operations, each one ``all_to_all_single``:
- ``Exchange``: owned rows (m, ...) -> wanted rows (n, ...), copies from the owners.
  Backward: the reverse all_to_all, scatter-added into the owners' rows.
- ``ScatterHome``: wanted rows (n, ...) -> owned rows (m, ...), each owner receives the
  sum of the values its holders sent. Backward: ``Exchange``.

and two built on them for rows kept as [owned | copies] (CHGNet's bonds): ``Extend``
(owned rows followed by the copies they receive) and ``SumHome`` (partial sums on such
rows completed at the owners).
Every rank must call them in the same order (they are collectives, also in backward).

Rows live on the rank's compute device; the collectives run on the plan's ``wire``
device: the same device under NCCL, the host under gloo when ranks share a GPU (the
rows are staged through host memory there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable


@dataclass
class Traffic:
    """Rows a rank's exchanges moved (every plan of one communicator, forward and
    backward alike): counted where the all_to_all happens, for the zero-redundancy
    checks and metrics."""

    rows_sent: int = 0
    rows_received: int = 0
    exchanges: int = 0

    def add(self, sent: int, received: int) -> None:
        self.rows_sent += sent
        self.rows_received += received
        self.exchanges += 1

    def snapshot(self) -> tuple[int, int, int]:
        return self.rows_sent, self.rows_received, self.exchanges


@dataclass(frozen=True)
class HaloPlan:
    """One rank's side of an all_to_all pattern.

    n_owned:     m, rows on this rank that others may ask for
    n_wanted:    n, rows this rank asked for
    send_rows:   (S,) int64 owned-row indices sent, grouped by destination rank
    send_counts: per peer, rows sent (len world_size; sums to S)
    recv_counts: per peer, rows received (len world_size; sums to n)
    recv_order:  (n,) int64, wanted row k arrives at position recv_order[k] of the
                 peer-grouped receive buffer
    group:       the process group
    wire:        the device the collectives run on (None: the rows' own)
    traffic:     where the exchanges on this plan are counted (None: not counted)
    """

    n_owned: int
    n_wanted: int
    send_rows: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    recv_order: torch.Tensor
    group: object = None
    wire: torch.device | None = None
    traffic: Traffic | None = None


def all_to_all_rows(rows: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                    group=None, wire: torch.device | None = None) -> torch.Tensor:
    """Rows (sum send_counts, ...) grouped by destination -> (sum recv_counts, ...) by
    source, on the rows' device (staged through ``wire`` when that differs)."""
    tail = rows.shape[1:]
    flat = rows.reshape(rows.shape[0], math.prod(tail)).contiguous()
    home = flat.device
    if wire is not None and wire != home:
        flat = flat.to(wire)
    out = flat.new_empty((sum(recv_counts), flat.shape[1]))
    dist.all_to_all_single(out, flat, output_split_sizes=recv_counts,
                           input_split_sizes=send_counts, group=group)
    return out.to(home).reshape((out.shape[0], *tail))


def exchange_rows(plan: HaloPlan, owned: torch.Tensor) -> torch.Tensor:
    """Non-differentiable forward of ``Exchange``: (m, ...) -> (n, ...)."""
    sent = owned[plan.send_rows]
    received = all_to_all_rows(sent, plan.send_counts, plan.recv_counts, plan.group, plan.wire)
    if plan.traffic is not None:  # the buffers' rows, not the plan's counts
        plan.traffic.add(int(sent.shape[0]), int(received.shape[0]))
    return received[plan.recv_order]


def scatter_home_rows(plan: HaloPlan, wanted: torch.Tensor) -> torch.Tensor:
    """Non-differentiable forward of ``ScatterHome``: (n, ...) -> (m, ...) sums at owners."""
    grouped = wanted.new_empty(wanted.shape)
    grouped[plan.recv_order] = wanted
    back = all_to_all_rows(grouped, plan.recv_counts, plan.send_counts, plan.group, plan.wire)
    if plan.traffic is not None:
        plan.traffic.add(int(grouped.shape[0]), int(back.shape[0]))
    out = wanted.new_zeros((plan.n_owned, *wanted.shape[1:]))
    return out.index_add_(0, plan.send_rows, back)


class Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owned: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
        ctx.plan = plan
        return exchange_rows(plan, owned)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ScatterHome.apply(grad, ctx.plan), None


class ScatterHome(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wanted: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
        ctx.plan = plan
        return scatter_home_rows(plan, wanted)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return Exchange.apply(grad, ctx.plan), None


def extend_rows(plan: HaloPlan, owned: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Non-differentiable forward of ``Extend``: each (m, F_k) tensor followed by the rows
    it receives, (m + n, F_k); several tensors in one exchange, side by side."""
    packed = owned[0] if len(owned) == 1 else torch.cat(owned, dim=1)
    received = exchange_rows(plan, packed)
    parts = (received,) if len(owned) == 1 else received.split([t.shape[1] for t in owned],
                                                                 dim=1)
    return tuple(torch.cat([o, r]) for o, r in zip(owned, parts, strict=True))


def home_grads(plan: HaloPlan, grads: tuple[torch.Tensor, ...], m: int
               ) -> tuple[torch.Tensor, ...]:
    """Backward of ``Extend``: each (m + n, F_k) gradient's owned rows plus its received
    rows' gradients, summed at their owners."""
    packed = grads[0][m:] if len(grads) == 1 else torch.cat([g[m:] for g in grads], dim=1)
    home = scatter_home_rows(plan, packed)
    parts = (home,) if len(grads) == 1 else home.split([g.shape[1] for g in grads], dim=1)
    return tuple(g[:m] + h for g, h in zip(grads, parts, strict=True))


class Extend(torch.autograd.Function):
    """Owned rows (m, ...) -> [owned | received] (m + n, ...), for one or several tensors
    in one exchange. Backward: the received rows' gradients summed home and added to the
    owned rows', within the exchange (no accumulation of two gradients of ``owned``)."""

    @staticmethod
    def forward(ctx, plan: HaloPlan, *owned: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.plan, ctx.m = plan, owned[0].shape[0]
        return extend_rows(plan, owned)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        return None, *home_grads(ctx.plan, grads, ctx.m)


def sum_home_rows(plan: HaloPlan, partial: torch.Tensor, m: int, rows: torch.Tensor,
                  homed: torch.Tensor) -> torch.Tensor:
    """Non-differentiable forward of ``SumHome``."""
    home = scatter_home_rows(plan, partial[m:][rows])
    # added to the owned rows that received a part only (not a dense add over all rows)
    return partial[:m].index_add(0, homed, home[homed])


def sum_home_grads(plan: HaloPlan, grad: torch.Tensor, n_rows: int, m: int,
                   rows: torch.Tensor) -> torch.Tensor:
    """Backward of ``SumHome``: (m, ...) -> (n_rows, ...), each owned row's gradient, and
    a copy of it at every row ``rows`` holds of it (zero at the other rows)."""
    out = grad.new_zeros((n_rows, *grad.shape[1:]))
    out[:m] = grad
    out[m:][rows] = exchange_rows(plan, grad)
    return out


class SumHome(torch.autograd.Function):
    """Partial sums on rows [owned (m) | copies of others' rows] -> the owned rows' sums
    (m, ...): ``rows`` (among the copies, ``plan``'s wanted rows) sent to their owners
    and added there, to the owned rows ``homed`` they reach. Backward: each owned row's
    gradient, copied to the rows that hold it (the adjoint)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, plan: HaloPlan, m: int, rows: torch.Tensor,
                homed: torch.Tensor) -> torch.Tensor:
        ctx.plan, ctx.m, ctx.n_rows = plan, m, partial.shape[0]
        ctx.save_for_backward(rows)
        return sum_home_rows(plan, partial, m, rows, homed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return sum_home_grads(ctx.plan, grad, ctx.n_rows, ctx.m, rows), None, None, None, None


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is again the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, wire) -> torch.Tensor:
        ctx.group, ctx.wire = group, wire
        return all_reduce(x, group, wire)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad, ctx.group, ctx.wire), None, None


def all_reduce(x: torch.Tensor, group, wire: torch.device | None) -> torch.Tensor:
    """A summed copy of ``x`` over ranks, on ``x``'s device (staged through ``wire``)."""
    out = x.detach().to(wire if wire is not None else x.device, copy=True).contiguous()
    dist.all_reduce(out, group=group)
    return out.to(x.device)
