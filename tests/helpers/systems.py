"""The small structures the tests share. fcc argon with a rattle: cheap for every model
(``lj``, the reference potential) and never symmetric enough to hide a sign error."""

from __future__ import annotations

from pathlib import Path

from ase import Atoms
from ase.build import bulk

from mlipd.types import Structure

ARGON_A = 5.26  # Å, near LJ argon's equilibrium (sigma 3.4 Å)


def argon_atoms(n_rep: int = 1, *, seed: int = 0, a: float = ARGON_A,
                rattle: float = 0.05) -> Atoms:
    """fcc argon, cubic cell repeated ``n_rep`` times per axis (4 n_rep^3 atoms), each
    atom moved by a normal draw of ``rattle`` Å (seeded)."""
    atoms = bulk("Ar", "fcc", a=a, cubic=True).repeat(n_rep)
    atoms.rattle(rattle, seed=seed)
    return atoms


def argon(n_rep: int = 1, *, seed: int = 0, a: float = ARGON_A) -> Structure:
    """``argon_atoms`` as a ``Structure``."""
    return Structure.from_atoms(argon_atoms(n_rep, seed=seed, a=a))


def write_argon(workdir: Path, *, name: str = "init.xyz", n_rep: int = 2, seed: int = 1,
                a: float = 5.3) -> Atoms:
    """``argon_atoms`` written to ``workdir/name`` (extended xyz, i-PI's start file)."""
    atoms = argon_atoms(n_rep, seed=seed, a=a)
    atoms.write(workdir / name, format="extxyz")
    return atoms
