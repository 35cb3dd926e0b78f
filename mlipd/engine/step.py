"""One step of physics on one rank, the only implementation for every number of ranks:
edges pruned within the skin, ``LocalGraph``, model, autograd forces and virial, halo
gradients home, and the rank's output (``mlipd.engine.results.RankOutput``).

At one rank (``comm is None``) there is no halo, no exchange and no collective: the
same code with an identity ``exchange`` and every atom owned.

The virial is taken from the cell gradient, not from a strain tensor: for
x -> x (1 + eps), cell -> cell (1 + eps), -dE/d(eps) at eps = 0 is
-(sum_i x_i^T dE/dx_i + cell^T dE/dcell), summed per structure over a rank's local
rows (owned and halo: each rank differentiates its own partial energy) and then over
ranks. It saves two (N, 3) x (3, 3) products and their backward, a large share of a
call when there are few neighbours per atom.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlipd.engine.halo import scatter_home_rows
from mlipd.engine.padding import pad_topology
from mlipd.engine.results import ExtraLayout, RankOutput, unpad
from mlipd.engine.topology import (
    GEOMETRY_DTYPE,
    HostToDevice,
    Topology,
    build_topology,
    upload,
)
from mlipd.model_api import CandidateEdges, LocalGraph, Model


@dataclass(frozen=True)
class Frame:
    """What a rebuild needs, the same on every rank.

    numbers: (N,) int64; positions: (N, 3) float64 Å; cells: (B, 3, 3) float64 Å;
    pbc: (B, 3) bool; offsets: (B + 1,) int64 first atom of each structure;
    owner: (N,) int64 owner rank of every atom
    """

    numbers: np.ndarray
    positions: np.ndarray
    cells: np.ndarray
    pbc: np.ndarray
    offsets: np.ndarray
    owner: np.ndarray


class Step:
    """One rank's step and what it keeps between steps (the device topology).

    comm:  ``mlipd.engine.comm.Comm`` of the ranks, or None at one rank
    skin:  Å; candidate edges are pairs within cutoff + skin at the rebuild
    pad:   pad atom and edge counts to buckets (``mlipd.engine.padding``; one rank and a
           ``masked_edges`` model only, else ignored): shapes then change only when a
           rebuild crosses a bucket edge (for captured CUDA graphs)
    masks: give a ``masked_edges`` model every candidate edge with ``edge_mask`` (fixed
           shapes, no host read) rather than the edges within the cutoff (one
           ``nonzero``). Default: on CUDA, where a host read drains the device's queue,
           with ``pad``, and for a model that takes no selection (``needs_masked_edges``:
           CHGNet); on a CPU a read costs nothing while masked candidates cost arithmetic
    """

    def __init__(self, model: Model, comm, *, device: torch.device, dtype: torch.dtype,
                 skin: float, pad: bool = False, masks: bool | None = None) -> None:
        self.model = model
        self.comm = comm
        self.device = torch.device(device)
        self.dtype = dtype
        self.skin = float(skin)
        self.pad = bool(pad) and comm is None and bool(model.spec.masked_edges)
        if masks is None:
            masks = self.device.type == "cuda" or bool(getattr(model, "needs_masked_edges",
                                                                False))
        self.masks = bool(model.spec.masked_edges) and (self.pad or bool(masks))
        self.cutoff = float(model.spec.cutoff)
        self.radius = self.cutoff + self.skin
        self.h2d = HostToDevice(self.device)
        self.topology: Topology | None = None
        self.layout: tuple[ExtraLayout, ...] = ()  # of the last step's extras
        self.last_graph: LocalGraph | None = None  # for tests and counters

    @property
    def rank(self) -> int:
        return 0 if self.comm is None else self.comm.rank

    @property
    def world_size(self) -> int:
        return 1 if self.comm is None else self.comm.world_size

    def rebuild(self, frame: Frame) -> None:
        """New topology and halo plan (collective at P > 1: the plan is agreed with peers)."""
        self.topology = None  # a failed build leaves none behind
        topo = build_topology(positions=frame.positions, cells=frame.cells, pbc=frame.pbc,
                              offsets=frame.offsets, owner=frame.owner, rank=self.rank,
                              radius=self.radius)
        plan = padding = None
        if self.pad:
            topo, padding = pad_topology(topo, frame.numbers, radius=self.radius)
        if self.comm is not None:
            ids = torch.as_tensor(topo.local_ids)
            plan = self.comm.plan_from_keys(ids[: topo.n_owned], ids[topo.n_owned:],
                                            torch.as_tensor(topo.local_owner[topo.n_owned:]))
        self.topology = upload(topo, numbers=frame.numbers, offsets=frame.offsets,
                               one_rank=self.comm is None, h2d=self.h2d, plan=plan,
                               padding=padding)

    def run(self, positions: torch.Tensor, cells: torch.Tensor, *, virial: bool) -> RankOutput:
        """This rank's output for the batch's positions (N, 3) and cells (B, 3, 3),
        float64 on this rank's device."""
        return self.unpad(self.run_padded(positions, cells, virial=virial))

    def unpad(self, out: RankOutput) -> RankOutput:
        """A ``run_padded`` output without the padding atoms' rows (the last ones)."""
        topo = self.topology
        return out if topo.n_real == topo.n_owned else unpad(out, topo.n_real)

    def run_padded(self, positions: torch.Tensor, cells: torch.Tensor, *, virial: bool
                   ) -> RankOutput:
        """``run`` with the padding atoms' rows kept (zeros): every shape is fixed by the
        padded topology, not by the batch's own counts. positions: (N, 3), or (n_owned,
        3) with the padding atoms' rows (``Topology.pad_positions``) already in."""
        topo = self.topology
        if topo is None:
            raise RuntimeError("Step.run before rebuild")
        x = positions if topo.local_ids is None else positions[topo.local_ids]
        if topo.pad_positions is not None and x.shape[0] != topo.n_owned:
            x = torch.cat([x, topo.pad_positions])
        x = x.detach().requires_grad_(True)
        cells = cells.detach().requires_grad_(virial)
        recv, send, images, images_f, eb = (topo.receivers, topo.senders, topo.images,
                                            topo.images_f, topo.edge_batch)
        edge_ids = candidates = edge_mask = None
        prune = (self.skin > 0 or topo.pad_positions is not None) and recv.numel() > 0
        # the shifts autograd sees are those of the edges the model gets: computed once,
        # after the selection (the candidates' own are plain numbers)
        shifts = _shifts(images_f, cells, eb) if self.masks or not prune else None
        if prune:
            with torch.no_grad():  # pairs beyond the cutoff count for nothing: = a fresh list
                cand_shifts = _shifts(images_f, cells, eb) if shifts is None else shifts
                vec = x.index_select(0, send) - x.index_select(0, recv) + cand_shifts
                within = (vec * vec).sum(-1) < self.cutoff ** 2
            candidates = CandidateEdges(receivers=recv, senders=send, images=images,
                                        shifts=cand_shifts.detach(), skin=self.skin)
            if self.masks:  # fixed shapes: no host read
                edge_mask = within
            else:  # the model takes the edges within the cutoff only: select (a host read)
                keep = torch.nonzero(within).view(-1)
                if keep.numel() < recv.numel():
                    edge_ids = keep
                    recv, send, images, images_f, eb = (
                        recv[keep], send[keep], images[keep], images_f[keep], eb[keep])
                shifts = _shifts(images_f, cells, eb)
        comm, n = self.comm, topo.n_owned
        graph = LocalGraph(
            n_owned=n, numbers=topo.numbers, positions=x, batch=topo.batch,
            n_structures=topo.n_structures, cells=cells, receivers=recv, senders=send,
            shifts=shifts, images=images, global_ids=topo.global_ids,
            n_atoms=topo.n_atoms, dtype=self.dtype, candidates=candidates, edge_ids=edge_ids,
            edge_mask=edge_mask, cache=topo.cache,
            **({} if comm is None else dict(
                exchange=comm.atom_exchange(topo.plan), comm=comm, rank=comm.rank,
                world_size=comm.world_size, owner=topo.owner)))
        self.last_graph = graph
        out = self.model(graph)
        dt = GEOMETRY_DTYPE
        site = out.site_energy.to(dt)
        if topo.real is not None:  # padding atoms count for nothing (exact zeros)
            site = site * topo.real
        inputs = [x, cells] if virial else [x]
        if site.requires_grad:  # d(sum of sites) = d(sum of structures' energies), exactly
            grads = torch.autograd.grad(site.sum(), inputs, allow_unused=True)
        else:  # no pair at all and a pair-only model: nothing depends on positions
            grads = [None] * len(inputs)
        with torch.no_grad():
            # index_add for one structure too: a bead computed alone and in a batch
            # give the same bits (tests/test_driver_ipi.py compares trajectories exactly)
            energies = torch.zeros(topo.n_structures, dtype=dt, device=self.device
                                   ).index_add(0, topo.batch[:n], site)
            g_x = torch.zeros_like(x) if grads[0] is None else grads[0]
            forces = -g_x[:n]
            if comm is not None:  # gradients on halo copies belong to their owners
                forces = forces - scatter_home_rows(topo.plan, g_x[n:])
            vir = None
            if virial:
                g_cell = torch.zeros_like(cells) if grads[1] is None else grads[1]
                vir = -_cell_virial(x, g_x, cells, g_cell, topo.batch)
        self.layout = tuple(ExtraLayout(k, tuple(t.shape[1:])) for k, t in out.extras.items())
        # the width from the trailing shape: a rank owning no atoms has (0, ...) rows
        extras = tuple(t.detach().reshape(n, x.width).to(dt)
                       for t, x in zip(out.extras.values(), self.layout, strict=True))
        n_edges = recv.shape[0] if edge_mask is None else edge_mask.sum()
        stats = (n if topo.real is None else topo.n_real_t, n_edges, topo.n_local - n)
        return RankOutput(energies=energies, virials=vir, forces=forces,
                          site_energies=site.detach(), extras=extras, stats=stats)


def _shifts(images: torch.Tensor, cells: torch.Tensor, edge_batch: torch.Tensor
            ) -> torch.Tensor:
    """(E, 3) Å: images (E, 3) in lattice vectors times the cell of each edge's structure."""
    if cells.shape[0] == 1:
        return images @ cells[0]
    return torch.bmm(images.unsqueeze(1), cells[edge_batch]).squeeze(1)


def _cell_virial(x: torch.Tensor, g_x: torch.Tensor, cells: torch.Tensor,
                 g_cells: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) eV: dE/d(eps) = x^T dE/dx + cell^T dE/dcell per structure (module doc)."""
    w = cells.transpose(1, 2) @ g_cells
    if cells.shape[0] == 1:
        return w + (x.T @ g_x).unsqueeze(0)
    outer = (x.unsqueeze(2) * g_x.unsqueeze(1)).view(-1, 9)
    return w + torch.zeros(cells.shape[0], 9, dtype=x.dtype, device=x.device).index_add(
        0, batch, outer).view(-1, 3, 3)
