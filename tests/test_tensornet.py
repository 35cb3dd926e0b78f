"""TensorNet (matgl, PyG backend) on mlipd's engine against matgl's own PESCalculator.

Models are small, randomly initialised real matgl ``TensorNet``s inside a
``Potential`` (no weights can be downloaded here), evaluated in float64.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace

import matgl
import numpy as np
import pytest
import torch
from matgl.apps.pes import Potential
from matgl.ext.ase import PESCalculator
from matgl.models import TensorNet
from model_cases import (
    as_structures,
    bulk_box,
    check_distributed,
    check_float32,
    compare_to_ase,
    four_cases,
    molecule,
    slab,
    small_triclinic,
)
from torch._dynamo.utils import counters  # torch's own count of compiled graphs

from mlipd.engine.single_rank import SingleRankEngine
from mlipd.errors import SetupError
from mlipd.models.registry import load_model
from mlipd.models.tensornet import TensorNetModel
from mlipd.testing import check_zero_redundancy, tolerances
from mlipd.testing.hostreads import warm_step_reads
from mlipd.testing.work import measure_runs
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(300)
warnings.filterwarnings("ignore", category=UserWarning)

ELEMENTS = ("H", "C", "O", "Si")
ZS = [1, 6, 8, 14]


@pytest.fixture(autouse=True, scope="module")
def _matgl_float64():
    # matgl builds its reference graphs (positions, offsets) in matgl.float_th
    # (it also sets torch's process-wide default dtype: restore all three afterwards)
    before = matgl.float_th, matgl.float_np, torch.get_default_dtype()
    matgl.set_default_dtype("float", 64)
    yield
    matgl.float_th, matgl.float_np, default = before
    torch.set_default_dtype(default)


def build_potential(*, refs: bool = True, group: str = "O(3)", nblocks: int = 2,
                    seed: int = 0, **kw) -> Potential:
    torch.manual_seed(seed)
    net = TensorNet(element_types=ELEMENTS, units=16, nblocks=nblocks, num_rbf=8, cutoff=4.0,
                    is_intensive=False, equivariance_invariance_group=group,
                    dtype=torch.float64, use_warp=False, **kw)
    return Potential(model=net, data_mean=0.7, data_std=1.3,
                     element_refs=np.array([-1.0, -2.0, -3.0, -4.0]) if refs else None
                     ).double().eval()


def reference(potential, atoms):
    a = atoms.copy()
    a.calc = PESCalculator(potential, stress_unit="eV/A3")
    return a


def cases():
    # matgl's Atoms2Graph treats mixed periodicity as none, so no slab here (slabs are
    # covered against P = 1 below)
    return {"compressed": bulk_box(ZS, reps=2, a=4.3, seed=5), "triclinic": small_triclinic(ZS),
            "molecule": molecule(ZS)}


@pytest.mark.parametrize("variant", [
    dict(),
    dict(refs=False, group="SO(3)", nblocks=3),
    dict(rbf_type="SphericalBessel", use_smooth=True, max_n=4),
], ids=["O3-refs", "SO3-norefs-3blocks", "bessel"])
def test_equals_pes_calculator(variant):
    pot = build_potential(**variant)
    engine = SingleRankEngine(TensorNetModel(potential=pot))
    for name, atoms in cases().items():
        (got,) = engine.compute([Structure.from_atoms(atoms)])
        compare_to_ase(got, reference(pot, atoms), engine)
        assert (got.virial is None) == (name == "molecule")


def test_open_slab_equals_periodic_slab_with_vacuum():
    """matgl's calculator treats a slab (pbc T, T, F) as a molecule, so mlipd's open slab is
    compared with matgl on the same slab periodic in z: its 10 Å of vacuum exceed the 4 Å
    cutoff, so no edge crosses it and the two are the same physics."""
    pot = build_potential()
    atoms = slab(ZS)
    periodic = atoms.copy()
    periodic.pbc = True
    engine = SingleRankEngine(TensorNetModel(potential=pot))
    (got,) = engine.compute([Structure.from_atoms(atoms)])
    assert got.virial is None  # mlipd has no stress for a slab
    compare_to_ase(got, reference(pot, periodic), engine)


def test_compiled_step_equals_the_eager_step(one_torch_thread):
    """``compile=1`` with TensorNet (plain torch, no host read in its forward): compiled,
    not run eagerly, and equal to the eager step to float64 round-off across the first
    call, a reused list and a rebuild. One periodic cell only: each new variant of the
    step compiles anew (a cluster after it took ~1 min on a 2-core CPU)."""
    eager, compiled = (SingleRankEngine(TensorNetModel(potential=build_potential()),
                                        dtype=torch.float64, compile=c) for c in ("0", "1"))
    graphs = counters["stats"]["unique_graphs"]
    s = Structure.from_atoms(small_triclinic(ZS))
    spec = compiled.model.spec
    rng = np.random.default_rng(7)
    for scale in (0.0, 0.02, 0.4):
        moved = replace(s, positions=s.positions + rng.normal(scale=scale, size=(s.n_atoms, 3)))
        (got,), (ref,) = compiled.compute([moved]), eager.compute([moved])
        bounds = tolerances.float64(ref, moved, spec.cutoff, layers=spec.n_layers)
        tolerances.assert_within(got, ref, moved, bounds, "compiled vs eager")
    assert compiled.step.compiled.failed is None
    assert counters["stats"]["unique_graphs"] > graphs  # compiled, not run eagerly
    assert compiled.rebuilds == eager.rebuilds == 2

def test_model_directory_through_registry(tmp_path):
    pot = build_potential()
    pot.save(tmp_path / "tn")
    loaded = load_model(f"tensornet:{tmp_path / 'tn'}")
    assert isinstance(loaded, TensorNetModel)
    assert loaded.spec.species == frozenset(ZS)
    assert loaded.spec.cutoff == 4.0
    atoms = small_triclinic(ZS)
    engine = SingleRankEngine(loaded)
    (got,) = engine.compute([Structure.from_atoms(atoms)])
    compare_to_ase(got, reference(pot, atoms), engine)


def test_unsupported_models_are_refused(tmp_path):
    with pytest.raises(SetupError, match="no matgl model directory"):
        load_model(f"tensornet:{tmp_path / 'nothing'}")
    with pytest.raises(ValueError, match="intensive"):
        TensorNetModel(potential=Potential(model=TensorNet(element_types=ELEMENTS, units=8,
                                                           is_intensive=True, use_warp=False)))
    with pytest.raises(ValueError, match="calc_repuls"):
        TensorNetModel(potential=Potential(model=TensorNet(element_types=ELEMENTS, units=8,
                                                           is_intensive=False, use_warp=False),
                                           calc_repuls=True))


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow),
                                   pytest.param(3, marks=pytest.mark.slow),
                                   pytest.param(4, marks=pytest.mark.slow)])
def test_distributed_equals_single(tmp_path, ranks):
    """The product path (``DistributedEngine`` from a model directory, mixed batches); P in
    {2, 4, 8} run by default through ``test_ranks_zero_redundancy_and_results``."""
    pot = build_potential()
    pot.save(tmp_path / "tn")
    check_distributed(f"tensornet:{tmp_path / 'tn'}", TensorNetModel(potential=pot), ranks,
                      four_cases(ZS))


# --- P in {2, 4, 8}: zero redundancy by measured work, results equal to P = 1 ----------------
SMALL = {"bulk": lambda: bulk_box(ZS, reps=3), "slab": lambda: slab(ZS),
         "triclinic": lambda: small_triclinic(ZS), "molecule": lambda: molecule(ZS)}


F64, F32 = torch.float64, torch.float32


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """The model's factory, the small structures, and every run in one spawn of 8 ranks:
    P = 1, 2, 4, 8 (float64) and float32 at P = 2."""
    path = tmp_path_factory.mktemp("tn") / "tn"
    build_potential().save(path)
    factory = functools.partial(TensorNetModel, str(path))
    structures = as_structures({k: make() for k, make in SMALL.items()})
    runs = [(1, F64), (2, F64), (4, F64), (8, F64), (2, F32)]
    return factory, structures, measure_runs(factory, list(structures.values()), runs)


# Elements and FLOPs exact per op, forward and backward, up to: what every rank reads
# whatever it holds (measured on the ranks the 3-atom cell leaves without atoms): the
# weights (mm, addmm, the layer norms), the radial basis' centres (sub), the identity
# matrix the parts are rebuilt with (mul) and the constant index vectors that pack and
# spread them (index, index_put, index_add, index_select, repeat_interleave); and per
# halo row: autograd's sum of the halo positions' gradients (read as senders: add, 9 a
# row) and the halo atoms' species looked up for the embedding's messages (take, 3 a
# row: a table lookup in place of an exchange). No FLOPs on halo rows.
TENSORNET_DECLARED = dict(
    per_rank=("mm", "addmm", "native_layer_norm", "native_layer_norm_backward", "sub", "mul",
              "index", "index_put", "index_add", "index_select", "repeat_interleave"),
    per_halo_row={"add": 9, "take": 3},
    reason="weights and constant tensors read once per rank; autograd's sum of the halo "
           "positions' gradients; the halo atoms' species looked up")


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_ranks_zero_redundancy_and_results(small_runs, ranks):
    """Work summed over ranks equals P = 1's per op (embedding and layers on owned atoms
    only, each edge once, forward and backward), every exchange moves exactly the halo
    rows, and the results equal P = 1's to float64 round-off (``check_zero_redundancy``);
    at P = 2 float32 is within the derived float32 bounds."""
    factory, structures, runs = small_runs
    layers = 2  # build_potential's nblocks: one exchange of the senders' parts each
    got = check_zero_redundancy(factory, structures, (ranks,), runs=runs,
                                **TENSORNET_DECLARED)
    for m in got[(ranks, F64)]:
        assert all(w.atom_exchanges == layers for w in m.work)
    if ranks == 2:
        print("TensorNet P = 2 float32 error / bound:",
              check_float32(factory, structures, 2, runs=runs))


def small_tensornet() -> TensorNetModel:
    """A factory importable by rank processes."""
    return TensorNetModel(potential=build_potential())


@pytest.mark.parametrize("ranks", [1, 2])
def test_warm_step_reads_nothing_back(ranks):
    """A warm step of 64-atom Si makes no data-dependent host read."""
    s = Structure.from_atoms(bulk_box([14], reps=2))
    for reads in warm_step_reads(small_tensornet, s, ranks):
        assert reads.total == 0, reads.report()
