"""The single-process engine: one rank owns every atom (P = 1 of the distributed loop)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mlipd.engine.graph import LocalGraph
from mlipd.engine.neighbors import neighbor_list
from mlipd.errors import CalculationFailed, UnknownSpecies
from mlipd.models.base import Model
from mlipd.types import Result, Structure


def check_species(model: Model, structures: Sequence[Structure]) -> None:
    known = model.spec.species
    if known is None:
        return
    for s in structures:
        unknown = set(np.unique(s.numbers).tolist()) - known
        if unknown:
            raise UnknownSpecies(
                f"model {model.spec.name!r} does not know atomic numbers {sorted(unknown)}"
            )


def strained(positions: torch.Tensor, cells: torch.Tensor, batch: torch.Tensor,
             strain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a per-structure strain: x -> x (1 + eps), cell -> cell (1 + eps).

    The virial is then -dE/d(eps) at eps = 0 (eV), for every model alike.
    """
    deform = torch.eye(3, dtype=strain.dtype, device=strain.device) + strain
    pos = torch.bmm(positions.unsqueeze(1), deform[batch]).squeeze(1)
    return pos, torch.bmm(cells, deform)


class LocalEngine:
    """Evaluate a model on a batch of structures in one process.

    The batch is one disjoint graph: one model call for all structures.
    """

    def __init__(self, model: Model, *, device: str = "cpu", dtype: torch.dtype = torch.float64):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.calls = 0  # engine calls, for the server's batching counters

    @property
    def spec(self):
        return self.model.spec

    @property
    def world_size(self) -> int:
        return 1

    def close(self) -> None:
        """Nothing to release at one rank; the distributed engine stops its ranks here."""

    def compute(self, structures: Sequence[Structure], *, virial: bool = True) -> list[Result]:
        if not structures:
            return []
        check_species(self.model, structures)
        try:
            return self._compute(structures, virial=virial)
        except (RuntimeError, ValueError, IndexError) as e:
            raise CalculationFailed(f"model evaluation failed: {e}") from e

    def _compute(self, structures: Sequence[Structure], *, virial: bool) -> list[Result]:
        self.calls += 1
        dev, dt = self.device, self.dtype
        counts = [s.n_atoms for s in structures]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        recv, send, img, ebatch = [], [], [], []
        for b, s in enumerate(structures):
            e = neighbor_list(s, self.model.spec.cutoff)
            recv.append(e.centers + offsets[b])
            send.append(e.neighbors + offsets[b])
            img.append(e.shifts)
            ebatch.append(np.full(len(e), b))
        tensor = lambda a, t: torch.as_tensor(np.concatenate(a), dtype=t, device=dev)  # noqa: E731
        batch = torch.as_tensor(np.repeat(np.arange(len(structures)), counts), device=dev)
        positions = tensor([s.positions for s in structures], dt).requires_grad_(True)
        cells0 = torch.as_tensor(np.stack([s.cell for s in structures]), dtype=dt, device=dev)
        strain = torch.zeros(len(structures), 3, 3, dtype=dt, device=dev, requires_grad=virial)
        pos, cells = strained(positions, cells0, batch, strain)
        images = tensor(img, dt)
        edge_batch = tensor(ebatch, torch.long)
        shifts = torch.bmm(images.unsqueeze(1), cells[edge_batch]).squeeze(1)
        n_total = int(offsets[-1])
        graph = LocalGraph(
            n_owned=n_total,
            numbers=tensor([s.numbers for s in structures], torch.long),
            positions=pos,
            batch=batch,
            n_structures=len(structures),
            cells=cells,
            receivers=tensor(recv, torch.long),
            senders=tensor(send, torch.long),
            shifts=shifts,
            images=tensor(img, torch.long),
            global_ids=torch.arange(n_total, device=dev),
            n_atoms=torch.as_tensor(counts, device=dev),
        )
        out = self.model(graph)
        energies = torch.zeros(len(structures), dtype=out.site_energy.dtype, device=dev)
        energies = energies.index_add(0, batch, out.site_energy)
        inputs = [positions, strain] if virial else [positions]
        grads = torch.autograd.grad(energies.sum(), inputs, allow_unused=True)
        forces = -_zeros_if_none(grads[0], positions)
        vir = -_zeros_if_none(grads[1], strain) if virial else None
        if not torch.isfinite(energies).all() or not torch.isfinite(forces).all():
            raise CalculationFailed("model returned NaN or infinite energy or forces")
        return _split(structures, offsets, energies, forces, vir, out.extras)


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
        vir = None if v is None or not s.pbc.all() else v[b]
        results.append(Result(
            energy=float(e[b]),
            forces=f[lo:hi].copy(),
            virial=vir,
            extras={k: a[lo:hi].tolist() for k, a in x.items()},
        ))
    return results
