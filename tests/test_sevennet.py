"""SevenNet (sevenn) through mlipd, with the pretrained weights that ship in the sevenn wheel.

References are sevenn's own: its ASE calculator (float32, as sevenn runs), and in float64
its own modules run in its own order on its own graph (``sevenn_float64``). Runs in the
e3nn>=0.5 environment (``.venv-e3nn``, see scripts/setup.sh).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from functools import cache

import numpy as np
import pytest
import sevenn._keys as KEY
import sevenn.util
import torch
from ase import Atoms
from model_cases import (
    as_structures,
    bulk_box,
    check_distributed,
    check_float32,
    float64_bound,
    four_cases,
    molecule,
    rel,
    slab,
    small_triclinic,
)
from sevenn.atom_graph_data import AtomGraphData
from sevenn.calculator import SevenNetCalculator
from sevenn.train.dataload import unlabeled_atoms_to_graph

from mlipd.bench.systems import oxide
from mlipd.engine.single_rank import SingleRankEngine
from mlipd.errors import ModelUnavailable
from mlipd.models import caches
from mlipd.models.pretrained import sevennet_checkpoint
from mlipd.models.registry import load_model
from mlipd.models.sevennet import SevenNetModel
from mlipd.testing import check_zero_redundancy
from mlipd.testing import tolerances as tol
from mlipd.testing.hostreads import warm_step_reads
from mlipd.testing.work import measure_runs
from mlipd.types import Result, Structure

pytestmark = [pytest.mark.e3nn, pytest.mark.timeout(600)]
warnings.filterwarnings("ignore", category=UserWarning)

ZS = (8, 12, 25, 28)  # O, Mg, Mn, Ni


def cases() -> dict[str, Atoms]:
    return {"oxide": oxide(64), "slab": slab(ZS), "triclinic": small_triclinic(ZS),
            "molecule": molecule(ZS)}


@cache
def calculator(name: str = "7net-0", modal: str | None = None) -> SevenNetCalculator:
    return SevenNetCalculator(name, device="cpu", modal=modal)


@cache
def adapter(name: str = "7net-0", modal: str | None = None) -> SevenNetModel:
    return SevenNetModel(name if modal is None else f"{name},modal={modal}")


@cache
def adapter64() -> SevenNetModel:
    """SevenNet-0 in float64, its own copy (sevenn_float64 runs its modules directly)."""
    return SevenNetModel("7net-0").double()


def sevenn_float64(model, atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray]:
    """sevenn's modules in sevenn's order on sevenn's graph, in float64: (energy eV,
    forces eV/Å, stress eV/Å³ 3x3, ASE sign). Only the one-hot embedding, which sevenn
    always makes float32, is cast (sevenn's AtomGraphData is float32 otherwise)."""
    raw = unlabeled_atoms_to_graph(atoms, model.cutoff)
    data = AtomGraphData(**{k: sevenn.util.dtype_correct(v, torch.float64)
                            for k, v in raw.items()})
    model.set_is_batch_data(False)
    data = model._preprocess(data)
    for name, module in model._modules.items():
        data = module(data)
        if name == "onehot_idx_to_onehot":
            data[KEY.NODE_FEATURE] = data[KEY.NODE_FEATURE].double()
            data[KEY.NODE_ATTR] = data[KEY.NODE_ATTR].double()
    model.set_is_batch_data(True)
    xx, yy, zz, xy, yz, zx = (-data[KEY.PRED_STRESS]).detach().numpy()
    stress = np.array([[xx, xy, zx], [xy, yy, yz], [zx, yz, zz]])
    return (data[KEY.PRED_TOTAL_ENERGY].item(), data[KEY.PRED_FORCE].detach().numpy(),
            stress)


def test_names_resolve_as_sevenn_does():
    """mlipd's table of sevenn's names is sevenn's; every spelling sevenn accepts for a
    shipped model gives sevenn's own file."""
    from sevenn import _const

    assert set(caches.SEVENNET_FILES) == set(sevenn.util.get_available_pretrained_models())
    for name, rel_path in caches.SEVENNET_FILES.items():
        const = {v: k for k, v in vars(_const).items() if isinstance(v, str)}
        assert f"{_const._prefix}/{rel_path}" in const, name
    for name in ("7net-0", "SevenNet-0", "sevennet-0_11Jul2024", "7net-l3i5", "7net-mf-0",
                 "7net-0_22may2024"):
        assert sevennet_checkpoint(name) == sevennet_checkpoint(name, offline=True)
        assert str(sevennet_checkpoint(name)) == sevenn.util.pretrained_name_to_path(name)
    shipped = {f.name for f in caches.sevennet_files() if f.present and f.url is None}
    assert shipped == set(caches.SEVENNET_BUNDLED)


def test_missing_download_fails_at_once(monkeypatch, tmp_path):
    """A name sevenn would download: with offline=1, or no route to the host, a one-line
    error names the file and the folder (no download, no wait)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelUnavailable, match=r"checkpoint_sevennet_omat\.pth is not in .*"
                       r"\.cache/sevennet.*offline=1") as info:
        load_model("sevennet:7net-omat,offline=1")
    # where sevenn's pretrained_name_to_path looks (issue 25 item 8)
    saved = tmp_path / ".cache/sevennet/SevenNet_omat/checkpoint_sevennet_omat.pth"
    assert str(info.value).endswith(f"and save it as {saved}")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # nothing listens: refused
    with pytest.raises(ModelUnavailable, match="cannot be reached"):
        load_model("sevennet:7net-omat")
    with pytest.raises(ModelUnavailable, match="unknown name"):
        load_model("sevennet:8net-0")


@pytest.mark.parametrize("name", ["oxide", "slab", "triclinic", "molecule"])
def test_sevennet0_equals_sevenn_calculator_float32(name):
    """SevenNet-0 pretrained, float32 (mlipd's default) against sevenn's own ASE
    calculator (float32, its geometry too), within the sum of both sides' bounds of
    ``mlipd.testing.tolerances`` (sevenn's: float32 arithmetic plus its float32
    geometry, with the stiffness measured in float64)."""
    atoms = cases()[name]
    s = Structure.from_atoms(atoms)
    (got,) = SingleRankEngine(adapter(), dtype=torch.float32).compute([s])
    engine64 = SingleRankEngine(adapter64(), dtype=torch.float64)
    (exact,) = engine64.compute([s])
    ref = atoms.copy()
    ref.calc = calculator()
    theirs = Result(energy=ref.get_potential_energy(), forces=ref.get_forces(),
                    virial=(-ref.get_stress(voigt=False) * atoms.get_volume()
                            if atoms.pbc.all() else None))
    cutoff, layers = adapter().spec.cutoff, adapter().spec.n_layers

    def forces_at(positions):
        return engine64.compute([dataclasses.replace(s, positions=positions)])[0].forces

    ours_bound = tol.arithmetic(exact, s, cutoff, layers=layers)
    stiff = tol.stiffness(forces_at, s.positions)
    theirs_bound = ours_bound + tol.geometry(exact, s, cutoff, stiff)
    ratios = {"ours-f64": tol.assert_within(got, exact, s, ours_bound, "ours"),
              "ours-sevenn": tol.assert_within(got, theirs, s, ours_bound + theirs_bound,
                                               "ours vs sevenn")}
    print(f"\nSevenNet {name} error / bound:", ratios)


@pytest.mark.parametrize("name", ["oxide", "slab", "triclinic", "molecule"])
def test_sevennet0_equals_sevenn_float64(name):
    """float64: sevenn's own forward in float64 (its own graph, sums in another order):
    energy and forces within the float64 bound of ``mlipd.testing.tolerances``
    (``float64_bound``)."""
    atoms = cases()[name]
    model = adapter64()
    energy, forces, stress = sevenn_float64(model.seven, atoms)
    s = Structure.from_atoms(atoms)
    engine = SingleRankEngine(model, dtype=torch.float64)
    (got,) = engine.compute([s])
    theirs = Result(energy=energy, forces=forces)
    bound = float64_bound(engine, s, got)
    ratios = tol.assert_within(dataclasses.replace(got, virial=None), theirs, s, bound, name)
    if atoms.pbc.all():
        # not yet derived: sevenn's stress differs from our virial's symmetric part by
        # 2.2e-10 eV/Å³ on the 3-atom cell, 12x the float64 bound (forces: 1e-3 of it);
        # the cause is not found, so the stress keeps its former 1e-8 relative
        assert rel(got.stress(atoms.cell.array), stress) < 1e-8
    print(f"SevenNet {name} float64 vs sevenn: error / bound",
          {k: f"{v:.2g}" for k, v in ratios.items()})


def test_multi_fidelity_needs_modal():
    """7net-mf-0 with modal=PBE equals sevenn's calculator with the same modal; R2SCAN
    differs (the modality reaches the model); no modal is a clear error."""
    atoms = cases()["oxide"]
    ref = atoms.copy()
    ref.calc = calculator("7net-mf-0", "PBE")
    s = [Structure.from_atoms(atoms)]
    (pbe,) = SingleRankEngine(adapter("7net-mf-0", "PBE"), dtype=torch.float32).compute(s)
    # float32 on both sides, sevenn's geometry float32 too: as the test above
    engine64 = SingleRankEngine(SevenNetModel("7net-mf-0,modal=PBE").double(),
                                dtype=torch.float64)  # its own copy: the cached one is float32
    (exact,) = engine64.compute(s)
    spec = engine64.model.spec
    ours = tol.arithmetic(exact, s[0], spec.cutoff, layers=spec.n_layers)
    theirs = ours + tol.geometry(exact, s[0], spec.cutoff, tol.stiffness(
        lambda x: engine64.compute([dataclasses.replace(s[0], positions=x)])[0].forces,
        s[0].positions))
    package = Result(energy=ref.get_potential_energy(), forces=ref.get_forces())
    tol.assert_within(dataclasses.replace(pbe, virial=None, extras={}), package, s[0],
                      ours + theirs, "7net-mf-0 PBE vs sevenn")
    (r2scan,) = SingleRankEngine(adapter("7net-mf-0", "R2SCAN"), dtype=torch.float32).compute(s)
    assert abs(r2scan.energy - pbe.energy) / len(atoms) > 1e-3
    with pytest.raises(ValueError, match="modal=NAME"):
        SevenNetModel(model=adapter("7net-mf-0", "PBE").seven)


# P = 4 by default (a 3-atom cell leaves a rank without atoms); 2 and 3 with -m slow
@pytest.mark.parametrize("ranks", [pytest.param(2, marks=pytest.mark.slow),
                                   pytest.param(3, marks=pytest.mark.slow), 4])
def test_distributed_equals_single(ranks, one_torch_thread):
    """float64, P ranks equal P = 1 to the derived float64 bound, every atom and edge
    owned once (the engine's counters), on a bulk box, a small triclinic cell, a slab and
    a molecule."""
    structures = {"bulk": bulk_box(ZS, reps=3), "triclinic": small_triclinic(ZS),
                  "slab": slab(ZS), "molecule": molecule(ZS)}
    check_distributed("sevennet", adapter(), ranks, structures)


@pytest.fixture(scope="module")
def measured():
    """SevenNet-0's factory, the four cases (a bulk of 64 atoms) and its runs at P = 1, 2,
    4, 8 (float64) and 4 (float32), measured in one spawn of 8 ranks."""
    factory = functools.partial(SevenNetModel, "7net-0")
    structures = as_structures(four_cases(ZS, bulk_reps=2))
    runs = [(1, torch.float64), (2, torch.float64), (4, torch.float64), (8, torch.float64),
            (4, torch.float32)]
    return factory, structures, measure_runs(factory, list(structures.values()), runs)


# Elements and FLOPs exact per op, forward and backward, up to: what every rank does
# whatever it holds (measured on the ranks the 3-atom cell leaves without atoms): e3nn
# reads and normalises its weights (mm, mul, div); per row of the species table each
# rank makes of the species among its atoms and halo (the model's ``species_rows``:
# SevenNet-0 knows 89, a rank makes the rows it needs): their one-hot codes (_to_copy,
# aminmax, scatter_), embedding and block 0's self-interaction (mm: 2 x 89 x 128 +
# 2 x 128 x 128 FLOPs a row; mul), and the unique that finds them (_unique2); per halo
# row: autograd's sum of the halo positions' gradients (add, 9 a row), the halo rows of
# block 0's input looked up in that table (index, 2 x 128 + 4: no exchange) and the
# unique's read and inverse (_unique2).
SEVENNET_DECLARED = dict(
    per_rank=("mm", "mul", "div"),
    per_counted_row={"species_rows": {"mm": (473, 55552), "mul": (434, 0),
                                      "_to_copy": (534, 0), "aminmax": (3, 0),
                                      "scatter_": (9, 0), "_unique2": (1, 0)}},
    per_halo_row={"add": 9, "index": 260, "_unique2": 2},
    reason="weights read and normalised once per rank; the species table of the species "
           "a rank holds; autograd's sum of the halo positions' gradients; halo rows "
           "looked up in the species table")


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_ranks_equal_p1_without_redundancy(measured, ranks):
    """Results equal P = 1's to float64 round-off; elements and FLOPs per op summed over
    ranks as P = 1's, forward and backward, besides the declared constants above."""
    factory, structures, runs = measured
    check_zero_redundancy(factory, structures, (ranks,), runs=runs, **SEVENNET_DECLARED)


def test_float32_on_four_ranks(measured):
    """Default precision, distributed, against float64 at P = 1."""
    factory, structures, runs = measured
    print("SevenNet P = 4 float32 error / bound:",
          check_float32(factory, structures, 4, runs=runs))


def test_drives_real_ipi(processes, short_tmp):
    """``mlipd drive --model sevennet`` against the real i-PI for 20 NVT steps: i-PI's
    forces and potential equal the engine on the positions i-PI recorded."""
    from helpers.ipi_run import check_trajectory, drive_real_ipi

    atoms = oxide(8)
    run = drive_real_ipi(processes, short_tmp, atoms, name="7n", model="sevennet",
                         temperature_k=300, timestep_fs=2.0, timeout=300)
    model = adapter()
    check_trajectory(run, atoms, SingleRankEngine(model, dtype=torch.float64).compute,
                     cutoff=model.spec.cutoff, layers=model.spec.n_layers)


@pytest.mark.parametrize("ranks", [1, 2])
def test_warm_step_reads_nothing_back(ranks):
    """A warm step of SevenNet-0 on 64-atom Si makes no data-dependent host read: the
    species present are the topology's, edges beyond the cutoff weighted out."""
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    factory = functools.partial(SevenNetModel, "7net-0")
    for reads in warm_step_reads(factory, Structure.from_atoms(atoms), ranks):
        assert reads.total == 0, reads.report()
