"""Reduced coordinates and a coarse bin grid: halo candidates and degree estimates in O(N).

A structure's *reduced coordinates* ``u`` use the lattice vectors along periodic
directions (``u`` is fractional there, wrapped to [0, 1)) and orthonormal vectors
perpendicular to them along open directions (``u`` is in Å there). The partitioner
cuts in this space, and the bin grid lives in it, so one code path handles bulk,
slabs, wires and molecules, including small triclinic cells.

A ``BinGrid`` has bins at least ``radius / m`` wide (in Cartesian distance) along every
direction, so every atom within ``radius`` of an atom lies within ``m`` bins of it
along each axis (periodic axes wrap). This gives, without any neighbour list:
- ``candidates(mask)``: a superset of the atoms within ``radius`` of the masked ones
  (all their images included: vesin then finds the exact pairs);
- ``degree_estimate()``: atoms in the (2m+1)^3 bins around each atom, a cheap proxy
  for its edge count, used as the partition weight.
"""

from __future__ import annotations

import numpy as np

MAX_BINS_PER_AXIS = 512
DEFAULT_SUBDIVISIONS = 2


def cell_basis(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """(3, 3) rows: the periodic lattice vectors, then an orthonormal completion for the
    open directions (orthogonal to the periodic vectors). Rows are in Å."""
    pbc = np.asarray(pbc, dtype=bool)
    periodic = np.asarray(cell, dtype=np.float64)[pbc]
    n_open = 3 - periodic.shape[0]
    if n_open == 0:
        return np.asarray(cell, dtype=np.float64).copy()
    if periodic.shape[0] == 0:
        completion = np.eye(3)
    else:
        # the last right-singular vectors span the orthogonal complement of the periodic rows
        _, _, vt = np.linalg.svd(periodic)
        completion = vt[periodic.shape[0]:]
    basis = np.empty((3, 3))
    basis[pbc] = periodic
    basis[~pbc] = completion[:n_open]
    return basis


def reduced_coordinates(positions: np.ndarray, cell: np.ndarray,
                        pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduced coordinates (N, 3) and the per-axis Å per unit of ``u`` at the narrowest.

    Returns ``u`` (fractional in [0, 1) on periodic axes, Å on open ones) and
    ``reach`` (3,): ``|du_k| <= reach_k * |dx|`` for any displacement dx (Å), i.e. the
    norm of column k of the inverse basis.
    """
    basis = cell_basis(cell, pbc)
    inverse = np.linalg.inv(basis)
    # three axpy passes, not a BLAS gemm: (N, 3) @ (3, 3) spins up BLAS threads
    u = positions[:, :1] * inverse[0]
    u += positions[:, 1:2] * inverse[1]
    u += positions[:, 2:] * inverse[2]
    pbc = np.asarray(pbc, dtype=bool)
    u[:, pbc] -= np.floor(u[:, pbc])
    return u, np.linalg.norm(inverse, axis=0)


def plane_spacing(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """(3,) Å per unit of reduced coordinate across each axis (lattice plane spacing)."""
    _, reach = reduced_coordinates(np.zeros((1, 3)), cell, pbc)
    return 1.0 / reach


class BinGrid:
    """Atoms of one structure binned in reduced coordinates (see module docstring)."""

    def __init__(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, *,
                 radius: float, subdivisions: int = DEFAULT_SUBDIVISIONS) -> None:
        self.pbc = np.asarray(pbc, dtype=bool)
        self.m = int(subdivisions)
        u, reach = reduced_coordinates(np.asarray(positions, dtype=np.float64), cell, self.pbc)
        width = radius * reach / self.m  # minimum bin width in u along each axis
        shape, index = [], np.empty(u.shape, dtype=np.int64)
        for k in range(3):
            if self.pbc[k]:
                n = int(np.clip(np.floor(1.0 / width[k]), 1, MAX_BINS_PER_AXIS))
                index[:, k] = np.minimum((u[:, k] * n).astype(np.int64), n - 1)
            else:
                lo, hi = float(u[:, k].min()), float(u[:, k].max())
                n = int(np.clip(np.floor((hi - lo) / width[k]) + 1, 1, MAX_BINS_PER_AXIS))
                w = max(width[k], (hi - lo) / n * (1 + 1e-12))
                index[:, k] = np.minimum(((u[:, k] - lo) / w).astype(np.int64), n - 1)
            shape.append(n)
        self.shape = tuple(shape)
        self.flat = np.ravel_multi_index(index.T, self.shape)

    def _dilate(self, grid: np.ndarray, combine, reduce) -> np.ndarray:
        """Combine each bin with its neighbours up to m bins away along every axis."""
        for axis in range(3):
            n = grid.shape[axis]
            if self.pbc[axis] and n <= 2 * self.m + 1:
                # the window covers the whole periodic axis: every bin sees all of it once
                grid = np.broadcast_to(reduce(grid, axis=axis, keepdims=True), grid.shape).copy()
                continue
            acc = grid.copy()
            for s in range(1, self.m + 1):
                for step in (s, -s):
                    if self.pbc[axis]:
                        moved = np.roll(grid, step, axis=axis)
                    else:
                        moved = _shift(grid, step, axis)
                    acc = combine(acc, moved)
            grid = acc
        return grid

    def candidates(self, mask: np.ndarray) -> np.ndarray:
        """(N,) bool: a superset of the atoms within ``radius`` of any atom in ``mask``."""
        grid = np.zeros(self.shape, dtype=bool).ravel()
        grid[self.flat[mask]] = True
        near = self._dilate(grid.reshape(self.shape), np.logical_or, np.any).ravel()
        return near[self.flat]

    def counts(self) -> np.ndarray:
        """Atoms per bin, shape ``self.shape``."""
        return np.bincount(self.flat, minlength=int(np.prod(self.shape))).reshape(self.shape)

    def degree_estimate(self) -> np.ndarray:
        """(N,) float: atoms in the (2m+1)^3 bins around each atom (a proxy for its degree)."""
        near = self._dilate(self.counts().astype(np.float64), np.add, np.sum).ravel()
        return near[self.flat]


def _shift(grid: np.ndarray, step: int, axis: int) -> np.ndarray:
    """Shift along an open axis, filling with zeros (no wrap-around)."""
    out = np.zeros_like(grid)
    n = grid.shape[axis]
    if abs(step) >= n:
        return out
    src = [slice(None)] * grid.ndim
    dst = [slice(None)] * grid.ndim
    if step > 0:
        src[axis], dst[axis] = slice(0, n - step), slice(step, n)
    else:
        src[axis], dst[axis] = slice(-step, n), slice(0, n + step)
    out[tuple(dst)] = grid[tuple(src)]
    return out
