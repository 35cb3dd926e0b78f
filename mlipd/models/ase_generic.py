"""Any ASE calculator as a single-device mlipd model: ``--model ase:MODULE:NAME[,key=value...]``.

A package that ships an ASE calculator but has no mlipd adapter yet still runs
behind every front end, at one rank. Such a calculator is a *whole-structure*
model: it returns energy, forces and stress itself, so it cannot take part in the
graph / halo-exchange / autograd path of ``LocalEngine`` and ``DistributedEngine``.
``make_engine`` sees ``whole_structure = True`` and uses ``ASEEngine`` instead, and
refuses ``--ranks`` > 1: distributing a model needs an adapter (docs/models.md).

``NAME`` is a class or factory in ``MODULE`` called with the keyword options, which
are Python literals where they parse as one and strings otherwise, e.g.
``ase:ase.calculators.emt:EMT`` or ``ase:mace.calculators:mace_mp,model=medium,device=cuda``.
The calculator chooses its own device and precision: ``--device``/``--dtype`` do not
reach it. Importing ``MODULE`` runs its code: name only modules you trust.
"""

from __future__ import annotations

import ast
import importlib
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from ase.calculators.calculator import CalculatorError, PropertyNotImplementedError

from mlipd.errors import CalculationFailed
from mlipd.models.base import ModelSpec
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)

# The graph engines need a cutoff; a whole-structure calculator hides its own. This
# nominal value only feeds cost estimates (batching); ``cutoff=`` overrides it.
NOMINAL_CUTOFF = 5.0


def parse_target(arg: str) -> tuple[str, str, dict[str, Any]]:
    """``"pkg.mod:Name,k=v,..."`` -> ("pkg.mod", "Name", {k: v})."""
    # split only at commas that start a new key=, so values such as [1, 2] keep theirs
    target, *items = re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", arg)
    module, sep, name = target.rpartition(":")
    if not sep or not name.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise ValueError(f"ase: expected MODULE:NAME[,key=value...], got {arg!r}")
    options: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"ase: option {item!r} is not key=value")
        try:
            options[key.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key.strip()] = text
    return module, name, options


class ASECalculatorModel:
    """An ASE calculator wrapped as a whole-structure model (one rank only).

    ``ASECalculatorModel("ase.calculators.emt:EMT")`` builds the calculator from the
    CLI argument; ``ASECalculatorModel(calculator=calc)`` wraps an instance. Option
    ``cutoff`` (Å) is taken by mlipd (see ``NOMINAL_CUTOFF``), not passed on.
    """

    whole_structure = True  # make_engine: no graph, no partition, ASEEngine at P = 1

    def __init__(self, arg: str | None = None, *, calculator: Any = None,
                 cutoff: float = NOMINAL_CUTOFF) -> None:
        name = "ase"
        if arg is not None:
            module, attr, options = parse_target(arg)
            cutoff = float(options.pop("cutoff", cutoff))
            try:
                factory = getattr(importlib.import_module(module), attr)
            except ImportError as e:
                raise ValueError(f"ase: cannot import {module!r}: {e}") from e
            except AttributeError as e:
                raise ValueError(f"ase: {module!r} has no {attr!r}") from e
            calculator = factory(**options)
            name = f"ase:{module}:{attr}"
        if calculator is None:
            raise ValueError("ase needs a calculator: --model ase:MODULE:NAME[,key=value...]")
        if not callable(getattr(calculator, "get_potential_energy", None)):
            raise ValueError(f"ase: {type(calculator).__name__} is not an ASE calculator")
        self.calculator = calculator
        self.spec = ModelSpec(name=name, cutoff=cutoff, species=None, n_layers=0)

    def engine(self, *, device: str = "cpu", dtype: Any = None) -> ASEEngine:
        return ASEEngine(self, device=device, dtype=dtype)


class ASEEngine:
    """The engine API (``compute``, ``spec``, ``world_size``, ``calls``, ``close``) over an
    ASE calculator; structures of a batch are evaluated one after another."""

    def __init__(self, model: ASECalculatorModel, *, device: str = "cpu", dtype: Any = None):
        self.model = model
        self.calls = 0
        if device != "cpu":
            log.warning("--device %s does not reach an ASE calculator; set it in the "
                        "calculator's own options", device)
        del dtype  # the calculator computes in its own precision

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
        return [self._one(s, virial=virial) for s in structures]

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
