"""When to rebuild the partition and neighbour lists (rank 0's decision, broadcast).

Lists are built with ``cutoff + skin``. They stay exact while no atom has moved more
than ``skin / 2`` since the build (any pair now inside the cutoff was then inside
cutoff + skin), so the policy rebuilds when that fails, when the batch changes
(atom counts, species, periodicity), when any cell changes (a strained cell moves
image shifts; NPT runs rebuild every step), or when the edge load across ranks has
drifted past ``imbalance_limit`` (max / mean) and 25% past its value right after the
build (some batches cannot be balanced better: no rebuild loop then).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlipd.types import Structure


class RebuildPolicy:
    def __init__(self, *, skin: float, imbalance_limit: float = 1.5) -> None:
        self.skin = float(skin)
        self.imbalance_limit = float(imbalance_limit)
        self._numbers: list[np.ndarray] | None = None
        self._pbc: list[np.ndarray] = []
        self._cells: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self._imbalanced = False
        self._baseline: float | None = None
        self.rebuilds = 0  # for tests and metrics

    def decide(self, structures: Sequence[Structure]) -> bool:
        """True when the batch needs a new partition; records it as the new reference."""
        if not self._reusable(structures):
            self._numbers = [s.numbers.copy() for s in structures]
            self._pbc = [s.pbc.copy() for s in structures]
            self._cells = [s.cell.copy() for s in structures]
            self._positions = [s.positions.copy() for s in structures]
            self._imbalanced = False
            self._baseline = None
            self.rebuilds += 1
            return True
        return False

    def _reusable(self, structures: Sequence[Structure]) -> bool:
        if self._numbers is None or self._imbalanced or self.skin <= 0:
            return False
        if len(structures) != len(self._numbers):
            return False
        limit2 = (0.5 * self.skin) ** 2
        for s, z, p, c, x in zip(structures, self._numbers, self._pbc, self._cells,
                                 self._positions, strict=True):
            if s.numbers.shape != z.shape or not np.array_equal(s.numbers, z):
                return False
            if not np.array_equal(s.pbc, p) or not np.array_equal(s.cell, c):
                return False
            d = s.positions - x
            np.multiply(d, d, out=d)
            # the same squared lengths as ((d ** 2).sum(axis=1)), bit for bit, but one
            # temporary and no strided reduction (it runs at every step)
            if float((d[:, 0] + d[:, 1] + d[:, 2]).max()) >= limit2:
                return False
        return True

    def report_load(self, edges_per_rank: Sequence[float]) -> None:
        """Edge counts (r < cutoff) per rank of the last step."""
        e = np.asarray(edges_per_rank, dtype=np.float64)
        if e.size <= 1 or e.mean() <= 0:
            return
        imbalance = float(e.max() / e.mean())
        if self._baseline is None:
            self._baseline = imbalance
        elif imbalance > max(self.imbalance_limit, 1.25 * self._baseline):
            self._imbalanced = True

    def invalidate(self) -> None:
        self._numbers = None
        self._positions, self._cells, self._pbc = [], [], []  # a refused batch's copies
