"""TensorNet (matgl, PyG backend) on mlipd's engine against matgl's own PESCalculator.

Models are small, randomly initialised real matgl ``TensorNet``s inside a
``Potential`` (no weights can be downloaded here), evaluated in float64.
"""

from __future__ import annotations

import warnings

import matgl
import numpy as np
import pytest
import torch
from matgl.apps.pes import Potential
from matgl.ext.ase import PESCalculator
from matgl.models import TensorNet
from model_cases import (
    bulk_box,
    check_distributed,
    compare_to_ase,
    four_cases,
    molecule,
    small_triclinic,
)

from mlipd.engine.local import LocalEngine
from mlipd.errors import SetupError
from mlipd.models.registry import load_model
from mlipd.models.tensornet import TensorNetModel
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
    engine = LocalEngine(TensorNetModel(potential=pot))
    for name, atoms in cases().items():
        (got,) = engine.compute([Structure.from_atoms(atoms)])
        compare_to_ase(got, reference(pot, atoms), rtol=1e-8)
        assert (got.virial is None) == (name == "molecule")


def test_model_directory_through_registry(tmp_path):
    pot = build_potential()
    pot.save(tmp_path / "tn")
    loaded = load_model(f"tensornet:{tmp_path / 'tn'}")
    assert isinstance(loaded, TensorNetModel)
    assert loaded.spec.species == frozenset(ZS)
    assert loaded.spec.cutoff == 4.0
    atoms = small_triclinic(ZS)
    (got,) = LocalEngine(loaded).compute([Structure.from_atoms(atoms)])
    compare_to_ase(got, reference(pot, atoms), rtol=1e-8)


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


@pytest.mark.parametrize("ranks", [1, 2, pytest.param(3, marks=pytest.mark.slow),
                                   pytest.param(4, marks=pytest.mark.slow)])
def test_distributed_equals_single(tmp_path, ranks):
    pot = build_potential()
    pot.save(tmp_path / "tn")
    check_distributed(f"tensornet:{tmp_path / 'tn'}", TensorNetModel(potential=pot), ranks,
                      four_cases(ZS))
