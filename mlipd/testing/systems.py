"""Test structures covering the partitioner's and the graph builder's hard cases."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk, fcc111

from mlipd.types import Structure


def bulk_box(*, repeat: int = 8, seed: int = 0) -> Structure:
    """fcc Cu, 4 * repeat^3 atoms (2048 at repeat=8), rattled, cubic periodic cell."""
    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((repeat,) * 3)
    a.rattle(0.05, seed=seed)
    return Structure.from_atoms(a)


def small_triclinic(*, seed: int = 1) -> Structure:
    """A 4-atom triclinic cell narrower than the cutoff: many images of every atom."""
    a = bulk("Si", "diamond", a=5.43).repeat((2, 1, 1))
    a.set_cell(a.cell.array + np.array([[0.0, 0.3, 0.1], [0.2, 0.0, -0.1], [0.1, 0.2, 0.0]]),
               scale_atoms=True)
    a.rattle(0.05, seed=seed)
    return Structure.from_atoms(a)


def slab(*, seed: int = 2) -> Structure:
    """Cu(111) slab periodic in x, y only, vacuum along z."""
    a = fcc111("Cu", size=(6, 6, 4), vacuum=6.0)
    a.pbc = (True, True, False)
    a.rattle(0.05, seed=seed)
    return Structure.from_atoms(a)


def molecule(*, seed: int = 3) -> Structure:
    """An isolated 80-ish-atom cluster, no periodicity, zero cell."""
    a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((4, 4, 4))
    centre = a.positions.mean(axis=0)
    keep = np.linalg.norm(a.positions - centre, axis=1) < 6.0
    c = Atoms(numbers=a.numbers[keep], positions=a.positions[keep] - centre)
    c.rattle(0.05, seed=seed)
    return Structure.from_atoms(c)


def sparse(*, seed: int = 4) -> Structure:
    """Five atoms in a large periodic box: most ranks own nothing at P = 8."""
    rng = np.random.default_rng(seed)
    pos = np.array([[0, 0, 0], [2.2, 0, 0], [0, 2.3, 0], [8, 8, 8], [9.9, 8.2, 8.1]], float)
    pos += rng.normal(scale=0.05, size=pos.shape)
    return Structure(numbers=np.array([29, 29, 8, 1, 6]), positions=pos,
                     cell=np.eye(3) * 14.0, pbc=np.ones(3, bool))


def cases() -> dict[str, Structure]:
    return {"bulk": bulk_box(), "triclinic": small_triclinic(), "slab": slab(),
            "molecule": molecule(), "sparse": sparse()}
