"""``MlipdCalculator(model=...)``: the engine in the calling process, the same numbers as
over ``mlipd serve`` and as the model package's own calculator, one engine call per
structure whatever ASE asks for first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.calculator import CalculatorSetupError
from ase.stress import voigt_6_to_full_3x3_stress
from chgnet.model.dynamics import CHGNetCalculator
from helpers.float32_bounds import float32_bounds
from test_chgnet import oxide, triclinic

from mlipd.calculator import MlipdCalculator
from mlipd.client import Client
from mlipd.errors import ServerUnavailable
from mlipd.models.chgnet import CHGNetModel, load_chgnet
from mlipd.models.registry import load_model
from mlipd.server.testing import running_server
from mlipd.testing import tolerances as tol
from mlipd.types import Result, Structure

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_torch_thread")]

REFERENCE = "reference:layers=2"  # cheap, any species, several layers: halo exchanges at P = 2


@pytest.fixture(scope="module")
def in_process():
    with MlipdCalculator(model="chgnet") as calc:  # the defaults: auto device, float32
        yield calc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "serve.log"
    with running_server(["--model", "chgnet", "--zmq", "tcp://127.0.0.1:0"], log=log) as srv:
        yield srv


def everything(calc, atoms, order):
    """Energy, forces, stress and magmoms, asked for in ``order``."""
    atoms = atoms.copy()
    atoms.calc = calc
    getters = {"energy": atoms.get_potential_energy, "forces": atoms.get_forces,
               "stress": atoms.get_stress, "magmoms": atoms.get_magnetic_moments}
    return {name: getters[name]() for name in order}


ORDER = ("forces", "stress", "energy", "magmoms")


@pytest.mark.parametrize("make", [oxide, triclinic], ids=["oxide64", "triclinic"])
def test_equals_server_and_package(in_process, server, make):
    """The defaults (CHGNet, float32) against the server path and CHGNet's own
    calculator, within the derived float32 bounds of tests/test_chgnet.py."""
    atoms = make()
    ours = everything(in_process, atoms, ORDER)
    with MlipdCalculator(server.address) as remote:
        served = everything(remote, atoms, ORDER)
    package = everything(CHGNetCalculator(model=load_chgnet(), use_device="cpu",
                                          on_isolated_atoms="ignore"), atoms, ORDER)
    # bounds of tests/test_chgnet.py (``mlipd.testing.tolerances``): ours and the
    # server's are two float32 runs of one engine (other threads, other summation
    # orders), each within the float32-arithmetic bound of the float64 result; the
    # package adds its float32 geometry; the stress through the virial here rounds 4
    # more times in float64
    b = float32_bounds(CHGNetModel(), atoms, extras_scale={"magmoms": 1.0})
    s = b.structure
    extra = tol.proportional(b.exact, s, tol.roundings(4))
    ours, served, package = (as_result(r, atoms) for r in (ours, served, package))
    ratios = {"served": tol.assert_within(ours, served, s, b.ours + b.ours + extra, "served"),
              "package": tol.assert_within(ours, package, s, b.ours + b.package + extra,
                                           "package")}
    print(f"{make.__name__}: error / bound", {k: {q: f"{x:.2g}" for q, x in v.items()}
                                              for k, v in ratios.items()})


def as_result(got: dict, atoms) -> Result:
    """``everything``'s answers as a ``Result`` (the virial from ASE's stress)."""
    virial = -np.asarray(got["stress"]) * atoms.get_volume() if "stress" in got else None
    if virial is not None and virial.shape == (6,):
        virial = voigt_6_to_full_3x3_stress(virial)
    extras = {"magmoms": got["magmoms"]} if "magmoms" in got else {}
    return Result(energy=got["energy"], forces=got["forces"], virial=virial, extras=extras)


@pytest.mark.parametrize(("order", "seed"), [(ORDER, 7),
                                             (("stress", "magmoms", "forces", "energy"), 8)])
def test_one_engine_call_per_structure(in_process, server, order, seed):
    """Whatever ASE asks first, one engine call answers everything (engine counter in
    process, the server's engine_calls over the wire). A new structure each time: ASE
    answers a structure it has just computed from its cache."""
    atoms = oxide((1, 1, 1), seed=seed)
    before = in_process.engine.calls
    everything(in_process, atoms, order)
    assert in_process.engine.calls - before == 1
    with Client(server.address) as client, MlipdCalculator(server.address) as remote:
        before = client.stats()["engine_calls"]
        everything(remote, atoms, order)
        assert client.stats()["engine_calls"] - before == 1


def test_molecule_forces_without_stress(in_process):
    atoms = molecule("H2O")
    atoms.calc = in_process
    assert atoms.get_forces().shape == (3, 3)
    assert "stress" not in in_process.results
    with pytest.raises(CalculatorSetupError, match="periodic"):
        atoms.get_stress()


def test_ranks_2_in_process_equals_one_rank():
    """``ranks=2``: a rank process is spawned as for ``mlipd serve --ranks 2``; the
    results equal one rank's, and this process gets its thread count back at close."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=2)
    threads = torch.get_num_threads()
    with MlipdCalculator(model=REFERENCE, dtype="float64") as one:
        ref = everything(one, atoms, ("forces", "stress", "energy"))
    with MlipdCalculator(model=REFERENCE, dtype="float64", ranks=2, threads=1) as two:
        assert two.engine.world_size == 2
        assert torch.get_num_threads() == 1  # rank 0's share
        got = everything(two, atoms, ("forces", "stress", "energy"))
        assert two.engine.calls == 1
        assert (two.engine.last_stats[:, 2] > 0).all()  # both ranks had a halo: real exchange
    assert torch.get_num_threads() == threads
    # two float64 runs of one model (``tol.float64``), the stress through the virial
    # here (4 roundings)
    s = Structure.from_atoms(atoms)
    got, ref = as_result(got, atoms), as_result(ref, atoms)
    spec = load_model(REFERENCE).spec
    bound = (tol.float64(ref, s, spec.cutoff, layers=spec.n_layers)
             + tol.proportional(ref, s, tol.roundings(4)))
    ratios = tol.assert_within(got, ref, s, bound, "P = 2")
    print("P = 2 in process: error / bound", {k: f"{v:.2g}" for k, v in ratios.items()})


def test_options_go_where_they_belong():
    with pytest.raises(CalculatorSetupError, match="either"):
        MlipdCalculator()
    with pytest.raises(CalculatorSetupError, match="either"):
        MlipdCalculator("tcp://127.0.0.1:9", model="lj")
    with pytest.raises(CalculatorSetupError, match="timeout_s: options of a server's client"):
        MlipdCalculator(model="lj", timeout_s=3)
    with pytest.raises(CalculatorSetupError, match="device, ranks: engine options"):
        MlipdCalculator("tcp://127.0.0.1:9", device="cpu", ranks=2)
    # endpoint options go to mlipd.client.Client as they are: with nothing listening on
    # port 9, a short connect timeout fails fast and names the endpoint
    with pytest.raises(ServerUnavailable, match=r"127\.0\.0\.1:9"):
        MlipdCalculator("tcp://127.0.0.1:9", connect_timeout_s=0.5)
    with pytest.raises(TypeError, match="bogus"):
        MlipdCalculator("tcp://127.0.0.1:9", bogus=1)


def test_a_dense_structure_is_refused_by_the_memory_budget_before_allocating():
    """The in-process engine holds the same budget as `mlipd serve`
    (``mlipd.engine.budget``): 512 argon atoms 0.5 Å apart in a 4 Å cell (LJ's exact
    estimate ~5 GiB: 1.0e7 edges) are ``too_large`` against 64 MiB, from the estimate,
    with no model call; a sane structure is computed next, by the same engine."""
    from ase import Atoms

    from mlipd.errors import TooLarge

    grid = 0.5 * np.stack(np.meshgrid(*[np.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)
    dense = Atoms("Ar512", positions=grid, cell=np.eye(3) * 4.0, pbc=True)
    with MlipdCalculator(model="lj", dtype="float64", max_request_memory=64 << 20) as calc:
        dense.calc = calc
        with pytest.raises(TooLarge, match=r"estimated memory .* GiB .*budget 0\.0625 GiB"):
            dense.get_potential_energy()
        assert calc.engine.last_stats is None  # no step ran: refused before the model
        sane = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2)
        sane.calc = calc
        assert np.isfinite(sane.get_potential_energy())
    with pytest.raises(CalculatorSetupError, match="max_request_memory: engine options"):
        MlipdCalculator("tcp://127.0.0.1:9", max_request_memory=1 << 30)
