"""What every rank does in one step: graph, model, autograd, halo gradients home.

``RankStep.run`` is called on all ranks with the same ``Frame``; it returns this
rank's ``RankOutput`` (partial energies and virials, forces of owned atoms). The
front end (``mlipd.engine.distributed``) gathers and sums them on rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlipd.engine.comm import Comm
from mlipd.engine.graph import LocalGraph
from mlipd.engine.halo import HaloPlan, scatter_home_rows
from mlipd.engine.local import GEOMETRY_DTYPE, strained
from mlipd.engine.local_graph_builder import Topology, build_topology


@dataclass(frozen=True)
class Frame:
    """A batch as every rank sees it.

    numbers: (N,) int64; positions: (N, 3) float64 Å; cells: (B, 3, 3) float64 Å;
    pbc: (B, 3) bool; offsets: (B + 1,) int64 first atom of each structure;
    owner: (N,) int64 owner rank of every atom (fixed between rebuilds)
    """

    numbers: np.ndarray
    positions: np.ndarray
    cells: np.ndarray
    pbc: np.ndarray
    offsets: np.ndarray
    owner: np.ndarray

    @property
    def n_structures(self) -> int:
        return int(self.offsets.shape[0] - 1)


@dataclass
class RankOutput:
    """One rank's share: energies (B,) eV, virials (B, 3, 3) eV (zeros if not asked),
    rows (n_owned, 3 + extra columns): forces eV/Å then flattened per-atom extras,
    owned_ids (n_owned,) batch-global ids, stats: owned atoms, edges (r < cutoff), halo atoms."""

    energies: torch.Tensor
    virials: torch.Tensor
    rows: torch.Tensor
    owned_ids: np.ndarray
    stats: tuple[int, int, int]
    extra_widths: tuple[int, ...] = ()


class RankStep:
    """Per-rank state kept between steps: topology and halo plan (until a rebuild)."""

    def __init__(self, model, comm: Comm, *, device: torch.device, dtype: torch.dtype,
                 skin: float) -> None:
        self.model = model
        self.comm = comm
        self.device = device
        self.dtype = dtype
        self.radius = float(model.spec.cutoff) + float(skin)
        self.topology: Topology | None = None
        self.plan: HaloPlan | None = None
        self.last_graph: LocalGraph | None = None  # for tests and counters

    def rebuild(self, frame: Frame) -> None:
        """New topology and halo plan (collective: the plan is agreed with the peers)."""
        topo = build_topology(positions=frame.positions, cells=frame.cells, pbc=frame.pbc,
                              offsets=frame.offsets, owner=frame.owner,
                              rank=self.comm.rank, radius=self.radius)
        ids = torch.as_tensor(topo.local_ids, device=self.device)
        self.plan = self.comm.plan_from_keys(
            ids[: topo.n_owned], ids[topo.n_owned:],
            torch.as_tensor(topo.local_owner[topo.n_owned:], device=self.device))
        self.topology = topo

    def run(self, frame: Frame, *, virial: bool) -> RankOutput:
        topo, plan, dev, dt = self.topology, self.plan, self.device, GEOMETRY_DTYPE
        if topo is None or plan is None:
            raise RuntimeError("RankStep.run before rebuild")
        n_owned, nb = topo.n_owned, frame.n_structures
        as_t = lambda a, t: torch.as_tensor(a, dtype=t, device=dev)  # noqa: E731
        positions = as_t(frame.positions[topo.local_ids], dt).requires_grad_(True)
        batch = as_t(topo.batch, torch.long)
        cells0 = as_t(frame.cells, dt)
        strain = torch.zeros(nb, 3, 3, dtype=dt, device=dev, requires_grad=virial)
        pos, cells = strained(positions, cells0, batch, strain)
        recv, send = as_t(topo.receivers, torch.long), as_t(topo.senders, torch.long)
        images, eb = as_t(topo.images, dt), as_t(topo.edge_batch, torch.long)
        with torch.no_grad():  # drop edges beyond the cutoff: equal to a fresh list
            vec = pos[send] - pos[recv] + torch.bmm(images.unsqueeze(1), cells[eb]).squeeze(1)
            keep = torch.nonzero((vec * vec).sum(-1) < self.model.spec.cutoff ** 2).view(-1)
        recv, send, images, eb = recv[keep], send[keep], images[keep], eb[keep]
        shifts = torch.bmm(images.unsqueeze(1), cells[eb]).squeeze(1)
        graph = LocalGraph(
            n_owned=n_owned,
            numbers=as_t(frame.numbers[topo.local_ids], torch.long),
            positions=pos, batch=batch, n_structures=nb, cells=cells,
            receivers=recv, senders=send, shifts=shifts, images=images.long(),
            global_ids=as_t(topo.local_ids, torch.long),
            n_atoms=as_t(np.diff(frame.offsets), torch.long),
            exchange=self.comm.atom_exchange(plan), comm=self.comm,
            rank=self.comm.rank, world_size=self.comm.world_size,
            owner=as_t(topo.local_owner, torch.long), dtype=self.dtype,
        )
        self.last_graph = graph
        out = self.model(graph)
        energies = torch.zeros(nb, dtype=dt, device=dev)
        energies = energies.index_add(0, batch[:n_owned], out.site_energy.to(dt))
        inputs = [positions, strain] if virial else [positions]
        if energies.requires_grad:
            grads = torch.autograd.grad(energies.sum(), inputs, allow_unused=True)
        else:
            grads = [None] * len(inputs)
        g_pos = torch.zeros_like(positions) if grads[0] is None else grads[0]
        with torch.no_grad():  # gradients on halo copies belong to their owners
            forces = -(g_pos[:n_owned] + scatter_home_rows(plan, g_pos[n_owned:]))
        vir = torch.zeros(nb, 3, 3, dtype=dt, device=dev)
        if virial and grads[1] is not None:
            vir = -grads[1]
        extras = [_columns(out.extras[k].detach()).to(dt) for k in self.model.spec.per_atom_extras]
        rows = torch.cat([forces, *extras], dim=1) if extras else forces
        return RankOutput(energies=energies.detach(), virials=vir.detach(), rows=rows,
                          owned_ids=topo.local_ids[:n_owned],
                          stats=(n_owned, int(keep.numel()), topo.n_local - n_owned),
                          extra_widths=tuple(int(x.shape[1]) for x in extras))


def _columns(x: torch.Tensor) -> torch.Tensor:
    """Per-atom values (n, ...) as (n, columns)."""
    return x.unsqueeze(-1) if x.dim() == 1 else x.flatten(1)
