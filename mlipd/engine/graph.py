"""The local graph a model sees on one rank."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


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
    positions:  (n_local, 3) float64 Å, strained and differentiable
    batch:      (n_local,) int64, structure index of each atom within the batch
    n_structures: number of structures in the batch
    cells:      (n_structures, 3, 3) float64 Å, strained, rows are lattice vectors
    receivers:  (E,) int64 local index (< n_owned)
    senders:    (E,) int64 local index
    shifts:     (E, 3) float64 Å, periodic image offset: r = x[sender] - x[receiver] + shift
    images:     (E, 3) int64, the same offset in lattice vectors (pairs i->j,S with j->i,-S)
    global_ids: (n_local,) int64, index of each local atom in the whole batch
    n_atoms:    (n_structures,) int64, atoms per structure (whole structure, all ranks)
    exchange:   [n_owned, ...] -> [n_local, ...]: owned rows kept, halo rows filled
                from their owners; differentiable (gradients go home in backward).
                Every rank must call it the same number of times per step.
    comm:       None at one rank; otherwise the engine's communicator, for models that
                exchange more than atom features (see ``mlipd.engine.comm``)
    owner:      (n_local,) int64 owner rank of each local atom; None at one rank
                (every atom is owned by rank 0 there)
    dtype:      the model's floating dtype (its weights and features)
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
    comm: Any = None
    rank: int = 0
    world_size: int = 1
    owner: torch.Tensor | None = None
    dtype: torch.dtype = torch.float64

    @property
    def n_local(self) -> int:
        return int(self.numbers.shape[0])

    def edge_vectors(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(E, 3) Å, from receiver to sender, computed in float64 and returned in
        ``dtype`` (default: the model's)."""
        vec = self.positions[self.senders] - self.positions[self.receivers] + self.shifts
        return vec.to(dtype or self.dtype)
