"""The model plug-in interface: what a model declares and the one function it implements.

A model is a ``torch.nn.Module`` that computes per-atom energies on a *local graph*
(``mlipd.engine.graph.LocalGraph``): the atoms one rank owns, followed by the halo
atoms whose features it needs, and the edges whose receiver it owns. Between
message-passing layers the model calls ``graph.exchange(features)`` to refresh the
halo rows from their owners. At one rank there is no halo and ``exchange`` is the
identity, so the single-device path is just P = 1 of the same loop.

The engine, not the model, turns energies into forces and virial (autograd with
respect to positions and a strain), sums across ranks, and converts nothing: the
model sees Å and eV only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from mlipd.engine.graph import LocalGraph


@dataclass(frozen=True)
class ModelSpec:
    """What the engine must know to build a model's graph.

    name:        short name, e.g. ``"chgnet"``
    cutoff:      Å, the radius of the message-passing (atom) graph
    species:     atomic numbers the model knows; None means any
    n_layers:    message-passing layers (informational: halo exchanges are model calls)
    per_atom_extras: names of per-atom outputs besides energy (e.g. ``("magmoms",)``)
    """

    name: str
    cutoff: float
    species: frozenset[int] | None = None
    n_layers: int = 1
    per_atom_extras: tuple[str, ...] = ()


def species_index(atomic_numbers: list[int]) -> torch.Tensor:
    """(119,) int64 lookup: atomic number -> position in ``atomic_numbers``, -1 if absent."""
    index = torch.full((119,), -1, dtype=torch.long)
    index[atomic_numbers] = torch.arange(len(atomic_numbers))
    return index


@dataclass
class ModelOutput:
    """Per owned atom: ``site_energy`` (n_owned,) eV and ``extras`` {name: (n_owned, ...)}."""

    site_energy: torch.Tensor
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Model(Protocol):
    spec: ModelSpec

    def forward(self, graph: LocalGraph) -> ModelOutput:  # pragma: no cover - protocol
        """Energies of the owned atoms of ``graph``; must be differentiable in
        ``graph.positions`` and ``graph.shifts`` and call ``graph.exchange`` the same
        number of times on every rank."""
        ...
