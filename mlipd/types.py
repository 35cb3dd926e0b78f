"""The values that pass between mlipd's layers. Å, eV, eV/Å; cell rows are lattice vectors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlipd.errors import ValidationError


@dataclass(frozen=True, slots=True)
class Structure:
    """One atomic structure.

    numbers:   (N,) int atomic numbers
    positions: (N, 3) float64, Å
    cell:      (3, 3) float64, Å, rows are lattice vectors (zeros where not periodic)
    pbc:       (3,) bool
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray

    def __post_init__(self) -> None:
        # Runs once per structure per MD step: each check below is the cheapest numpy
        # form of itself (the 8-atom case is dominated by per-call overhead).
        numbers = np.asarray(self.numbers)
        positions = np.asarray(self.positions, dtype=np.float64)
        cell = np.asarray(self.cell, dtype=np.float64)
        pbc = self.pbc
        if isinstance(pbc, np.ndarray) and pbc.dtype == np.bool_ and pbc.shape == (3,):
            pbc = pbc.copy()
        else:
            pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
        if numbers.ndim != 1 or numbers.dtype.kind not in "iu":  # signed or unsigned int
            raise ValidationError(
                f"numbers must be a 1-D integer array, got {numbers.dtype} {numbers.shape}"
            )
        n = numbers.shape[0]
        if n == 0:
            raise ValidationError("structure has no atoms")
        if positions.shape != (n, 3):
            raise ValidationError(f"positions must have shape ({n}, 3), got {positions.shape}")
        if cell.shape != (3, 3):
            raise ValidationError(f"cell must have shape (3, 3), got {cell.shape}")
        if not np.isfinite(positions).all():
            raise ValidationError("positions contain NaN or infinity")
        if not np.isfinite(cell).all():
            raise ValidationError("cell contains NaN or infinity")
        if numbers.min() < 1 or numbers.max() > 118:
            raise ValidationError("atomic numbers must be in 1..118")
        if pbc.any():
            periodic = cell[pbc]
            # |v| == 0 exactly when sum(v * v) == 0; the SVD only for a zero vector
            if ((periodic * periodic).sum(axis=1) == 0).any() and np.linalg.matrix_rank(cell) < 3:
                raise ValidationError("periodic direction with a zero cell vector")
        object.__setattr__(self, "numbers", numbers.astype(np.int64, copy=False))
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "cell", cell)
        object.__setattr__(self, "pbc", pbc)

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    def species(self) -> set[int]:
        """The atomic numbers present. O(N) counting (numbers are 1..118), not
        np.unique's sort."""
        return set(np.flatnonzero(np.bincount(self.numbers, minlength=119)).tolist())

    @classmethod
    def from_atoms(cls, atoms: Any) -> Structure:
        """From an ``ase.Atoms`` (copies the arrays)."""
        return cls(
            numbers=np.array(atoms.numbers),
            positions=np.array(atoms.positions, dtype=np.float64),
            cell=np.array(atoms.cell.array, dtype=np.float64),
            pbc=np.array(atoms.pbc, dtype=bool),
        )

    def to_atoms(self) -> Any:
        import ase

        return ase.Atoms(
            numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc
        )


def species_names(numbers) -> str:
    """Atomic numbers as ``"Og (Z=118), Xx (Z=...)"``, sorted, for messages."""
    from ase.data import chemical_symbols

    return ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in sorted(int(z) for z in numbers))


@dataclass(frozen=True, slots=True)
class Result:
    """What a model returns for one structure.

    energy: eV
    forces: (N, 3) eV/Å
    virial: (3, 3) eV, ``-dE/dstrain`` (stress = -virial / volume); None if not computed
    extras: per-structure extra outputs (e.g. ``magmoms`` (N,) in μB), JSON-serialisable
    energies: (N,) eV, each atom's own energy (the model's site energies; they sum to
              ``energy``), or None where the model gives none (a whole-structure model)
    """

    energy: float
    forces: np.ndarray
    virial: np.ndarray | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    energies: np.ndarray | None = None

    def stress(self, cell: np.ndarray) -> np.ndarray | None:
        """Stress (3, 3) eV/Å³ in ASE's sign convention, or None without a virial."""
        if self.virial is None:
            return None
        volume = abs(float(np.linalg.det(cell)))
        if volume == 0.0:
            return None
        return -self.virial / volume
