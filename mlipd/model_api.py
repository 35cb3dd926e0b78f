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

A second, narrower contract (``WholeStructureModel``) takes whole structures: no
graph, no partition, one rank (ASE calculators).
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
        # index_select, not x[ids]: its backward is an index_add, where indexing's is an
        # index_put_ with accumulation (1.6x slower on 30k edges on a CPU)
        x = self.positions
        vec = x.index_select(0, self.senders) - x.index_select(0, self.receivers) + self.shifts
        return vec.to(dtype or self.dtype)


@dataclass(frozen=True)
class MemoryCost:
    """What one forward and backward pass of a model takes, per item, in bytes at the
    model's dtype (activations autograd keeps plus the largest transient): declared by
    the adapter from a measurement, used to refuse a request before it is allocated
    (``mlipd.engine.guards.MemoryBudget``).

    per_atom:     bytes per atom (owned or halo)
    per_edge:     bytes per directed edge within the cutoff
    per_angle:    bytes per angle (ordered pair of bonds at one centre) of a three-body
                  graph; 0 for models without one
    angle_cutoff: Å, the bond radius of that graph (CHGNet's ``bond_graph_cutoff``)
    recomputed:   the figures when the model recomputes activations in the backward
                  pass, for a model that switches to it by itself when memory is short
                  (``recompute=auto``); None otherwise
    """

    per_atom: float
    per_edge: float
    per_angle: float = 0.0
    angle_cutoff: float = 0.0
    recomputed: MemoryCost | None = None


# A model that declares nothing (a plug-in): a guess between the measured figures of the
# cheap models (LJ 0.4 kB per edge, the 3-layer reference model 3.3 kB, at float64) and
# well below the large ones (MACE, CHGNet: 10-100 kB). Every adapter of mlipd declares a
# measured figure (``memory_per_item``); a plug-in should too.
DEFAULT_MEMORY_COST = MemoryCost(per_atom=4096.0, per_edge=2048.0)


def memory_cost(model: object, dtype: torch.dtype) -> MemoryCost:
    """``model.memory_per_item(dtype)`` when the adapter declares it (an optional part of
    the contract), else ``DEFAULT_MEMORY_COST`` scaled to the dtype (float64 twice
    float32)."""
    declared = getattr(model, "memory_per_item", None)
    if callable(declared):
        return declared(dtype)
    scale = torch.finfo(dtype).bits / 64
    d = DEFAULT_MEMORY_COST
    return MemoryCost(per_atom=d.per_atom * scale, per_edge=d.per_edge * scale)


@runtime_checkable
class Model(Protocol):
    spec: ModelSpec

    def forward(self, graph: LocalGraph) -> ModelOutput:  # pragma: no cover - protocol
        """Energies of the owned atoms of ``graph``; must be differentiable in
        ``graph.positions`` and ``graph.cells`` and call ``graph.exchange`` the same
        number of times on every rank."""
        ...

    # Optional: ``memory_per_item(dtype) -> MemoryCost`` declares the bytes one forward
    # and backward take per atom, edge and angle (see ``memory_cost``; default
    # ``DEFAULT_MEMORY_COST``). Not part of the runtime-checkable protocol.


@runtime_checkable
class WholeStructureModel(Protocol):
    """The second kind of model: whole structures in, energy and forces out, with no
    local graph and no halo (an ASE calculator, ``mlipd.models.ase_generic``). It runs
    at one rank only, in ``mlipd.engine.whole.WholeEngine``.

    whole_structure: True, as a class attribute: the engine reads it from the entry
                     point's class, before constructing anything (``is_whole_structure``)
    spec:            its ModelSpec (``cutoff`` bounds the geometry guards)
    calculator:      the ``ase.calculators.calculator.Calculator`` evaluated per structure
    """

    whole_structure: bool
    spec: ModelSpec
    calculator: Any


def is_whole_structure(model_or_class: Any) -> bool:
    """Whether a model (or its class, or factory) declares ``whole_structure = True``."""
    return getattr(model_or_class, "whole_structure", False) is True


def species_index(atomic_numbers: list[int]) -> torch.Tensor:
    """(119,) int64 lookup: atomic number -> position in ``atomic_numbers``, -1 if absent."""
    index = torch.full((119,), -1, dtype=torch.long)
    index[atomic_numbers] = torch.arange(len(atomic_numbers))
    return index
