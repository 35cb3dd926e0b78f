"""Batching policy: which pending requests go into the next engine call, and when.

Pure policy: no sockets, no torch, no clock. Callers pass ``now`` (seconds, any
monotonic origin), so tests drive it with fake times.

The rules:

* A *ticket* is one request from one *source* (a ZMQ client, an i-PI connection):
  one or more structures that are computed together and answered together.
  Tickets are never split.
* A batch is filled round robin across sources (one ticket per source per
  round, starting after the source served first last time), up to ``max_atoms``.
  A single ticket larger than ``max_atoms`` runs alone.
* When to run: immediately, unless a pending ticket comes from a *gated*
  source (an i-PI connection: an MD code that sends all its beads at once).
  Then we wait until every gated source has a ticket pending, the pending
  atoms reach ``max_atoms``, or the oldest ticket has waited ``max_wait_s``.
  Ungated requests never wait for a timer: while the engine is busy, what
  arrives piles up and goes out together in the next call.
* The queue holds at most ``max_pending`` tickets and ``max_bytes`` bytes of
  requests (the frames they keep alive); ``submit`` beyond either raises ``Busy``
  instead of growing without limit. A ticket larger than ``max_bytes`` alone is
  taken when nothing else is queued (its size is bounded by the front end's frame
  limit), so every request the front end admits can run.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlipd.errors import Busy
from mlipd.types import Result, Structure


@dataclass(frozen=True, eq=False)
class Ticket:
    """One request waiting for the engine.

    source:     who sent it (fairness and gating key)
    structures: computed in one engine call, answered together
    arrived:    seconds (the caller's clock)
    token:      opaque to the scheduler (how the caller answers it)
    virial:     whether the caller wants the virial
    nbytes:     memory the queued request holds (its frame), for the byte bound
    """

    source: Hashable
    structures: tuple[Structure, ...]
    arrived: float
    token: Any = None
    virial: bool = True
    nbytes: int = 0
    n_atoms: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_atoms", sum(s.n_atoms for s in self.structures))


DEFAULT_MAX_BYTES = 1 << 30  # queued requests' frames: 16 requests of 2M atoms (64 MB)


class Scheduler:
    """Pending tickets per source, and the packing policy (see module docstring)."""

    def __init__(self, *, max_atoms: int = 200_000, max_wait_s: float = 0.002,
                 max_pending: int = 1024, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_atoms < 1 or max_wait_s < 0 or max_pending < 1 or max_bytes < 1:
            raise ValueError("max_atoms, max_pending and max_bytes must be >= 1, "
                             "max_wait_s >= 0")
        self.max_atoms = max_atoms
        self.max_wait_s = max_wait_s
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self._pending_bytes = 0
        self._queues: OrderedDict[Hashable, deque[Ticket]] = OrderedDict()
        self._gated: set[Hashable] = set()
        self._pending = 0
        self._pending_atoms = 0

    # ------------------------------------------------------------ sources

    def add_gated(self, source: Hashable) -> None:
        """A source whose requests come in waves (i-PI): batches wait for all of them."""
        self._gated.add(source)

    def remove_gated(self, source: Hashable) -> None:
        self._gated.discard(source)

    @property
    def gated(self) -> frozenset[Hashable]:
        return frozenset(self._gated)

    # ------------------------------------------------------------ queue

    def __len__(self) -> int:
        return self._pending

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def submit(self, ticket: Ticket) -> None:
        """Queue ``ticket``; raises ``Busy`` when ``max_pending`` tickets or ``max_bytes``
        bytes wait already."""
        if self._pending >= self.max_pending:
            raise Busy(f"server busy: {self._pending} requests queued (limit {self.max_pending})")
        if self._pending and self._pending_bytes + ticket.nbytes > self.max_bytes:
            raise Busy(f"server busy: {self._pending_bytes / 2**20:.1f} MiB of requests queued; "
                       f"this one ({ticket.nbytes / 2**20:.1f} MiB) would pass the limit of "
                       f"{self.max_bytes / 2**20:.0f} MiB (--max-queue-bytes)")
        self._queues.setdefault(ticket.source, deque()).append(ticket)
        self._pending += 1
        self._pending_atoms += ticket.n_atoms
        self._pending_bytes += ticket.nbytes

    def _removed(self, gone: Sequence[Ticket]) -> None:
        self._pending -= len(gone)
        self._pending_atoms -= sum(t.n_atoms for t in gone)
        self._pending_bytes -= sum(t.nbytes for t in gone)

    def remove(self, token: Any) -> Ticket | None:
        """Remove the pending ticket whose ``token`` is ``token`` (its client cancelled
        it or went away); None when it is not queued (running, answered, unknown)."""
        for source, q in self._queues.items():
            for t in q:
                if t.token is token:
                    q.remove(t)
                    if not q:
                        del self._queues[source]
                    self._removed([t])
                    return t
        return None

    # ------------------------------------------------------------ policy

    def _oldest(self) -> float | None:
        heads = [q[0].arrived for q in self._queues.values() if q]
        return min(heads) if heads else None

    def _waiting_on_gate(self) -> bool:
        """A gated ticket is pending and some gated source has not sent yet."""
        pending = {s for s, q in self._queues.items() if q}
        return bool(pending & self._gated) and not self._gated <= pending

    def deadline(self) -> float | None:
        """When the next batch is due at the latest (caller's clock), or None if idle."""
        oldest = self._oldest()
        if oldest is None:
            return None
        if self._pending_atoms >= self.max_atoms or not self._waiting_on_gate():
            return oldest  # due now
        return oldest + self.max_wait_s

    def ready(self, now: float) -> bool:
        due = self.deadline()
        return due is not None and now >= due

    def take(self, now: float, *, force: bool = False) -> list[Ticket]:
        """The next batch (possibly empty if not ``ready(now)``); ``force`` ignores the timer."""
        if not self._pending or not (force or self.ready(now)):
            return []
        batch: list[Ticket] = []
        atoms = 0
        while True:
            added = False
            for source in list(self._queues):
                q = self._queues[source]
                if not q:
                    continue
                t = q[0]
                if batch and atoms + t.n_atoms > self.max_atoms:
                    continue  # a smaller ticket from another source may still fit
                q.popleft()
                batch.append(t)
                atoms += t.n_atoms
                added = True
                # served: this source goes to the back of the round-robin order
                self._queues.move_to_end(source)
                if atoms >= self.max_atoms:
                    break
            if not added or atoms >= self.max_atoms:
                break
        for source in [s for s, q in self._queues.items() if not q]:
            del self._queues[source]
        self._removed(batch)
        return batch


def flatten(batch: Sequence[Ticket]) -> list[Structure]:
    """All structures of ``batch`` in ticket order: one engine call's input."""
    return [s for t in batch for s in t.structures]


def split(batch: Sequence[Ticket], results: Sequence[Result]) -> list[tuple[Ticket, list[Result]]]:
    """Give each ticket back its own results, in its own order (inverse of ``flatten``)."""
    if len(results) != sum(len(t.structures) for t in batch):
        raise ValueError(f"{len(results)} results for {sum(len(t.structures) for t in batch)} "
                         "structures")
    out, k = [], 0
    for t in batch:
        n = len(t.structures)
        out.append((t, list(results[k:k + n])))
        k += n
    return out
