"""What each rank must hold besides its own atoms: mlipd's graph halo against a spatial
decomposition's ghost shell, counted in atoms on the same partition.

* halo: atoms a rank receives before each layer that reads neighbours: the senders of
  its owned edges (r < cutoff) that another rank owns, each atom once (its periodic
  images travel as edge shifts).
* ghosts: what a LAMMPS-style spatial decomposition holds for the same bricks (each
  rank's bounding box in reduced coordinates): every atom *image* within ``shell`` Å
  of the brick, owned atoms excepted. With ``shell`` = n_layers x cutoff (a model's
  receptive field) a rank recomputes the ghosts' messages and needs no exchange
  between layers; with ``shell`` = cutoff it exchanges ghost features at every layer
  (SevenNet's own LAMMPS-parallel model does so).
"""

from __future__ import annotations

import numpy as np

from mlipd.engine.bins import plane_spacing, reduced_coordinates
from mlipd.engine.neighbors import neighbor_list
from mlipd.types import Structure


def halo_atoms(s: Structure, owner: np.ndarray, *, cutoff: float, ranks: int) -> np.ndarray:
    """(ranks,) number of halo atoms of each rank (see module docstring)."""
    e = neighbor_list(s, cutoff)
    r = owner[e.centers]
    remote = owner[e.neighbors] != r
    pairs = np.unique(r[remote] * s.n_atoms + e.neighbors[remote])
    return np.bincount(pairs // s.n_atoms, minlength=ranks)


def ghost_atoms(s: Structure, owner: np.ndarray, *, shell: float, ranks: int) -> np.ndarray:
    """(ranks,) atom images within ``shell`` Å of each rank's brick, owned atoms excepted
    (periodic images counted once each, as a spatial decomposition stores them)."""
    u, _ = reduced_coordinates(s.positions, s.cell, s.pbc)
    width = shell / plane_spacing(s.cell, s.pbc)  # reduced units (Å on open axes)
    out = np.zeros(ranks, dtype=np.int64)
    for rank in range(ranks):
        mine = owner == rank
        if not mine.any():
            continue
        lo = u[mine].min(axis=0) - width
        hi = u[mine].max(axis=0) + width
        copies = np.ones(s.n_atoms, dtype=np.int64)
        for d in range(3):
            if s.pbc[d]:  # images u + k, k integer, inside [lo, hi]
                n = np.floor(hi[d] - u[:, d]) - np.ceil(lo[d] - u[:, d]) + 1
            else:
                n = ((u[:, d] >= lo[d]) & (u[:, d] <= hi[d])).astype(np.float64)
            copies *= np.maximum(n, 0).astype(np.int64)
        out[rank] = int(copies.sum()) - int(mine.sum())
    return out
