"""``MlipdCalculator``: an ASE Calculator over mlipd's engine, run in this process or
behind a running ``mlipd serve``.

    atoms.calc = MlipdCalculator(model="chgnet")            # the engine in this process
    atoms.calc = MlipdCalculator(model="chgnet", ranks=4)   # ... partitioned over 4 ranks
    atoms.calc = MlipdCalculator("tcp://127.0.0.1:5555")    # a server (mlipd.client.Client)

Only adapter code lives here: the engine is ``mlipd.engine.make_engine``, the network
``mlipd.client.Client``, and any object with ``compute(structure, *, virial) -> Result``
and ``close()`` can stand in for either (``backend=``). Atoms are checked before any
engine or network call. Several ranks are processes of mlipd's own program
(``mlipd.engine.rank_main``): they never import the calling script, so a script needs
no ``if __name__ == "__main__":`` guard. Warnings of the model packages (TorchScript,
e3nn, ...) raised inside the calculator's calls are ignored unless ``verbose=True``
(``mlipd.quiet``).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Protocol

import numpy as np
from ase.calculators.calculator import Calculator, CalculatorSetupError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from mlipd.quiet import quieted
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)


class Backend(Protocol):
    def compute(self, structure: Structure, *, virial: bool = True) -> Result: ...

    def close(self) -> None: ...


class EngineBackend:
    """An engine in this process (``mlipd.engine.make_engine``) as a Backend; ``close``
    closes the engine (and stops its ranks)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def compute(self, structure: Structure, *, virial: bool = True) -> Result:
        (result,) = self.engine.compute([structure], virial=virial)
        return result

    def close(self) -> None:
        self.engine.close()


class MlipdCalculator(Calculator):
    """An ASE calculator running a machine-learned potential through mlipd.

        from mlipd.calculator import MlipdCalculator
        atoms.calc = MlipdCalculator(model="chgnet")            # engine in this process
        atoms.calc = MlipdCalculator(model="mace-mp", ranks=2)  # partitioned over 2 ranks
        atoms.calc = MlipdCalculator("tcp://127.0.0.1:5555")    # a running `mlipd serve`
        atoms.get_potential_energy(); atoms.get_forces(); atoms.get_stress()

    Results: energy, free_energy (eV), forces (N, 3) eV/Å, stress (6,) eV/Å³ (cells
    periodic in 3D) and the model's per-atom extras (e.g. CHGNet's ``magmoms`` (N,) μB).
    One engine call per structure, whichever property ASE asks for first: forces and
    the virial come from the same backward pass, so a later ``get_stress`` costs
    nothing. ``close()`` (or ``with``) stops the engine and its rank processes.

    Give exactly one of:
    endpoint: a server's ZeroMQ address; other keyword options (``timeout_s``,
              ``heartbeat_s``, ``connect_timeout_s``, ``curve``) go to
              ``mlipd.client.Client``
    model:    run the engine in this process: ``model`` (as ``--model``; ``mlipd
              models`` lists them), ``device`` (auto, cpu, cuda, cuda:N), ``dtype``
              (float32 default, float64), ``ranks`` (processes the structure is
              partitioned across; no ``__main__`` guard needed), ``threads`` (intra-op
              threads per rank), ``devices`` (rank r on the r-th),
              ``max_request_memory`` (bytes one engine call may take, estimated before
              anything is allocated, as ``--max-request-memory``: over it, ``TooLarge``;
              default half the device's free memory at start-up, 0: no budget)
    backend:  any object with ``compute(structure, *, virial)`` and ``close()``
    verbose:  show the model packages' own warnings (hidden by default)
    label, atoms, directory: ASE's own Calculator options
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress",
                                                   "energies", "magmoms"]

    def __init__(self, endpoint: str | None = None, *, model: str | None = None,
                 device: str | None = None, dtype: str | None = None, ranks: int | None = None,
                 threads: int | None = None, devices: list[str] | None = None,
                 max_request_memory: float | None = None, backend: Backend | None = None,
                 verbose: bool = False,
                 label: str | None = None, atoms: Any = None, directory: str = ".",
                 **client_options: Any) -> None:
        """See the class docstring: ``MlipdCalculator(endpoint)``,
        ``MlipdCalculator(model=NAME, ...)`` or ``MlipdCalculator(backend=...)``."""
        self.verbose = verbose
        super().__init__(label=label, atoms=atoms, directory=directory)
        if sum(x is not None for x in (endpoint, model, backend)) != 1:
            raise CalculatorSetupError("give either an endpoint, model=NAME or backend= "
                                       "(exactly one)")
        engine_options = {"device": device, "dtype": dtype, "ranks": ranks,
                          "threads": threads, "devices": devices,
                          "max_request_memory": max_request_memory}
        given = sorted(k for k, v in engine_options.items() if v is not None)
        if model is None and given:
            raise CalculatorSetupError(f"{', '.join(given)}: engine options, for model= only")
        if model is not None and client_options:
            raise CalculatorSetupError(f"{', '.join(sorted(client_options))}: options of a "
                                       "server's client, not of model=")
        if backend is not None and client_options:
            raise CalculatorSetupError(f"{', '.join(sorted(client_options))}: unknown options")
        self._owned = backend is None
        if endpoint is not None:
            from mlipd.client import Client

            backend = Client(endpoint, **client_options)
        elif model is not None:
            from mlipd.engine.api import describe, make_engine
            from mlipd.engine.guards import Limits

            # the memory budget of mlipd.engine.budget, as in `mlipd serve`
            limits = Limits(max_request_memory=max_request_memory)
            with quieted(not verbose):
                engine = make_engine(model, device=device or "auto", dtype=dtype,
                                     ranks=ranks or 1, threads=threads, devices=devices,
                                     limits=limits)
            log.info("engine in this process: %s", describe(engine))
            backend = EngineBackend(engine)
        self.backend = backend

    @property
    def engine(self):
        """The engine this calculator runs in this process (``model=``), else None."""
        return self.backend.engine if isinstance(self.backend, EngineBackend) else None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        structure = check_atoms(self.atoms)
        periodic = bool(self.atoms.pbc.all())
        if "stress" in properties and not periodic:
            raise CalculatorSetupError("stress needs a cell periodic in all three directions")
        with quieted(not self.verbose):
            result = self.backend.compute(structure, virial=periodic)
        self.results = {"energy": result.energy, "free_energy": result.energy,
                        "forces": np.array(result.forces)}
        if result.virial is not None and periodic:
            volume = self.atoms.get_volume()
            self.results["stress"] = full_3x3_to_voigt_6_stress(-result.virial / volume)
        if result.energies is not None:  # per atom (ASE's "energies")
            self.results["energies"] = np.array(result.energies)
        for name, value in result.extras.items():  # e.g. magmoms, per atom
            self.results[name] = np.asarray(value)

    def close(self) -> None:
        """Close the client or engine this calculator made (not a backend passed in)."""
        if self._owned:
            self.backend.close()

    def __enter__(self) -> MlipdCalculator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_atoms(atoms: Any) -> Structure:
    """Refuse what no engine can compute, before any engine or network call."""
    if atoms is None or len(atoms) == 0:
        raise CalculatorSetupError("no atoms to compute")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    lengths = atoms.cell.lengths()
    if np.any(pbc & (lengths == 0)):
        raise CalculatorSetupError("periodic direction with a zero-length cell vector")
    if pbc.any() and atoms.cell.rank < 3 and pbc.all():
        raise CalculatorSetupError("periodic cell is degenerate (zero volume)")
    return Structure.from_atoms(atoms)
