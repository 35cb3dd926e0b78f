"""One rank's share of the atom graph, built without the whole edge list, and kept on
the device until the next rebuild.

At a rebuild, each rank takes the atoms it owns, finds (with ``BinGrid``) every atom
that may lie within ``radius = cutoff + skin`` of them, and runs vesin on that subset
only: the pairs it returns are exactly the pairs of the full list that touch the
subset, with the same integer image shifts. Edges are kept when their receiver is
owned, so across ranks every edge exists exactly once. At one rank every atom is owned
by rank 0 and vesin sees whole structures (no bins). ``RankEdges`` is what a rebuild
finds, on the host.

``Topology`` is that uploaded once per rebuild: index tensors, images,
per-structure data and the halo plan stay on the device, with a ``cache`` where models
keep what they derive from the candidate edges; per step only positions and cells
travel.

A halo atom is a distinct global atom: several periodic images of one atom are one
halo row, and the edges that reach it carry their own integer image shifts.

Between rebuilds the same topology serves: the step marks the candidate edges now at
``r < cutoff`` (``LocalGraph.edge_mask``, weighted by ``masked_edges`` models) or selects
them (other models), so results equal a fresh neighbour list exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vesin import NeighborList

from mlipd.engine.bins import BinGrid

GEOMETRY_DTYPE = torch.float64  # positions, cells, shifts, energy sums, forces, virials


@dataclass(frozen=True)
class RankEdges:
    """Atoms and candidate edges of one rank as a rebuild finds them, on the host (the
    step keeps them on its device as a ``Topology``).

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


def _structure_edges(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                     owned: np.ndarray, radius: float) -> tuple[np.ndarray, ...]:
    """Edges (receiver, sender, image) of one structure whose receiver is owned.

    owned: (N,) bool. Returns structure-local indices and the number of vesin inputs.
    """
    if owned.all():  # one rank: the whole structure
        subset = np.arange(positions.shape[0])
    else:
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
                   radius: float) -> RankEdges:
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
    return RankEdges(
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


class HostToDevice:
    """Every host-to-device copy of a rank's step goes through here and is counted
    (``bytes``, all copies; ``step_bytes``, since the last ``new_step``), so a test can
    hold the warm step to positions and cells.

    ``staged=True`` (a step's positions and cells) on CUDA: the array is copied into a
    page-locked buffer kept for its slot (the k-th staged copy of a step, its shape and
    dtype) and sent with a non-blocking copy, so the host neither waits for the transfer
    nor pays the driver's extra staging of pageable memory. A buffer is rewritten one
    step later, after that step's result came back (which waits for every copy before)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0
        self.step_bytes = 0
        self._slot = 0
        self._pinned: dict[tuple, torch.Tensor] = {}

    @property
    def pins(self) -> bool:
        return self.device.type == "cuda"

    def new_step(self) -> None:
        self.step_bytes = 0
        self._slot = 0

    def __call__(self, data: np.ndarray | torch.Tensor, dtype: torch.dtype, *,
                 staged: bool = False) -> torch.Tensor:
        if isinstance(data, torch.Tensor):
            if data.device == self.device:
                return data.to(dtype)
            t = data.to(self.device, dtype)
        elif staged and self.pins:
            t = self._staged(data, dtype)
        elif data.flags.writeable:
            t = torch.as_tensor(data, dtype=dtype, device=self.device)
        else:
            # server frames are read-only views of message buffers: autograd never writes
            # into a leaf, so torch's warning about them does not apply (zero-copy on CPU)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                t = torch.as_tensor(data, dtype=dtype, device=self.device)
        n = t.numel() * t.element_size()
        if n == 0:  # an empty array's strides are whatever made it (numpy's (0, 3) from
            # vesin: (0, 0)); one layout for all, so compiled code is not respecialised
            return torch.empty(t.shape, dtype=t.dtype, device=t.device)
        self.bytes += n
        self.step_bytes += n
        return t

    def _staged(self, data: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        key = (self._slot, tuple(data.shape), dtype)
        self._slot += 1
        buf = self._pinned.get(key)
        if buf is None:
            if len(self._pinned) > 64:  # batch shapes changed many times: start over
                self._pinned.clear()
            buf = self._pinned[key] = torch.empty(data.shape, dtype=dtype).pin_memory()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            buf.copy_(torch.as_tensor(data))
        return buf.to(self.device, non_blocking=True)


@dataclass
class Topology:
    """A rank's topology on its device, from one rebuild to the next.

    n_owned, n_local, n_structures: sizes
    local_ids:  (n_local,) int64 batch-global id of each local atom; None at one rank,
                where local rows are the batch's atoms in order
    numbers, batch, global_ids: (n_local,) int64; n_atoms: (B,) int64
    owner:      (n_local,) int64 owner rank, None at one rank
    receivers, senders, edge_batch: (E,) int64 candidate edges (r < cutoff + skin at
                the rebuild); images: (E, 3) int64 and images_f the same as float64
    plan:       the atom halo plan (``mlipd.engine.halo.HaloPlan``), None at one rank
    cache:      models' per-topology structures (``LocalGraph.cache``)
    n_real:     the batch's atoms among the owned rows (the first); the rest, up to
                n_owned, pad the counts to a bucket (``mlipd.engine.padding``)
    pad_positions: (n_owned - n_real, 3) float64 Å of the padding atoms, or None
    real:       (n_owned,) float64, 1 for the batch's atoms and 0 for padding; None
                without padding. n_real_t: n_real as a float64 device scalar (or None)
    """

    n_owned: int
    n_local: int
    n_structures: int
    local_ids: torch.Tensor | None
    numbers: torch.Tensor
    batch: torch.Tensor
    global_ids: torch.Tensor
    n_atoms: torch.Tensor
    owner: torch.Tensor | None
    receivers: torch.Tensor
    senders: torch.Tensor
    edge_batch: torch.Tensor
    images: torch.Tensor
    images_f: torch.Tensor
    plan: Any = None
    cache: dict[str, Any] = field(default_factory=dict)
    n_real: int = -1
    pad_positions: torch.Tensor | None = None
    real: torch.Tensor | None = None
    n_real_t: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.n_real < 0:
            self.n_real = self.n_owned

    @property
    def n_edges(self) -> int:
        return int(self.receivers.shape[0])


def upload(topo: RankEdges, *, numbers: np.ndarray, offsets: np.ndarray, one_rank: bool,
           h2d: HostToDevice, plan: Any = None, padding=None) -> Topology:
    """``topo`` on ``h2d.device``; numbers: (N,) of the whole batch; padding: the
    ``mlipd.engine.padding.Padding`` of a padded one-rank topology, or None."""
    long = torch.long
    images = h2d(topo.images, long)
    extra = {}
    if padding is not None:
        numbers = np.concatenate([numbers, padding.numbers])
        real = np.zeros(padding.n_atoms)
        real[: padding.n_real] = 1.0
        extra = dict(n_real=padding.n_real,
                     pad_positions=h2d(padding.positions, GEOMETRY_DTYPE),
                     real=h2d(real, GEOMETRY_DTYPE),
                     n_real_t=h2d(np.array(float(padding.n_real)), GEOMETRY_DTYPE))
    return Topology(
        n_owned=topo.n_owned, n_local=topo.n_local, n_structures=int(offsets.shape[0] - 1),
        local_ids=None if one_rank else h2d(topo.local_ids, long),
        numbers=h2d(numbers if one_rank else numbers[topo.local_ids], long),
        batch=h2d(topo.batch, long),
        global_ids=h2d(topo.local_ids, long),
        n_atoms=h2d(np.diff(offsets), long),
        owner=None if one_rank else h2d(topo.local_owner, long),
        receivers=h2d(topo.receivers, long), senders=h2d(topo.senders, long),
        edge_batch=h2d(topo.edge_batch, long), images=images,
        images_f=images.to(GEOMETRY_DTYPE), plan=plan, **extra)
