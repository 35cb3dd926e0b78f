"""``compile=1`` (``mlipd.engine.compiled``): the step's model, forces and virial as one
``torch.compile``d function give the eager step's results to float64 round-off (one
periodic structure, a batch, a cluster; a pair model and a message-passing one), keep
giving them when positions move, lists are rebuilt and sizes change; a model
``torch.compile`` cannot run falls back to the eager step once, with a warning; a bad
input raises its own error without giving compiling up; what cannot be compiled is
refused at set-up."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters  # torch's own count of compiled graphs

from mlipd.engine import make_engine
from mlipd.engine.single_rank import SingleRankEngine
from mlipd.errors import CalculationFailed, SetupError
from mlipd.models.lj import LennardJones
from mlipd.models.reference import ReferenceMP
from mlipd.testing import tolerances
from mlipd.testing.systems import molecule, slab, small_triclinic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODELS = {  # small graphs: each compiles in a few seconds
    "lj": lambda: LennardJones(cutoff=5.0),
    "reference": lambda: ReferenceMP("layers=2,features=8,cutoff=4.5"),
}


def engines(make_model):
    """(eager, compiled) float64 engines of two instances of one model."""
    return (SingleRankEngine(make_model(), dtype=torch.float64),
            SingleRankEngine(make_model(), dtype=torch.float64, compile="1"))


def assert_round_off(got, ref, structures, model):
    for g, r, s in zip(got, ref, structures, strict=True):
        bounds = tolerances.float64(r, s, model.spec.cutoff,
                                    layers=max(int(model.spec.n_layers or 1), 1))
        tolerances.assert_within(g, r, s, bounds, "compiled vs eager")


def moved(s, seed: int, scale: float):
    rng = np.random.default_rng(seed)
    return replace(s, positions=s.positions + rng.normal(scale=scale, size=s.positions.shape))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_step_equals_the_eager_step(name):
    eager, compiled = engines(MODELS[name])
    graphs = counters["stats"]["unique_graphs"]
    batches = {"periodic": [small_triclinic()], "cluster": [molecule()],
               "batch": [slab(), small_triclinic()]}
    for what, batch in batches.items():
        # first call (compiles), a small move (the list reused), a large one (rebuilt)
        for step, scale in enumerate((0.0, 0.02, 0.4)):
            structures = [moved(s, step, scale) for s in batch]
            got = compiled.compute(structures)
            assert_round_off(got, eager.compute(structures), structures, compiled.model)
        assert compiled.step.compiled.failed is None, what
    assert counters["stats"]["unique_graphs"] > graphs  # compiled, not run eagerly
    assert compiled.rebuilds == eager.rebuilds >= 2 * len(batches)


class HostReadLJ(LennardJones):
    """LJ that copies the positions to the host in its forward, as a model that logs or
    checks them might: fine eagerly, impossible on the tensors torch.func traces."""

    def forward(self, graph):
        self.seen = graph.positions.detach().cpu().numpy().copy()
        return super().forward(graph)


def test_a_model_compile_cannot_run_falls_back_to_the_eager_step_once(caplog):
    eager, compiled = engines(lambda: HostReadLJ(cutoff=5.0))
    s = small_triclinic()
    with caplog.at_level(logging.WARNING, logger="mlipd.engine.compiled"):
        for step in range(3):
            structures = [moved(s, step, 0.02)]
            got, ref = compiled.compute(structures)[0], eager.compute(structures)[0]
            # the eager step of the same model on the same input: the same bits
            assert got.energy == ref.energy
            assert np.array_equal(got.forces, ref.forces)
            assert np.array_equal(got.virial, ref.virial)
    assert "TensorWrapper" in compiled.step.compiled.failed
    warnings = [r for r in caplog.records if "runs eagerly from now on" in r.getMessage()]
    assert len(warnings) == 1


class PickyLJ(LennardJones):
    """LJ that refuses batches of more than 100 atoms (a bad input, for this model)."""

    def forward(self, graph):
        if graph.n_owned > 100:
            raise ValueError(f"{graph.n_owned} atoms: at most 100")
        return super().forward(graph)


def test_a_bad_input_raises_its_own_error_and_the_step_stays_compiled():
    _, compiled = engines(lambda: PickyLJ(cutoff=5.0))
    small, large = molecule(), slab()
    assert small.n_atoms <= 100 < large.n_atoms
    compiled.compute([small])
    with pytest.raises(CalculationFailed, match="at most 100"):
        compiled.compute([large])
    assert compiled.step.compiled.failed is None
    compiled.compute([moved(small, 1, 0.4)])  # a rebuild: the compiled step again
    assert compiled.step.compiled.failed is None


def test_what_cannot_be_compiled_is_refused_at_set_up():
    with pytest.raises(SetupError, match="one rank"):
        make_engine("lj", ranks=2, compile="1")
    with pytest.raises(SetupError, match="whole-structure"):
        make_engine("ase:ase.calculators.emt:EMT", compile="1")
    with pytest.raises(SetupError, match="expected one of"):
        make_engine("lj", compile="yes")
    with pytest.raises(SetupError, match="pick one"):
        make_engine("lj", compile="1", cuda_graphs="1")


def test_one_structure_compiles_with_several_threads():
    """Inductor's parallel code for an index_add into a single slot failed to generate
    (atomic_add into [1]) and the step fell back to eager on any multi-threaded CPU."""
    eager, compiled = engines(MODELS["lj"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        structures = [small_triclinic()]
        got = compiled.compute(structures)
    finally:
        torch.set_num_threads(before)
    assert compiled.step.compiled.failed is None
    assert_round_off(got, eager.compute(structures), structures, compiled.model)
