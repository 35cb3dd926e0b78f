"""What i-PI never sends: atomic numbers and periodicity.

Rule: they come from the command line, either a structure file readable by
``ase.io`` (``--structure``, typically the file i-PI starts from, atoms in the
same order) or one element for every atom (``--species Ar``, any atom count).
The INIT string is not used for this: i-PI sends only its ``<parameters>`` and
``batch_size`` there, ASE a single NUL byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlipd.errors import ProtocolError, SetupError
from mlipd.types import species_names


@dataclass(frozen=True)
class Template:
    """numbers: (N,) int atomic numbers, or None with ``species`` for any N;
    pbc: (3,) bool."""

    numbers: np.ndarray | None
    pbc: np.ndarray
    species: int | None = None
    source: str = "the template"  # where the numbers came from, for messages

    def check_species(self, spec) -> None:
        """Refuse, before any connection, elements the model (``spec``: its ModelSpec)
        does not know: otherwise the first step would fail and the server would only
        see its connection closed."""
        if spec.species is None:
            return
        present = ({self.species} if self.numbers is None
                   else set(np.unique(self.numbers).tolist()))
        unknown = present - spec.species
        if unknown:
            raise SetupError(f"model {spec.name!r} does not know {species_names(unknown)} "
                             f"({self.source})")

    def numbers_for(self, n_atoms: int) -> np.ndarray:
        """Atomic numbers (n_atoms,) for a structure of ``n_atoms`` atoms."""
        if self.numbers is None:
            return np.full(n_atoms, self.species, dtype=np.int64)
        if n_atoms != len(self.numbers):
            raise ProtocolError(
                f"the server sent {n_atoms} atoms but the template structure has "
                f"{len(self.numbers)}")
        return self.numbers

    @classmethod
    def from_file(cls, path: str, *, pbc: bool | None = None) -> Template:
        """Numbers from ``path``; pbc from ``pbc`` if given, else from the file, where
        i-PI's own xyz (cell in a ``# CELL(abcABC):`` comment, which ase.io reads
        as no cell) counts as periodic."""
        import ase.io

        try:
            atoms = ase.io.read(path, index=0)
        except (OSError, ValueError, KeyError, IndexError, StopIteration) as e:
            raise SetupError(f"cannot read template structure {path!r}: {e}") from e
        if len(atoms) == 0:
            raise SetupError(f"template structure {path!r} has no atoms")
        if pbc is None:
            periodic = np.array(atoms.pbc, dtype=bool)
            if not periodic.any() and _is_ipi_xyz(path):
                periodic[:] = True
        else:
            periodic = np.full(3, pbc)
        return cls(numbers=np.array(atoms.numbers, dtype=np.int64), pbc=periodic,
                   source=f"in {path}")

    @classmethod
    def from_species(cls, symbol: str, *, pbc: bool = True) -> Template:
        from ase.data import atomic_numbers

        z = atomic_numbers.get(symbol)
        if z is None or z == 0:
            raise SetupError(f"unknown element symbol {symbol!r}")
        return cls(numbers=None, pbc=np.full(3, pbc), species=int(z),
                   source=f"--species {symbol}")


def _is_ipi_xyz(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.readline()
            return "CELL(" in f.readline()
    except OSError:
        return False
