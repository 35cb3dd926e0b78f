"""Neighbour lists through vesin.

vesin handles small periodic cells whose cutoff exceeds half a cell width (several
images of the same atom, self-images included) and mixed periodicity, which is why we
use it rather than code of our own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from vesin import NeighborList

from mlipd.types import Structure


@dataclass(frozen=True, slots=True)
class Edges:
    """A full (directed) neighbour list.

    centers:   (E,) int64, the receiving atom i (the owner of the edge)
    neighbors: (E,) int64, the sending atom j
    shifts:    (E, 3) int, lattice image of j: r_ij = x_j - x_i + shifts @ cell
    """

    centers: np.ndarray
    neighbors: np.ndarray
    shifts: np.ndarray

    def __len__(self) -> int:
        return int(self.centers.shape[0])


def neighbor_list(structure: Structure, cutoff: float) -> Edges:
    """All pairs with |r_ij| < cutoff in both directions; periodic self-images are kept,
    i == j at zero shift is not a pair."""
    nl = NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, s = nl.compute(
        structure.positions, structure.cell, [bool(p) for p in structure.pbc], quantities="ijS"
    )
    return Edges(
        centers=i.astype(np.int64, copy=False),
        neighbors=j.astype(np.int64, copy=False),
        shifts=s.astype(np.int64, copy=False),
    )
