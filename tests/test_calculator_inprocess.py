"""``MlipdCalculator(model=...)``: the engine in the calling process, the same numbers as
over ``mlipd serve`` and as the model package's own calculator, one engine call per
structure whatever ASE asks for first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.calculator import CalculatorSetupError
from chgnet.model.dynamics import CHGNetCalculator
from test_chgnet import oxide, triclinic

from mlipd.calculator import MlipdCalculator
from mlipd.client import Client
from mlipd.errors import ServerUnavailable
from mlipd.models.chgnet import load_chgnet
from mlipd.server.testing import running_server

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
    calculator, at the float32 tolerances of tests/test_chgnet.py."""
    atoms = make()
    n = len(atoms)
    ours = everything(in_process, atoms, ORDER)
    with MlipdCalculator(server.address) as remote:
        served = everything(remote, atoms, ORDER)
    package = everything(CHGNetCalculator(model=load_chgnet(), use_device="cpu",
                                          on_isolated_atoms="ignore"), atoms, ORDER)
    # same engine, same code: equal up to float32 summation order (threads)
    assert abs(ours["energy"] - served["energy"]) / n < 1e-7
    np.testing.assert_allclose(ours["forces"], served["forces"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours["stress"], served["stress"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours["magmoms"], served["magmoms"], rtol=0, atol=1e-6)
    # the package: 1e-6 eV/atom, 1e-4 eV/Å
    assert abs(ours["energy"] - package["energy"]) / n < 1e-6
    np.testing.assert_allclose(ours["forces"], package["forces"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours["stress"], package["stress"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours["magmoms"], package["magmoms"], rtol=0, atol=1e-5)


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
    assert got["energy"] == pytest.approx(ref["energy"], rel=1e-12)
    np.testing.assert_allclose(got["forces"], ref["forces"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(got["stress"], ref["stress"], rtol=0, atol=1e-12)


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
