"""Whole-structure engines: models that return energy, forces and stress themselves
(an ASE calculator behind ``ase:MODULE:NAME``), evaluated one structure at a time on
one device. They take no part in the graph / halo / autograd step, so they run at one
rank only."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from ase.calculators.calculator import CalculatorError, PropertyNotImplementedError

from mlipd.engine import deadline
from mlipd.engine.api import OneProcess
from mlipd.engine.guards import Limits, check_structures
from mlipd.errors import CalculationFailed
from mlipd.model_api import ModelSpec
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)


class WholeEngine(OneProcess):
    """The engine API over a whole-structure model (``calculator``: an ASE calculator,
    ``spec``: its ModelSpec); a batch's structures are evaluated one after another.
    The calculator chooses its own device and precision: ``device``/``dtype`` report
    what mlipd was asked for, as the calculator does not say. The geometry guards
    (``limits``) run on every structure with the model's cutoff: the calculator's own
    neighbour list is native code too."""

    def __init__(self, model, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 limits: Limits | None = None) -> None:
        self.model = model
        self.limits = limits if limits is not None else Limits()
        self.calls = 0
        self.device = torch.device("cpu")
        self.dtype = torch.float64 if dtype is None else dtype
        if str(device) not in ("cpu", "auto"):
            log.warning("--device %s does not reach an ASE calculator; set it in the "
                        "calculator's own options", device)

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def world_size(self) -> int:
        return 1

    def close(self) -> None:
        """Nothing to release: the calculator lives as long as the engine."""

    def compute(self, structures: Sequence[Structure], *, virial: bool = True) -> list[Result]:
        self.calls += 1
        check_structures(structures, radius=float(self.spec.cutoff), limits=self.limits)
        out = []
        for s in structures:
            deadline.check("between structures")
            out.append(self._one(s, virial=virial))
        deadline.check("after the last structure")
        return out

    def _one(self, s: Structure, *, virial: bool) -> Result:
        atoms = s.to_atoms()
        atoms.calc = self.model.calculator
        try:
            energy = float(atoms.get_potential_energy())
            forces = np.array(atoms.get_forces(), dtype=np.float64)
            vir = None
            if virial and s.pbc.all():
                try:
                    stress = np.array(atoms.get_stress(voigt=False), dtype=np.float64)
                except PropertyNotImplementedError:
                    stress = None  # energy/forces-only calculator: no virial, not zeros
                if stress is not None:
                    vir = -stress * abs(float(np.linalg.det(s.cell)))
        except (CalculatorError, RuntimeError, ValueError, ArithmeticError) as e:
            raise CalculationFailed(f"{self.spec.name}: {e}") from e
        if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
            raise CalculationFailed(f"{self.spec.name} returned NaN or infinite energy or forces")
        return Result(energy=energy, forces=forces, virial=vir)
