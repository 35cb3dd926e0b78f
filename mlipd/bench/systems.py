"""Structures the suites measure on: deterministic, sized by atom count."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk

from mlipd.types import Structure


def repetitions(n_cells: float) -> tuple[int, int, int]:
    """Repetitions (a, b, c) of a conventional cell: ``n_cells`` exactly when it factors
    into a box no longer than 2.5x its shortest side (2,000 atoms of 8-atom cells: 5x5x10),
    else the nearest cube."""
    m = round(n_cells)
    if m >= 1 and abs(n_cells - m) < 1e-9:
        best = None
        for a in range(1, round(m ** (1 / 3)) + 1):
            for b in range(a, round((m / a) ** 0.5) + 1):
                c, rest = divmod(m, a * b)
                compact = rest == 0 and b <= c <= 2.5 * a
                if compact and (best is None or c / a < best[2] / best[0]):
                    best = (a, b, c)
        if best is not None:
            return best
    k = max(1, round(n_cells ** (1 / 3)))
    return k, k, k


def oxide(n_atoms: int, *, seed: int = 0) -> Atoms:
    """(Mn,Ni)O rocksalt (a = 4.44 Å, 8 atoms per conventional cell), ``n_atoms`` atoms
    when the cells factor into a compact box (``repetitions``), half the cations Ni,
    rattled 0.05 Å: CHGNet's benchmark system."""
    atoms = bulk("MnO", "rocksalt", a=4.44, cubic=True).repeat(repetitions(n_atoms / 8))
    rng = np.random.default_rng(seed)
    cations = np.flatnonzero(atoms.numbers == 25)
    atoms.numbers[rng.permutation(cations)[: len(cations) // 2]] = 28
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def silicon(n_atoms: int, *, seed: int = 0) -> Atoms:
    """Diamond Si (a = 5.43 Å, 8 atoms per conventional cell), sized as ``oxide``,
    rattled 0.05 Å."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repetitions(n_atoms / 8))
    atoms.positions += np.random.default_rng(seed).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


class Jiggle:
    """MD-like calls: call ``k`` moves every atom by ~``step`` Å from the start, the
    same displacement for every contender that asks for call ``k`` (within the Verlet
    skin, so neighbour lists can be reused; ``k`` may be negative for warm-ups)."""

    def __init__(self, atoms: Atoms, *, step: float = 0.01, seed: int = 1) -> None:
        self.base = Structure.from_atoms(atoms)
        self.template = atoms.copy()
        self.step = step
        self.seed = seed

    def positions(self, k: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, k + 2**20])
        return self.base.positions + rng.normal(scale=self.step, size=self.base.positions.shape)

    def structure(self, k: int = 0) -> Structure:
        b = self.base
        return Structure(b.numbers, self.positions(k), b.cell, b.pbc)

    def atoms(self, k: int = 0) -> Atoms:
        """The same configuration as ``structure(k)``, for ASE calculators."""
        a = self.template.copy()
        a.positions = self.positions(k)
        return a
