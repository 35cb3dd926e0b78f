"""The single-process engine: one rank owns every atom (P = 1 of the distributed loop).

Per-call cost matters here (``mlipd drive`` calls the engine once per MD step), so
what depends only on the batch's topology is kept between calls: the neighbour
list is built with ``cutoff + skin`` and reused while ``RebuildPolicy`` (the
distributed engine's Verlet bookkeeping) allows it; each call then drops the pairs
now at ``r >= cutoff``, so the model sees exactly the pairs of a fresh list (in
vesin's build order). Index tensors and the species check ride along with it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mlipd.engine.graph import LocalGraph
from mlipd.engine.neighbors import neighbor_list
from mlipd.engine.verlet import RebuildPolicy
from mlipd.errors import CalculationFailed, UnknownSpecies
from mlipd.models.base import Model
from mlipd.types import Result, Structure

DEFAULT_SKIN = 0.5  # Å, as the distributed engine
# positions, cells, energy sums, forces and virials: float64 whatever the model's dtype
# (see LocalGraph); only the model's features follow ``dtype``
GEOMETRY_DTYPE = torch.float64


def check_species(model: Model, structures: Sequence[Structure]) -> None:
    known = model.spec.species
    if known is None:
        return
    for s in structures:
        unknown = s.species() - known
        if unknown:
            raise UnknownSpecies(
                f"model {model.spec.name!r} does not know atomic numbers {sorted(unknown)}"
            )


def for_inference(model: Model, device: torch.device, dtype: torch.dtype) -> Model:
    """The model on ``device`` in ``dtype``, in eval mode, with frozen parameters:
    forces need gradients of positions only, and a frozen weight spares autograd
    keeping every layer's input for its gradient (CHGNet: -30% peak memory)."""
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def strained(positions: torch.Tensor, cells: torch.Tensor, batch: torch.Tensor,
             strain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a per-structure strain: x -> x (1 + eps), cell -> cell (1 + eps).

    The virial is then -dE/d(eps) at eps = 0 (eV), for every model alike.
    """
    deform = torch.eye(3, dtype=strain.dtype, device=strain.device) + strain
    if deform.shape[0] == 1:  # one structure: a plain matmul, no (N, 3, 3) gather
        return positions @ deform[0], cells @ deform
    pos = torch.bmm(positions.unsqueeze(1), deform[batch]).squeeze(1)
    return pos, torch.bmm(cells, deform)


@dataclass(frozen=True)
class _Topology:
    """What a batch keeps between calls until the next rebuild (all on the engine's device).

    offsets:    (B + 1,) numpy int64, first atom of each structure in the batch
    numbers, batch, global_ids: (N,) int64; n_atoms: (B,) int64
    receivers, senders, edge_batch: (E,) int64, pairs with r < cutoff + skin at the build
    images:     (E, 3) lattice image of the sender, int64 and float64
    """

    offsets: np.ndarray
    numbers: torch.Tensor
    batch: torch.Tensor
    global_ids: torch.Tensor
    n_atoms: torch.Tensor
    receivers: torch.Tensor
    senders: torch.Tensor
    edge_batch: torch.Tensor
    images: torch.Tensor
    images_float: torch.Tensor


def _build_topology(structures: Sequence[Structure], radius: float, *,
                    device: torch.device) -> _Topology:
    counts = [s.n_atoms for s in structures]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    recv, send, img, ebatch = [], [], [], []
    for b, s in enumerate(structures):
        e = neighbor_list(s, radius)
        recv.append(e.centers + offsets[b])
        send.append(e.neighbors + offsets[b])
        img.append(e.shifts)
        ebatch.append(np.full(len(e), b, dtype=np.int64))
    as_t = lambda a, t: torch.as_tensor(a, dtype=t, device=device)  # noqa: E731
    images = as_t(np.concatenate(img), torch.long)
    return _Topology(
        offsets=offsets,
        numbers=as_t(np.concatenate([s.numbers for s in structures]), torch.long),
        batch=as_t(np.repeat(np.arange(len(structures)), counts), torch.long),
        global_ids=torch.arange(int(offsets[-1]), device=device),
        n_atoms=as_t(counts, torch.long),
        receivers=as_t(np.concatenate(recv), torch.long),
        senders=as_t(np.concatenate(send), torch.long),
        edge_batch=as_t(np.concatenate(ebatch), torch.long),
        images=images,
        images_float=images.to(GEOMETRY_DTYPE),
    )


class LocalEngine:
    """Evaluate a model on a batch of structures in one process.

    The batch is one disjoint graph: one model call for all structures.
    skin (Å): Verlet skin of the reused neighbour list (see module docstring);
    0 builds a fresh list at every call.
    """

    def __init__(self, model: Model, *, device: str = "cpu", dtype: torch.dtype = torch.float64,
                 skin: float = DEFAULT_SKIN):
        if skin < 0:
            raise ValueError(f"skin must be >= 0 Å, got {skin}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = for_inference(model, self.device, dtype)
        self.skin = float(skin)
        self.policy = RebuildPolicy(skin=self.skin)
        self._topology: _Topology | None = None
        self.calls = 0  # engine calls, for the server's batching counters

    @property
    def spec(self):
        return self.model.spec

    @property
    def world_size(self) -> int:
        return 1

    @property
    def rebuilds(self) -> int:
        """Neighbour-list builds so far (calls minus reuses)."""
        return self.policy.rebuilds

    def close(self) -> None:
        """Nothing to release at one rank; the distributed engine stops its ranks here."""

    def compute(self, structures: Sequence[Structure], *, virial: bool = True) -> list[Result]:
        if not structures:
            return []
        try:
            topo = self._topology_for(structures)
            return self._compute(structures, topo, virial=virial)
        except (RuntimeError, ValueError, IndexError) as e:
            raise CalculationFailed(f"model evaluation failed: {e}") from e

    def _topology_for(self, structures: Sequence[Structure]) -> _Topology:
        if self._topology is None:
            self.policy.invalidate()  # the policy's reference must be the cached list's
        if not self.policy.decide(structures):
            return self._topology
        # decide() has recorded this batch as the reference: forget it unless the build succeeds
        self._topology = None
        built = False
        try:
            check_species(self.model, structures)  # numbers are unchanged while reused
            radius = self.model.spec.cutoff + self.skin
            self._topology = _build_topology(structures, radius, device=self.device)
            built = True
        finally:
            if not built:
                self.policy.invalidate()
        return self._topology

    def _compute(self, structures: Sequence[Structure], topo: _Topology, *,
                 virial: bool) -> list[Result]:
        self.calls += 1
        dev, dt = self.device, GEOMETRY_DTYPE
        nb = len(structures)
        x = (structures[0].positions if nb == 1
             else np.concatenate([s.positions for s in structures]))
        positions = _leaf(x, dev).requires_grad_(True)
        cells = torch.as_tensor(np.stack([s.cell for s in structures]), dtype=dt, device=dev)
        # The virial -dE/d(eps) of x -> x (1 + eps), cell -> cell (1 + eps) at eps = 0 is
        # -(x^T dE/dx + cell^T dE/dcell) by the chain rule: differentiating wrt the cell
        # instead of a strain tensor saves two (N, 3) x (3, 3) products and their backward
        # (measured: ~40% of a 65k-atom call without neighbours).
        cells.requires_grad_(virial)
        recv, send, images, images_f, eb = (topo.receivers, topo.senders, topo.images,
                                            topo.images_float, topo.edge_batch)
        if self.skin > 0 and recv.numel():
            with torch.no_grad():  # drop pairs beyond the cutoff: equal to a fresh list
                vec = positions[send] - positions[recv] + _shifts(images_f, cells, eb)
                keep = torch.nonzero((vec * vec).sum(-1) < self.model.spec.cutoff ** 2).view(-1)
            if keep.numel() < recv.numel():
                recv, send, images, images_f, eb = (
                    recv[keep], send[keep], images[keep], images_f[keep], eb[keep])
        graph = LocalGraph(
            n_owned=int(topo.offsets[-1]),
            numbers=topo.numbers,
            positions=positions,
            batch=topo.batch,
            n_structures=nb,
            cells=cells,
            receivers=recv,
            senders=send,
            shifts=_shifts(images_f, cells, eb),
            images=images,
            global_ids=topo.global_ids,
            n_atoms=topo.n_atoms,
            dtype=self.dtype,
        )
        out = self.model(graph)
        energies = torch.zeros(nb, dtype=dt, device=dev)
        energies = energies.index_add(0, topo.batch, out.site_energy.to(dt))
        inputs = [positions, cells] if virial else [positions]
        if energies.requires_grad:
            grads = torch.autograd.grad(energies.sum(), inputs, allow_unused=True)
        else:  # no pair at all and a pair-only model: nothing depends on positions
            grads = [None] * len(inputs)
        g_pos = _zeros_if_none(grads[0], positions)
        vir = None
        if virial:
            with torch.no_grad():
                vir = -_virial(positions, g_pos, cells, _zeros_if_none(grads[1], cells),
                               topo.batch)
        forces = -g_pos
        if not _all_finite(energies) or not _all_finite(forces):
            raise CalculationFailed("model returned NaN or infinite energy or forces")
        return _split(structures, topo.offsets, energies, forces, vir, out.extras)


def _leaf(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """float64 positions without a copy on the CPU. Server frames are read-only views
    of message buffers: autograd never writes into a leaf, so torch's warning about
    non-writable arrays does not apply and is silenced for that call only."""
    if x.flags.writeable:
        return torch.as_tensor(x, dtype=GEOMETRY_DTYPE, device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(x, dtype=GEOMETRY_DTYPE, device=device)


def _shifts(images: torch.Tensor, cells: torch.Tensor, edge_batch: torch.Tensor
            ) -> torch.Tensor:
    """(E, 3) Å: images (E, 3) in lattice vectors times the cell of each edge's structure."""
    if cells.shape[0] == 1:
        return images @ cells[0]
    return torch.bmm(images.unsqueeze(1), cells[edge_batch]).squeeze(1)


def _virial(x: torch.Tensor, g_x: torch.Tensor, cells: torch.Tensor, g_cells: torch.Tensor,
            batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) eV: dE/d(eps) = x^T dE/dx + cell^T dE/dcell per structure (see _compute)."""
    w = cells.transpose(1, 2) @ g_cells
    if cells.shape[0] == 1:
        return w + (x.T @ g_x).unsqueeze(0)
    outer = (x.unsqueeze(2) * g_x.unsqueeze(1)).view(-1, 9)
    return w + torch.zeros(cells.shape[0], 9, dtype=x.dtype, device=x.device).index_add(
        0, batch, outer).view(-1, 3, 3)


def _all_finite(t: torch.Tensor) -> bool:
    """isfinite(t).all(), with one reduction in the common case: a finite sum means no
    NaN and no infinity (the element-wise check only runs when the sum is not finite)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _zeros_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _split(structures, offsets, energies, forces, virials, extras) -> list[Result]:
    e = energies.detach().cpu().double().numpy()
    f = forces.detach().cpu().double().numpy()
    v = None if virials is None else virials.detach().cpu().double().numpy()
    x = {k: t.detach().cpu().double().numpy() for k, t in extras.items()}
    results = []
    for b, s in enumerate(structures):
        lo, hi = offsets[b], offsets[b + 1]
        vir = None if v is None or not s.pbc.all() else v[b].copy()
        results.append(Result(
            energy=float(e[b]),
            # one structure: f is this call's own fresh array, no copy needed
            forces=f if len(structures) == 1 else f[lo:hi].copy(),
            virial=vir,
            extras={k: a[lo:hi].tolist() for k, a in x.items()},
        ))
    return results
