"""``MlipdCalculator``: an ASE Calculator whose energies and forces come from ``mlipd serve``.

    atoms.calc = MlipdCalculator("tcp://127.0.0.1:5555")

Only adapter code lives here: the network is ``mlipd.client.Client``, and any
object with ``compute(structure, *, virial) -> Result`` can stand in for it
(``backend=``). Atoms are checked before any network call.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import numpy as np
from ase.calculators.calculator import Calculator, CalculatorSetupError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from mlipd.types import Result, Structure


class Backend(Protocol):
    def compute(self, structure: Structure, *, virial: bool = True) -> Result: ...


class MlipdCalculator(Calculator):
    """energy, free_energy (eV), forces (N, 3) eV/Å, stress (6,) eV/Å³ (periodic cells only).

    endpoint: the server's ZeroMQ address; or pass ``backend`` instead
    timeout_s, heartbeat_s, connect_timeout_s, curve: passed to ``mlipd.client.Client``
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, endpoint: str | None = None, *, backend: Backend | None = None,
                 timeout_s: float = 3600.0, heartbeat_s: float = 10.0,
                 connect_timeout_s: float = 10.0, curve: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if (endpoint is None) == (backend is None):
            raise CalculatorSetupError("give either an endpoint or a backend")
        self._owned = backend is None
        if backend is None:
            from mlipd.client import Client

            backend = Client(endpoint, timeout_s=timeout_s, heartbeat_s=heartbeat_s,
                             connect_timeout_s=connect_timeout_s, curve=curve)
        self.backend = backend

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        structure = check_atoms(self.atoms)
        want_stress = "stress" in properties
        if want_stress and not self.atoms.pbc.all():
            raise CalculatorSetupError("stress needs a cell periodic in all three directions")
        result = self.backend.compute(structure, virial=want_stress)
        self.results = {"energy": result.energy, "free_energy": result.energy,
                        "forces": np.array(result.forces)}
        if result.virial is not None and self.atoms.pbc.all():
            volume = self.atoms.get_volume()
            self.results["stress"] = full_3x3_to_voigt_6_stress(-result.virial / volume)

    def close(self) -> None:
        """Close the client this calculator made (not a backend passed in)."""
        if self._owned:
            self.backend.close()

    def __enter__(self) -> MlipdCalculator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_atoms(atoms: Any) -> Structure:
    """Refuse what no server can compute, before any network call."""
    if atoms is None or len(atoms) == 0:
        raise CalculatorSetupError("no atoms to compute")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    lengths = atoms.cell.lengths()
    if np.any(pbc & (lengths == 0)):
        raise CalculatorSetupError("periodic direction with a zero-length cell vector")
    if pbc.any() and atoms.cell.rank < 3 and pbc.all():
        raise CalculatorSetupError("periodic cell is degenerate (zero volume)")
    return Structure.from_atoms(atoms)
