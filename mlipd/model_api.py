"""The plug-in contract: what a model sees, declares and returns. Models import this
module and nothing of the engine.

A model is a ``torch.nn.Module`` that computes per-atom energies on a *local graph*
(``LocalGraph``): the atoms one rank owns, followed by the halo atoms whose features
it needs, and the edges whose receiver it owns. Between message-passing layers the
model calls ``graph.exchange(features)`` to refresh the halo rows from their owners.
At one rank there is no halo and ``exchange`` is the identity, so the single-device
path is just P = 1 of the same loop.

The engine, not the model, turns energies into forces and virial (autograd with
respect to positions and cell), sums across ranks, and converts nothing: the model
sees Å and eV only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class ModelSpec:
    """What the engine must know to build a model's graph.

    name:        short name, e.g. ``"chgnet"``
    cutoff:      Å, the radius of the message-passing (atom) graph
    species:     atomic numbers the model knows; None means any
    n_layers:    message-passing layers (informational: halo exchanges are model calls)
    per_atom_extras: names of the per-atom outputs besides energy the model returns
                 (e.g. ``("magmoms",)``); informational, the engine forwards whatever
                 ``ModelOutput.extras`` holds
    masked_edges: the model honours ``LocalGraph.edge_mask``: between rebuilds the engine
                 then passes every candidate edge (fixed shapes, no host read to select
                 them) with a mask of those within the cutoff; otherwise it selects them
    """

    name: str
    cutoff: float
    species: frozenset[int] | None = None
    n_layers: int = 1
    per_atom_extras: tuple[str, ...] = ()
    masked_edges: bool = False


@dataclass
class ModelOutput:
    """Per owned atom: ``site_energy`` (n_owned,) eV and ``extras`` {name: (n_owned, ...)}
    of any trailing shape; each reaches the caller as ``Result.extras[name]``, a nested
    list of shape (n_atoms, ...) per structure, at every number of ranks."""

    site_energy: torch.Tensor
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Communicator(Protocol):
    """What crosses ranks besides ``LocalGraph.exchange`` (``LocalGraph.comm``; None at
    one rank). Every call is collective: all ranks make it, in the same order.

    plan_from_keys(owned_keys (m, k) int64, wanted_keys (n, k) int64, wanted_owner (n,))
        -> a plan: which owned rows each peer wants (keys: anything the ranks agree on,
        e.g. (global atom id,) or (gid_i, gid_j, image a, b, c) for a bond)
    exchange(plan, owned_rows (m, ...)) -> (n, ...) copies from the owners; differentiable
    scatter_home(plan, wanted_rows (n, ...)) -> (m, ...) summed at the owners (the adjoint)
    all_reduce_sum(tensor) -> tensor summed over ranks; differentiable
    """

    rank: int
    world_size: int

    def plan_from_keys(self, owned_keys: torch.Tensor, wanted_keys: torch.Tensor,
                       wanted_owner: torch.Tensor) -> Any: ...

    def exchange(self, plan: Any, owned_rows: torch.Tensor) -> torch.Tensor: ...

    def scatter_home(self, plan: Any, wanted_rows: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class CandidateEdges:
    """The topology's candidate edges: pairs within cutoff + skin at the last rebuild,
    fixed until the next (the engine reuses them while no atom moved more than skin / 2).
    A step's edges are the candidates at ``LocalGraph.edge_ids``.

    receivers, senders: (E_c,) int64 local rows; images: (E_c, 3) int64
    shifts: (E_c, 3) float64 Å (not differentiable); skin: Å
    """

    receivers: torch.Tensor
    senders: torch.Tensor
    images: torch.Tensor
    shifts: torch.Tensor
    skin: float


def identity_exchange(features: torch.Tensor) -> torch.Tensor:
    return features


@dataclass
class LocalGraph:
    """Atoms and edges of one rank, for a batch of structures.

    Local atoms are ordered [owned | halo]. Each edge is owned by (and aggregates into)
    its receiver, which is always an owned atom; its sender may be a halo atom.

    Geometry is float64 whatever the model's precision (``dtype``): positions, cells and
    shifts stay float64 and ``edge_vectors`` rounds only the relative vectors to the
    model's dtype, so a float32 model loses no accuracy to large absolute coordinates,
    and every rank, and a float32 or float64 run, selects the same edges.

    n_owned:    number of owned atoms (the first rows)
    numbers:    (n_local,) int64 atomic numbers
    positions:  (n_local, 3) float64 Å, differentiable
    batch:      (n_local,) int64, structure index of each atom within the batch
    n_structures: number of structures in the batch
    cells:      (n_structures, 3, 3) float64 Å, rows are lattice vectors, differentiable
    receivers:  (E,) int64 local index (< n_owned)
    senders:    (E,) int64 local index
    shifts:     (E, 3) float64 Å, periodic image offset: r = x[sender] - x[receiver] + shift
    images:     (E, 3) int64, the same offset in lattice vectors (pairs i->j,S with j->i,-S)
    global_ids: (n_local,) int64, index of each local atom in the whole batch
    n_atoms:    (n_structures,) int64, atoms per structure (whole structure, all ranks)
    exchange:   [n_owned, ...] -> [n_local, ...]: owned rows kept, halo rows filled
                from their owners; differentiable (gradients go home in backward).
                Every rank must call it the same number of times per step.
    comm:       None at one rank; otherwise a ``Communicator``, for models that exchange
                more than atom features (e.g. CHGNet's bonds)
    owner:      (n_local,) int64 owner rank of each local atom; None at one rank
    dtype:      the model's floating dtype (its weights and features)
    candidates: the topology's ``CandidateEdges``, or None when the graph's edges are
                all there is (no skin)
    edge_ids:   (E,) int64 index of each edge among the candidates, None when every
                candidate is an edge
    edge_mask:  (E,) bool, only for models whose spec says ``masked_edges``: the edges
                are all the candidates and this marks those within the cutoff now (a
                masked edge must contribute exactly nothing: multiply its terms by the
                mask, never select with it); None when every edge counts
    cache:      a dict that lives as long as the topology (until the engine rebuilds the
                neighbour lists and partition): where a model keeps what it derives from
                the candidates once (CHGNet's bond and angle graph and bond plans) and
                selects from with ``edge_ids`` at every step
    """

    n_owned: int
    numbers: torch.Tensor
    positions: torch.Tensor
    batch: torch.Tensor
    n_structures: int
    cells: torch.Tensor
    receivers: torch.Tensor
    senders: torch.Tensor
    shifts: torch.Tensor
    images: torch.Tensor
    global_ids: torch.Tensor
    n_atoms: torch.Tensor
    exchange: Callable[[torch.Tensor], torch.Tensor] = identity_exchange
    comm: Communicator | None = None
    rank: int = 0
    world_size: int = 1
    owner: torch.Tensor | None = None
    dtype: torch.dtype = torch.float64
    candidates: CandidateEdges | None = None
    edge_ids: torch.Tensor | None = None
    edge_mask: torch.Tensor | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def n_local(self) -> int:
        return int(self.numbers.shape[0])

    def edge_vectors(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(E, 3) Å, from receiver to sender, computed in float64 and returned in
        ``dtype`` (default: the model's)."""
        vec = self.positions[self.senders] - self.positions[self.receivers] + self.shifts
        return vec.to(dtype or self.dtype)


@runtime_checkable
class Model(Protocol):
    spec: ModelSpec

    def forward(self, graph: LocalGraph) -> ModelOutput:  # pragma: no cover - protocol
        """Energies of the owned atoms of ``graph``; must be differentiable in
        ``graph.positions`` and ``graph.cells`` and call ``graph.exchange`` the same
        number of times on every rank."""
        ...


def species_index(atomic_numbers: list[int]) -> torch.Tensor:
    """(119,) int64 lookup: atomic number -> position in ``atomic_numbers``, -1 if absent."""
    index = torch.full((119,), -1, dtype=torch.long)
    index[atomic_numbers] = torch.arange(len(atomic_numbers))
    return index
