"""MACE / ScaleShiftMACE on mlipd's engine against mace-torch's own calculator (float64).

Models are small and randomly initialised (no weights can be downloaded here); they
are real mace-torch modules, evaluated by mace's own MACECalculator for reference.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import subprocess
import sys
import warnings

import mace  # noqa: F401  (plain imports sort first: mace before e3nn, see the adapter)
import numpy as np
import pytest
import torch
from e3nn import o3
from mace import modules
from mace.calculators import MACECalculator
from mace.modules import blocks
from model_cases import (
    as_structures,
    bulk_box,
    check_distributed,
    check_float32,
    compare_to_ase,
    four_cases,
    molecule,
    rel,
    slab,
    small_triclinic,
)

from mlipd.engine.single_rank import SingleRankEngine
from mlipd.errors import ModelUnavailable, SetupError, UnknownSpecies
from mlipd.models.mace import MaceModel
from mlipd.models.registry import load_model
from mlipd.testing import check_zero_redundancy
from mlipd.testing import tolerances as tol
from mlipd.testing.hostreads import warm_step_reads
from mlipd.testing.work import measure_runs
from mlipd.types import Result, Structure

pytestmark = pytest.mark.timeout(300)
warnings.filterwarnings("ignore", category=UserWarning)

ZS = [1, 6, 8, 14]
E0 = np.array([-1.1, -2.2, -3.3, -4.4])


def build_mace(**kw) -> torch.nn.Module:
    """A cached small random MACE (building e3nn modules is the slow part of these tests;
    the models are only evaluated, never changed)."""
    if kw.get("heads") is not None:
        kw["heads"] = tuple(kw["heads"])
    return _build_mace_cached(tuple(sorted(kw.items())))


@functools.cache
def _build_mace_cached(items: tuple) -> torch.nn.Module:
    kw = dict(items)
    if kw.get("heads") is not None:
        kw["heads"] = list(kw["heads"])
    return _build_mace(**kw)


def _build_mace(*, scale_shift: bool = True, zbl: bool = True, layers: int = 2, max_ell: int = 2,
               correlation: int = 2, hidden: str = "8x0e+8x1o",
               first: str = "RealAgnosticResidualInteractionBlock",
               inter: str = "RealAgnosticResidualInteractionBlock",
               distance_transform: str = "None", heads: list[str] | None = None,
               seed: int = 0) -> torch.nn.Module:
    """A small random MACE built under float64 (its buffers take the default dtype)."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        kw = dict(
            r_max=4.0, num_bessel=6, num_polynomial_cutoff=5, max_ell=max_ell,
            interaction_cls=modules.interaction_classes[inter],
            interaction_cls_first=modules.interaction_classes[first],
            num_interactions=layers, num_elements=len(ZS), hidden_irreps=o3.Irreps(hidden),
            MLP_irreps=o3.Irreps("8x0e"), gate=torch.nn.functional.silu,
            atomic_energies=E0 if heads is None else np.stack([E0 * (k + 1) for k in
                                                                range(len(heads))]),
            avg_num_neighbors=12.0, atomic_numbers=ZS, correlation=correlation,
            pair_repulsion=zbl, distance_transform=distance_transform, heads=heads,
        )
        if scale_shift:
            n = 1 if heads is None else len(heads)
            model = modules.ScaleShiftMACE(atomic_inter_scale=[1.7] * n if n > 1 else 1.7,
                                           atomic_inter_shift=[0.3] * n if n > 1 else 0.3, **kw)
        else:
            model = modules.MACE(**kw)
    finally:
        torch.set_default_dtype(prev)
    return model.double().eval()


def reference(model, atoms, **kw):
    """``atoms`` copy evaluated by mace's own ASE calculator on the same model object."""
    a = atoms.copy()
    a.calc = MACECalculator(models=model, device="cpu", default_dtype="float64", **kw)
    return a


def compressed():
    # a = 4.3 Å puts many neighbours inside the covalent-radius sums, so ZBL is active
    return bulk_box(ZS, reps=2, a=4.3, seed=5)


CASES = {"compressed": compressed, "triclinic": lambda: small_triclinic(ZS),
         "molecule": lambda: molecule(ZS), "slab": lambda: slab(ZS)}


@pytest.mark.parametrize("scale_shift", [True, False], ids=["ScaleShiftMACE", "MACE"])
@pytest.mark.parametrize("zbl", [True, False], ids=["zbl", "nozbl"])
def test_equals_mace_calculator(scale_shift, zbl):
    model = build_mace(scale_shift=scale_shift, zbl=zbl)
    engine = SingleRankEngine(MaceModel(model=model))
    for make in CASES.values():
        atoms = make()
        (got,) = engine.compute([Structure.from_atoms(atoms)])
        compare_to_package(got, reference(model, atoms), engine)  # slab: energy and forces
        assert (got.virial is None) == (not atoms.pbc.all())


def test_zbl_term_is_exercised():
    """The compressed box must make ZBL matter, or the ZBL cases above prove nothing."""
    s = [Structure.from_atoms(compressed())]
    for scale_shift in (True, False):
        with_zbl = SingleRankEngine(MaceModel(model=build_mace(scale_shift=scale_shift, zbl=True)))
        without = SingleRankEngine(MaceModel(model=build_mace(scale_shift=scale_shift, zbl=False)))
        assert rel(with_zbl.compute(s)[0].energy, without.compute(s)[0].energy) > 1e-5


VARIANTS = {
    "L3-corr3": dict(layers=3, correlation=3),
    "L1": dict(layers=1, hidden="8x0e"),
    "agnesi-plainfirst": dict(first="RealAgnosticInteractionBlock", distance_transform="Agnesi"),
    "nonlinear-L2": dict(hidden="8x0e+8x1o+8x2e",
                         inter="RealAgnosticResidualNonLinearInteractionBlock",
                         first="RealAgnosticResidualNonLinearInteractionBlock"),
    "density": dict(first="RealAgnosticDensityInteractionBlock",
                    inter="RealAgnosticDensityResidualInteractionBlock", zbl=False),
    "attention": dict(inter="RealAgnosticAttResidualInteractionBlock"),
}


@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
def test_variants_equal_mace_calculator(variant):
    model = build_mace(**variant)
    engine = SingleRankEngine(MaceModel(model=model))
    atoms = small_triclinic(ZS)
    (got,) = engine.compute([Structure.from_atoms(atoms)])
    compare_to_package(got, reference(model, atoms), engine)


def test_multi_head_uses_default_head():
    model = build_mace(heads=["pt_head", "Default"])
    atoms = small_triclinic(ZS)
    engine = SingleRankEngine(MaceModel(model=model))
    (got,) = engine.compute([Structure.from_atoms(atoms)])
    compare_to_package(got, reference(model, atoms), engine)
    pt_head = SingleRankEngine(MaceModel(model=model, head="pt_head"))
    (other,) = pt_head.compute([Structure.from_atoms(atoms)])
    compare_to_package(other, reference(model, atoms, head="pt_head"), pt_head)
    assert rel(other.energy, got.energy) > 1e-3
    with pytest.raises(ValueError, match="default"):
        MaceModel(model=build_mace(heads=["a", "b"]))


def terms_per_edge(model) -> int:
    """Terms summed into one feature of a MACE message per edge (``tol.arithmetic``'s
    ``terms_per_edge``): the tensor product and the linear maps around it combine every
    channel of the neighbour's features with every spherical-harmonic component, and the
    product basis sums products of ``correlation`` such components: channels x
    ((max_ell + 1)^2)^correlation. Their order is chosen by e3nn's generated code,
    cuEquivariance's, or TorchScript's optimised graphs, which differ with what the
    process compiled before (one comparison here moved 1e3-fold after other MACE models
    had been built in the same process)."""
    channels = model.interactions[0].hidden_irreps.count("0e")
    components = (model.spherical_harmonics._lmax + 1) ** 2
    correlation = model.products[0].symmetric_contractions.contractions[0].correlation
    return channels * components**correlation


def compare_to_package(got: Result, atoms, engine: SingleRankEngine) -> dict[str, float]:
    """``compare_to_ase`` with MACE's terms per edge."""
    terms = terms_per_edge(engine.model.mace)
    return compare_to_ase(got, atoms, engine, terms_per_edge=terms)


def within_float64(got, ref, s: Structure, engine: SingleRankEngine, model=None) -> None:
    """Two float64 computations of one model on the same edge vectors, in other orders
    (``tol.float64``, the ``terms_per_edge`` of ``model``, e3nn's, by default the
    engine's)."""
    spec = engine.model.spec
    bound = tol.float64(ref, s, spec.cutoff, layers=spec.n_layers,
                        terms_per_edge=terms_per_edge(model or engine.model.mace))
    ratios = tol.assert_within(got, ref, s, bound, "float64")
    print("float64 error / bound", {k: f"{v:.2g}" for k, v in ratios.items()})


def test_batch_equals_singles():
    engine = SingleRankEngine(MaceModel(model=build_mace()))
    structures = [Structure.from_atoms(make()) for make in CASES.values()]
    batched = engine.compute(structures)
    for s, b in zip(structures, batched, strict=True):
        (single,) = engine.compute([s])
        # another summation order, image shifts times the cells in a batched product
        ratios = tol.assert_within(b, single, s, tol.measured_float64(engine, s, single),
                                   "batch")
        print("batch vs single, float64 error / bound",
              {k: f"{v:.2g}" for k, v in ratios.items()})


def test_model_file_through_registry(tmp_path):
    model = build_mace()
    path = tmp_path / "tiny.model"
    torch.save(model, path)
    loaded = load_model(f"mace:{path}")
    assert isinstance(loaded, MaceModel)
    assert loaded.spec.species == frozenset(ZS)
    assert loaded.spec.cutoff == pytest.approx(4.0)
    atoms = small_triclinic(ZS)
    engine = SingleRankEngine(loaded)
    (got,) = engine.compute([Structure.from_atoms(atoms)])
    compare_to_package(got, reference(model, atoms), engine)


def test_bad_model_files(tmp_path):
    with pytest.raises(SetupError, match="no MACE model file"):
        load_model(f"mace:{tmp_path / 'missing.model'}")
    path = tmp_path / "weights.pt"
    torch.save({"not": "a model"}, path)
    with pytest.raises(SetupError, match="not a MACE model"):
        load_model(f"mace:{path}")
    with pytest.raises(SetupError, match="model file"):
        load_model("mace")


def test_importing_the_adapter_leaves_torch_load_safe():
    """``import mace`` turns torch.load's weights_only default off process-wide; the
    adapter restores it (a fresh interpreter, since this one imported mace directly)."""
    code = ("import os, mlipd.models.mace as m; "
            "print(os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'), m.MaceModel.__name__)")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    assert out.splitlines()[-1] == "None MaceModel"  # mace may print a cuequivariance notice


def test_unknown_species_is_a_clear_error():
    engine = SingleRankEngine(MaceModel(model=build_mace()))
    atoms = small_triclinic([26])
    with pytest.raises(UnknownSpecies, match="26"):
        engine.compute([Structure.from_atoms(atoms)])


def test_unsupported_interaction_is_refused():
    class Custom(blocks.RealAgnosticResidualInteractionBlock):
        pass

    model = copy.deepcopy(build_mace())
    model.interactions[1].__class__ = Custom  # its forward could differ from the split's
    with pytest.raises(ValueError, match="Custom is not supported"):
        MaceModel(model=model)


# --- memory: recomputation in backward and edge chunks ---------------------------------------
@pytest.mark.parametrize("variant", ["residual", "plain-first", "nonlinear", "density",
                                     "attention"])
def test_recompute_and_chunks_equal_stored(variant):
    """P = 1, float64: recomputed activations and chunked messages give the stored result to
    float64 round-off (``tol.float64``), and the backward pass really ran every
    recordable piece again (counted in the pieces' bodies, not a flag)."""
    kw = {"residual": {}, "plain-first": VARIANTS["agnesi-plainfirst"],
          "nonlinear": VARIANTS["nonlinear-L2"], "density": VARIANTS["density"],
          "attention": VARIANTS["attention"]}[variant]
    model = build_mace(**kw)
    s = [Structure.from_atoms(compressed())]
    stored = SingleRankEngine(MaceModel(model=model, recompute="0", chunk=0))
    (ref,) = stored.compute(s)
    assert stored.model.recomputed == 0
    assert stored.model.counters["chunks"] == 1
    for recompute, chunk in (("1", 0), ("0", 400), ("1", 400)):
        engine = SingleRankEngine(MaceModel(model=model, recompute=recompute, chunk=chunk))
        (got,) = engine.compute(s)
        within_float64(got, ref, s[0], engine)  # chunks: another summation order
        counters = engine.model.counters
        assert counters["recompute"] == int(recompute == "1")
        assert (counters["chunks"] > 3) == (chunk > 0)  # 1,796 edges in chunks of ~400
        expected = counters["pieces_in_graph"] if recompute == "1" else 0
        assert engine.model.recomputed == expected
        assert counters["pieces_in_graph"] >= 2 * counters["chunks"]  # each chunk, each layer


def test_recompute_auto_follows_free_memory(monkeypatch):
    import mlipd.models.mace_memory as memory

    # recompute=auto, chunk=auto; decided per topology, so every call rebuilds (skin 0)
    engine = SingleRankEngine(MaceModel(model=build_mace()), skin=0)
    s = [Structure.from_atoms(compressed())]
    engine.compute(s)
    assert engine.model.counters["recompute"] == 0  # a 64-atom box on this machine
    assert engine.model.recomputed == 0
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    engine.compute(s)
    assert engine.model.counters["recompute"] == 1
    assert engine.model.recomputed == engine.model.counters["pieces_in_graph"] > 0


def test_memory_options(tmp_path):
    path = tmp_path / "tiny.model"
    torch.save(build_mace(), path)
    m = load_model(f"mace:{path},recompute=1,chunk=500")
    assert (m.recompute, m.chunk) == ("1", 500)
    for bad, msg in (("recompute=yes", "bad value 'yes' for recompute"),
                     ("chunk=-3", "bad value '-3' for chunk"), ("chunks=4", "unknown option"),
                     ("jit=1", "jit=1 needs recompute=0")):
        with pytest.raises(SetupError, match=msg):
            load_model(f"mace:{path},{bad}")


def test_jit_option_equals_default():
    """``jit=1`` (TorchScript's optimising executor, as in MACECalculator) gives the same
    numbers, also from its second call on, when the executor has optimised its graphs."""
    model = build_mace()
    s = [Structure.from_atoms(compressed())]
    (ref,) = SingleRankEngine(MaceModel(model=model)).compute(s)
    engine = SingleRankEngine(MaceModel(model=model, recompute="0", jit=True))
    for _ in range(3):
        (got,) = engine.compute(s)
        within_float64(got, ref, s[0], engine)


def test_cueq_without_the_package_is_refused(tmp_path, monkeypatch):
    """Where cuequivariance-torch is not installed (the test environment has it: hidden
    here), cueq=1 is refused with the extra to install."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name ==
                        "cuequivariance_torch" else find_spec(name, *a))
    path = tmp_path / "tiny.model"
    torch.save(build_mace(), path)
    with pytest.raises(ModelUnavailable, match=r"pip install 'mlipd\[cueq\]'"):
        load_model(f"mace:{path},cueq=1")


def test_cueq_equals_e3nn():
    """``cueq=1`` (mace's converter; cuEquivariance's CPU fallbacks here, the (ir, mul)
    layout) through the split interactions, chunks and recomputation."""
    model = build_mace()
    s = [Structure.from_atoms(compressed())]
    (ref,) = SingleRankEngine(MaceModel(model=model)).compute(s)
    engine = SingleRankEngine(MaceModel(model=model, cueq=True, recompute="1", chunk=300))
    (got,) = engine.compute(s)
    assert engine.model.mace is not model  # a converted copy
    within_float64(got, ref, s[0], engine, model)
    assert engine.model.recomputed == engine.model.counters["pieces_in_graph"] > 0


# --- P in {2, 4, 8}: zero redundancy by measured work, results equal to P = 1 ----------------
SMALL = {"bulk": lambda: bulk_box(ZS, reps=3), "slab": lambda: slab(ZS),
         "triclinic": lambda: small_triclinic(ZS), "molecule": lambda: molecule(ZS)}


F64, F32 = torch.float64, torch.float32


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """The model's factories (stored, and recomputed + chunked activations), the small
    structures, and every run in one spawn of 8 ranks: P = 1, 2, 4, 8 (float64), the
    recompute variant and float32 at P = 2."""
    path = tmp_path_factory.mktemp("mace") / "tiny.model"
    torch.save(build_mace(), path)
    factory = functools.partial(MaceModel, str(path))
    recompute = functools.partial(MaceModel, f"{path},recompute=1,chunk=97")
    structures = as_structures({k: make() for k, make in SMALL.items()})
    runs = [(1, F64), (2, F64), (4, F64), (8, F64), (2, F64, recompute), (2, F32)]
    return factory, recompute, structures, measure_runs(factory, list(structures.values()),
                                                        runs)


# Elements and FLOPs exact per op, forward and backward, up to: what every rank does
# whatever it holds (measured on the ranks the 3-atom cell leaves without atoms): e3nn
# reads and normalises its weights (mm, mul, div, clone) and the harmonics' constants
# (cat, mul_); what a rank holding atoms adds: the product (symmetric contraction and
# its linear: clone, mm, mul of its weights), which a rank owning nothing skips (mace's
# contraction cannot take 0 rows); and per halo row: autograd's sum of the halo
# positions' gradients (add, 9 a row), and the halo atoms' species that the edges'
# radial basis reads at the senders: looked up (index), one-hot encoded (aminmax,
# scatter_, _to_copy) and decoded to atomic numbers by mace's radial basis (argmax,
# index). Table lookups in place of an exchange; no FLOPs on halo rows.
MACE_DECLARED = dict(
    per_rank=("cat", "div", "mul_", "clone", "mm", "mul"),
    per_rank_holding_atoms={"clone": (1998, 0), "mm": (2981, 0), "mul": (128, 0)},
    per_halo_row={"add": 9, "index": 6, "aminmax": 1, "scatter_": 3, "_to_copy": 8,
                  "argmax": 5},
    reason="weights and constants read and normalised once per rank (the product's on "
           "ranks holding atoms); autograd's sum of the halo positions' gradients; the "
           "halo atoms' species looked up and one-hot encoded")


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_ranks_zero_redundancy_and_results(small_runs, ranks):
    """Work summed over ranks equals P = 1's per op (node maps on owned atoms only, each
    edge once, forward and backward), every exchange moves exactly the halo rows, and the
    results equal P = 1's to float64 round-off (``check_zero_redundancy``). At P = 2
    also: recomputed + chunked activations equal stored ones to 1e-12 and their backward
    communicates no more; float32 within the derived float32 bounds."""
    factory, recompute, structures, runs = small_runs
    layers = len(build_mace().interactions)
    got = check_zero_redundancy(factory, structures, (ranks,), runs=runs, **MACE_DECLARED)
    for m in got[(ranks, F64)]:
        assert all(w.atom_exchanges == layers for w in m.work)
    if ranks != 2:
        return
    for name, stored, again in zip(structures, runs[(2, F64)], runs[(2, F64, recompute)],
                                   strict=True):
        tol.assert_within(again.result, stored.result, structures[name],  # chunks: order
                          tol.float64(stored.result, structures[name], factory().spec.cutoff,
                                      layers=layers), name)
        for w_stored, w_again in zip(stored.work, again.work, strict=True):
            assert w_again.step_traffic == w_stored.step_traffic  # no recompute communicates
            assert w_again.recomputed == w_again.info["pieces_in_graph"] > 0
    print("MACE P = 2 float32 error / bound:", check_float32(factory, structures, 2, runs=runs))


@pytest.mark.slow
def test_float32_on_ranks_at_two_threads(small_runs):
    """float32 at P = 1 and P = 2 with 2 torch threads on every rank (the fixture's runs
    have 1), within the same derived bounds; says whether the threads changed a bit."""
    factory, _, structures, runs = small_runs
    two = measure_runs(factory, list(structures.values()), [(1, F64), (1, F32), (2, F32)],
                       threads=2)
    for ranks in (1, 2):
        print(f"MACE P = {ranks} float32 at 2 threads, error / bound:",
              check_float32(factory, structures, ranks, runs=two))
    changed = [not np.array_equal(a.result.forces, b.result.forces)
               for a, b in zip(two[(2, F32)], runs[(2, F32)], strict=True)]
    print("forces changed by the threads (P = 2, per structure):", changed)


# --- P > 1: the distributed engine equals P = 1 to the float64 bound, with zero redundancy -
# By default one case runs (spawning ranks that import mace costs ~10 s each on 2 cores);
# the full 4 x 3 matrix of (class, ZBL) x P is marked slow. Each structure is also sent
# alone, so it is split over all P ranks.
# 4 ranks: the 3-atom cell leaves a rank without atoms; 1: the same step, no halo
DIST_DEFAULT = [(1, True, True), (4, True, True)]
DIST_ALL = [(p, ss, z) for p in (1, 2, 3, 4) for ss in (True, False) for z in (True, False)]


def _dist_params():
    for p, ss, z in DIST_ALL:
        marks = () if (p, ss, z) in DIST_DEFAULT else (pytest.mark.slow,)
        name = f"P{p}-{'ScaleShiftMACE' if ss else 'MACE'}-{'zbl' if z else 'nozbl'}"
        yield pytest.param(p, ss, z, marks=marks, id=name)


@pytest.mark.parametrize(("ranks", "scale_shift", "zbl"), list(_dist_params()))
def test_distributed_equals_single(tmp_path, ranks, scale_shift, zbl):
    model = build_mace(scale_shift=scale_shift, zbl=zbl)
    path = tmp_path / "tiny.model"
    torch.save(model, path)
    check_distributed(f"mace:{path}", MaceModel(model=model), ranks, four_cases(ZS))


# --- acceptance: a MACE model file drives the real i-PI --------------------------------------
def test_mace_file_drives_real_ipi(processes, short_tmp):
    """``mlipd drive --model mace:PATH`` against the real ``i-pi`` for 20 NVT steps; every
    5th recorded step, i-PI's forces and potential equal the engine on its positions."""
    from helpers.ipi_run import check_trajectory, drive_real_ipi

    model = build_mace()
    torch.save(model, short_tmp / "tiny.model")
    atoms = bulk_box([6, 14], reps=1, a=4.6, seed=7)
    run = drive_real_ipi(processes, short_tmp, atoms, name="mace",
                         model=f"mace:{short_tmp / 'tiny.model'}")
    adapter = MaceModel(model=model)
    check_trajectory(run, atoms, SingleRankEngine(adapter).compute, cutoff=adapter.spec.cutoff,
                     layers=adapter.spec.n_layers)


def small_mace() -> MaceModel:
    """The ZBL ScaleShiftMACE of these tests (a factory importable by rank processes)."""
    return MaceModel(model=build_mace())


@pytest.mark.parametrize("ranks", [1, 2])
def test_warm_step_reads_nothing_back(ranks):
    """A warm step of 64-atom Si makes no data-dependent host read: edges beyond the
    cutoff are weighted out, species and chunk plan are the topology's."""
    s = Structure.from_atoms(bulk_box([14], reps=2))
    for reads in warm_step_reads(small_mace, s, ranks):
        assert reads.total == 0, reads.report()
