"""The memory a request will take, estimated on rank 0 before anything is allocated,
and refused (``TooLarge``) above a budget: a ~1 KB request can otherwise ask for
gigabytes (27 Si atoms 0.6 Å apart in a 1.8 Å periodic cell: CHGNet's angle graph
grows as the square of the neighbours per atom, past 10 GB).

estimate = atoms x per_atom + edges x per_edge + angles x per_angle, with the model's
declared bytes per item at its dtype (``mlipd.model_api.MemoryCost``). Two stages, both
after the geometry guards (which bound the pairs, so stage 2 is bounded too):

1. an upper bound from binned counts, O(N) numpy, no pair list: bins at least the radius
   wide; every neighbour of an atom lies in its bin's 27-bin stencil (or among the image
   layers where an axis holds fewer than 3 bins), so the stencil count B_i bounds its
   neighbours and sum B_i (B_i - 1) its angles. In bulk it is ~6x the true edges and
   ~40x the angles: enough to pass most requests at once;
2. only when that bound is over the budget: exact counts from one vesin call at the
   guarded radius (cutoff + skin, half list with distances): directed edges within the
   cutoff, bonds per atom within the angle cutoff, sum over atoms of b_i (b_i - 1).
   Refused when the exact estimate is still over the budget.

At P ranks each holds ~1/P of the graph; the budget is per device, so the estimate is
divided by P and multiplied by the partitioner's imbalance allowance.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np
from vesin import NeighborList

from mlipd.errors import TooLarge
from mlipd.model_api import MemoryCost
from mlipd.types import Structure

_P0, _P1 = np.int64(0x9E3779B1), np.int64(0x85EBCA77)
_MIX = np.uint64(0x9E3779B97F4A7C15)
DEFAULT_FRACTION = 0.5  # of the device's free memory at start-up: --max-request-memory
IMBALANCE = 1.5  # at P > 1: the most a rank holds, relative to the mean (RebuildPolicy)
PAIR_LIST_BYTES = 40  # vesin's half list with distances, per pair (i, j: 8 each; d; slack)


@dataclass(frozen=True)
class Counts:
    """atoms; edges: directed, within the cutoff; angles: ordered bond pairs at a centre;
    exact: counted from a pair list (else an upper bound from bins)."""

    atoms: int
    edges: float
    angles: float
    exact: bool

    def bytes(self, cost: MemoryCost) -> float:
        return (self.atoms * cost.per_atom + self.edges * cost.per_edge
                + self.angles * cost.per_angle)


@dataclass(frozen=True)
class MemoryBudget:
    """budget: bytes per device for one engine call; cost: the model's bytes per item;
    cutoff: Å, the model's edge radius; world_size: ranks sharing the graph."""

    budget: float
    cost: MemoryCost
    cutoff: float
    world_size: int = 1

    def share(self, total: float) -> float:
        """The part of ``total`` the fullest device holds."""
        p = self.world_size
        return total if p <= 1 else total * min(1.0, IMBALANCE / p)

    def check(self, structures: list[Structure] | tuple[Structure, ...], *,
              u_h: list[tuple[np.ndarray, np.ndarray]], skin: float) -> float:
        """Refuse the batch (``TooLarge``) when its estimate is over the budget; the
        estimate in bytes otherwise. ``u_h``: each structure's reduced coordinates and
        face heights (``guards._reduced``), already computed by the guards. A model
        that recomputes activations by itself when memory is short (``cost.recomputed``)
        is held to that figure when the stored one is over the budget."""
        try:
            return self._check(structures, u_h=u_h, skin=skin)
        except TooLarge:
            if self.cost.recomputed is None:
                raise
            return replace(self, cost=self.cost.recomputed).check(structures, u_h=u_h,
                                                                   skin=skin)

    def _check(self, structures: list[Structure] | tuple[Structure, ...], *,
               u_h: list[tuple[np.ndarray, np.ndarray]], skin: float) -> float:
        radius = self.cutoff + skin
        bounds = [upper_bound(s, u, h, cutoff=self.cutoff, radius=radius, cost=self.cost)
                  for s, (u, h) in zip(structures, u_h, strict=True)]
        total = self.share(sum(c.bytes(self.cost) for c in bounds))
        if total <= self.budget:
            return total
        exact = []
        for s, c in zip(structures, bounds, strict=True):
            if self.share(c.bytes(self.cost)) <= self.budget / 8:
                exact.append(c)  # small next to the budget: the bound will do
                continue
            if c.edges / 2 * PAIR_LIST_BYTES > self.budget:  # the count itself would not fit
                _refuse(s, c, self.share(c.bytes(self.cost)), self.budget)
            exact.append(exact_counts(s, cutoff=self.cutoff, radius=radius, cost=self.cost))
        total = self.share(sum(c.bytes(self.cost) for c in exact))
        if total > self.budget:
            worst = max(range(len(exact)), key=lambda k: exact[k].bytes(self.cost))
            _refuse(structures[worst], exact[worst], total, self.budget,
                    index=worst if len(structures) > 1 else None)
        return total


def default_budget(limit: float | None, device, *, world_size: int = 1) -> float | None:
    """Bytes per device for one engine call: ``limit`` (``--max-request-memory``; 0:
    no budget), else ``DEFAULT_FRACTION`` of ``device``'s free memory now (at start-up;
    ranks on one CPU host share it), or None where that is unknown."""
    if limit is not None:
        return None if limit == 0 else float(limit)
    import torch

    from mlipd.memory import available_bytes

    free = available_bytes(torch.device(device))
    if free is None:
        return None
    if torch.device(device).type == "cpu":
        free //= max(world_size, 1)
    return DEFAULT_FRACTION * free


def _refuse(s: Structure, c: Counts, total: float, budget: float,
            index: int | None = None) -> None:
    what = "" if index is None else f"structure {index}: "
    kind = "" if c.exact else "up to "
    raise TooLarge(f"{what}estimated memory {total / 2**30:.3g} GiB for {s.n_atoms} atoms, "
                   f"{kind}{c.edges:.3g} edges and {kind}{c.angles:.3g} angles (budget "
                   f"{budget / 2**30:.3g} GiB, --max-request-memory): too many atoms, or "
                   "atoms too close together for this model")


def _key(idx: np.ndarray) -> np.ndarray:
    """(n,) uint64 key of integer triples; distinct triples that collide only merge
    their counts, which keeps every count an upper bound."""
    k = idx[:, 0] * _P0 + idx[:, 1] * _P1 + idx[:, 2]
    return k.view(np.uint64) * _MIX


def neighbour_bound(u: np.ndarray, h: np.ndarray, pbc: np.ndarray, *,
                    radius: float) -> np.ndarray:
    """(N,) float: an upper bound on each atom's neighbours within ``radius`` (periodic
    images included, itself at zero shift excluded). ``u``, ``h``: as
    ``guards._reduced`` (fractional and wrapped on periodic axes, Å on open ones)."""
    n = u.shape[0]
    idx = np.zeros((n, 3), dtype=np.int64)
    layers = 1.0  # image layers on periodic axes too short for 3 bins
    active: list[tuple[int, int | None]] = []  # (axis, bins if periodic)
    for k in range(3):
        if pbc[k]:
            bins = int(h[k] // radius)
            if bins < 3:
                layers *= 2 * math.ceil(radius / h[k]) + 1
                continue
            idx[:, k] = np.minimum((u[:, k] * bins).astype(np.int64), bins - 1)
            active.append((k, bins))
        else:
            lo = float(u[:, k].min())
            if float(u[:, k].max()) - lo < radius:
                continue
            idx[:, k] = ((u[:, k] - lo) / radius).astype(np.int64)
            active.append((k, None))
    keys = _key(idx)
    uniq, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True,
                                             return_counts=True)
    cells = idx[first]
    stencil = np.zeros(uniq.size, dtype=np.float64)
    for offset in itertools.product((-1, 0, 1), repeat=len(active)):
        other = cells.copy()
        for (k, bins), o in zip(active, offset, strict=True):
            other[:, k] += o
            if bins is not None:
                other[:, k] %= bins
        ok = _key(other)
        at = np.minimum(np.searchsorted(uniq, ok), uniq.size - 1)
        stencil += np.where(uniq[at] == ok, counts[at], 0)
    return np.maximum(layers * stencil[inverse.reshape(-1)] - 1.0, 0.0)


def upper_bound(s: Structure, u: np.ndarray, h: np.ndarray, *, cutoff: float,
                radius: float, cost: MemoryCost) -> Counts:
    """Stage 1 (module docstring): bounds from binned counts, no pair list."""
    pbc = np.asarray(s.pbc, dtype=bool)
    if s.n_atoms < 2 and not pbc.any():
        return Counts(s.n_atoms, 0.0, 0.0, exact=True)
    edges = float(neighbour_bound(u, h, pbc, radius=radius).sum())
    angles = 0.0
    if cost.per_angle > 0 and cost.angle_cutoff > 0:
        b = neighbour_bound(u, h, pbc, radius=cost.angle_cutoff)
        angles = float((b * np.maximum(b - 1.0, 0.0)).sum())
    return Counts(s.n_atoms, edges, angles, exact=False)


def exact_counts(s: Structure, *, cutoff: float, radius: float, cost: MemoryCost) -> Counts:
    """Stage 2: one vesin half list at ``radius`` (the guards made that call safe and
    bounded its pairs); edges within ``cutoff``, angles within the angle cutoff."""
    nl = NeighborList(cutoff=float(radius), full_list=False)
    i, j, d = nl.compute(s.positions, s.cell, [bool(p) for p in s.pbc], quantities="ijd")
    edges = 2.0 * float(np.count_nonzero(d < cutoff))
    angles = 0.0
    if cost.per_angle > 0 and cost.angle_cutoff > 0:
        near = d < cost.angle_cutoff
        b = (np.bincount(i[near].astype(np.int64), minlength=s.n_atoms)
             + np.bincount(j[near].astype(np.int64), minlength=s.n_atoms)).astype(np.float64)
        angles = float((b * (b - 1.0)).sum())
    return Counts(s.n_atoms, edges, angles, exact=True)
