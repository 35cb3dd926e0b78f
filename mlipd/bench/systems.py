"""Structures the suites measure on: deterministic, sized by atom count."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk

from mlipd.types import Structure


def oxide(n_atoms: int, *, seed: int = 0) -> Atoms:
    """(Mn,Ni)O rocksalt, the cube of conventional cells nearest ``n_atoms`` (8 per cell),
    half the cations Ni, rattled 0.05 Å: CHGNet's benchmark system."""
    reps = max(1, round((n_atoms / 8) ** (1 / 3)))
    atoms = bulk("MnO", "rocksalt", a=4.44, cubic=True).repeat((reps,) * 3)
    rng = np.random.default_rng(seed)
    cations = np.flatnonzero(atoms.numbers == 25)
    atoms.numbers[rng.permutation(cations)[: len(cations) // 2]] = 28
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def silicon(n_atoms: int, *, seed: int = 0) -> Atoms:
    """Diamond Si, the cube of conventional cells nearest ``n_atoms``, rattled 0.05 Å."""
    reps = max(1, round((n_atoms / 8) ** (1 / 3)))
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((reps,) * 3)
    atoms.positions += np.random.default_rng(seed).normal(scale=0.05, size=atoms.positions.shape)
    return atoms


class Jiggle:
    """MD-like calls: ``structure(k)`` moves every atom by ~``step`` Å from the start
    (a new draw per call, within the Verlet skin so neighbour lists are reused)."""

    def __init__(self, atoms: Atoms, *, step: float = 0.01, seed: int = 1) -> None:
        self.base = Structure.from_atoms(atoms)
        self.step = step
        self.rng = np.random.default_rng(seed)

    def structure(self, k: int = 0) -> Structure:
        b = self.base
        x = b.positions + self.rng.normal(scale=self.step, size=b.positions.shape)
        return Structure(b.numbers, x, b.cell, b.pbc)
