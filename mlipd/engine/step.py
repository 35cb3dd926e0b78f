"""One step of physics on one rank, the only implementation for every number of ranks:
edges pruned within the skin, ``LocalGraph``, model, autograd forces and virial, halo
gradients home, and the rank's output (``mlipd.engine.results.RankOutput``).

At one rank (``comm is None``) there is no halo, no exchange and no collective: the
same code with an identity ``exchange`` and every atom owned.

The virial is taken from the cell gradient (``mlipd.engine.virial``), summed per
structure over a rank's local rows (owned and halo: each rank differentiates its own
partial energy) and then over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlipd.engine.compiled import CompiledPhysics
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
from mlipd.engine.virial import cell_virial, edge_shifts
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
    compile: run the model, forces and virial as one ``torch.compile``d function
           (``mlipd.engine.compiled``; one rank only, else ignored)
    """

    def __init__(self, model: Model, comm, *, device: torch.device, dtype: torch.dtype,
                 skin: float, pad: bool = False, masks: bool | None = None,
                 compile: bool = False) -> None:
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
        self.last_graph: LocalGraph | None = None  # for tests and counters (eager steps)
        self.compiled = (CompiledPhysics(model, geometry_dtype=GEOMETRY_DTYPE)
                         if compile and comm is None else None)

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
        compiled = self.compiled
        if compiled is None or compiled.failed is not None:
            return self._run_eager(topo, x, cells, virial=virial)
        try:
            return self._run_compiled(topo, x, cells, virial=virial)
        except Exception as e:  # noqa: BLE001 - the eager step tells what it was
            out = self._run_eager(topo, x, cells, virial=virial)  # the input's error, if any
            compiled.give_up(e)
            return out

    def _run_eager(self, topo: Topology, x: torch.Tensor, cells: torch.Tensor, *,
                   virial: bool) -> RankOutput:
        x = x.detach().requires_grad_(True)
        cells = cells.detach().requires_grad_(virial)
        # the shifts autograd sees are those of the edges the model gets: computed once,
        # after the selection (the candidates' own are plain numbers)
        shifts = (edge_shifts(topo.images_f, cells, topo.edge_batch)
                  if self.masks or not self._prunes(topo) else None)
        e = self._edges(topo, x, cells, shifts)
        if e.shifts is None:
            e.shifts = edge_shifts(e.images_f, cells, e.edge_batch)
        comm, n = self.comm, topo.n_owned
        graph = LocalGraph(
            n_owned=n, numbers=topo.numbers, positions=x, batch=topo.batch,
            n_structures=topo.n_structures, cells=cells, receivers=e.receivers,
            senders=e.senders, shifts=e.shifts, images=e.images, global_ids=topo.global_ids,
            n_atoms=topo.n_atoms, dtype=self.dtype, candidates=e.candidates,
            edge_ids=e.edge_ids, edge_mask=e.edge_mask, cache=topo.cache,
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
                vir = -cell_virial(x, g_x, cells, g_cell, topo.batch)
        return self._output(topo, e, energies, forces, vir, site.detach(), out.extras)

    def _run_compiled(self, topo: Topology, x: torch.Tensor, cells: torch.Tensor, *,
                      virial: bool) -> RankOutput:
        """The same step through ``mlipd.engine.compiled`` (one rank only)."""
        x, cells = x.detach(), cells.detach()
        e = self._edges(topo, x, cells, None, always_ids=True)
        n = topo.n_owned
        self.last_graph = None  # the model's graph is built inside the compiled function
        energies, forces, vir, site, extras = self.compiled(
            virial=virial, n=n, n_structures=topo.n_structures, x=x, cells=cells,
            numbers=topo.numbers, batch=topo.batch, receivers=e.receivers,
            senders=e.senders, images=e.images, images_f=e.images_f,
            edge_batch=e.edge_batch, global_ids=topo.global_ids, n_atoms=topo.n_atoms,
            dtype=self.dtype, candidates=e.candidates, edge_ids=e.edge_ids,
            edge_mask=e.edge_mask, real=topo.real, cache=topo.cache)
        return self._output(topo, e, energies, forces, vir, site, extras)

    def _prunes(self, topo: Topology) -> bool:
        """Whether this step selects its edges from the candidates (pairs within cutoff +
        skin at the rebuild, or padding edges)."""
        return ((self.skin > 0 or topo.pad_positions is not None)
                and topo.receivers.numel() > 0)

    def _edges(self, topo: Topology, x: torch.Tensor, cells: torch.Tensor,
               shifts: torch.Tensor | None, *, always_ids: bool = False) -> Edges:
        """The edges the model gets this step: the candidates within the cutoff, as a mask
        (``masks``) or selected; ``shifts``, when given, are the candidates' (E, 3).
        ``always_ids``: a selection that keeps every candidate still comes as
        ``edge_ids`` (a compiled step then has one variant, not one per case)."""
        e = Edges(topo.receivers, topo.senders, topo.images, topo.images_f, topo.edge_batch,
                  shifts=shifts)
        if not self._prunes(topo):
            return e
        with torch.no_grad():  # pairs beyond the cutoff count for nothing: = a fresh list
            cand_shifts = edge_shifts(e.images_f, cells, e.edge_batch) if shifts is None \
                else shifts
            vec = x.index_select(0, e.senders) - x.index_select(0, e.receivers) + cand_shifts
            within = (vec * vec).sum(-1) < self.cutoff ** 2
        e.candidates = CandidateEdges(receivers=e.receivers, senders=e.senders,
                                      images=e.images, shifts=cand_shifts.detach(),
                                      skin=self.skin)
        if self.masks:  # fixed shapes: no host read
            e.edge_mask = within
            return e
        # the model takes the edges within the cutoff only: select (a host read)
        keep = torch.nonzero(within).view(-1)
        if keep.numel() < e.receivers.numel():
            e.edge_ids = keep
            e.receivers, e.senders, e.images, e.images_f, e.edge_batch = (
                e.receivers[keep], e.senders[keep], e.images[keep], e.images_f[keep],
                e.edge_batch[keep])
        elif always_ids:  # every candidate kept, said as ids all the same
            e.edge_ids = keep
        e.shifts = None  # the selected edges': computed where autograd sees them
        return e

    def _output(self, topo: Topology, e: Edges, energies: torch.Tensor,
                forces: torch.Tensor, vir: torch.Tensor | None, site: torch.Tensor,
                extras: dict[str, torch.Tensor]) -> RankOutput:
        n, dt = topo.n_owned, GEOMETRY_DTYPE
        self.layout = tuple(ExtraLayout(k, tuple(t.shape[1:])) for k, t in extras.items())
        # the width from the trailing shape: a rank owning no atoms has (0, ...) rows
        rows = tuple(t.detach().reshape(n, x.width).to(dt)
                     for t, x in zip(extras.values(), self.layout, strict=True))
        n_edges = e.receivers.shape[0] if e.edge_mask is None else e.edge_mask.sum()
        stats = (n if topo.real is None else topo.n_real_t, n_edges, topo.n_local - n)
        return RankOutput(energies=energies, virials=vir, forces=forces,
                          site_energies=site, extras=rows, stats=stats)


@dataclass
class Edges:
    """One step's edges (``Step._edges``): per edge receiver, sender, image (int and
    float), structure; shifts (E, 3) Å or None (computed with gradients later); the
    candidates, the selection and the mask handed to the model."""

    receivers: torch.Tensor
    senders: torch.Tensor
    images: torch.Tensor
    images_f: torch.Tensor
    edge_batch: torch.Tensor
    shifts: torch.Tensor | None = None
    candidates: CandidateEdges | None = None
    edge_ids: torch.Tensor | None = None
    edge_mask: torch.Tensor | None = None
