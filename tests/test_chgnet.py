"""CHGNet in mlipd's layer loop (P = 1) against the ``chgnet`` package itself.

float32: our engine vs the package's own ``CHGNetCalculator`` (float32).
float64: our engine vs the package's own ``CHGNet._compute`` on a float64 graph
(forces and dE/dstrain by autograd of its energy; AtomRef added, since the package's
composition model casts to float32).
"""

import copy
import functools
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from chgnet.model.dynamics import CHGNetCalculator
from chgnet.model.model import BatchedGraph
from helpers.float32_bounds import float32_bounds
from pymatgen.io.ase import AseAtomsAdaptor

from mlipd.engine.neighbors import neighbor_list
from mlipd.engine.single_rank import SingleRankEngine
from mlipd.errors import SetupError, UnknownSpecies
from mlipd.model_api import LocalGraph
from mlipd.models.chgnet import CHGNetModel, load_chgnet
from mlipd.models.chgnet_graph import build_bond_graph
from mlipd.models.registry import load_model
from mlipd.testing import tolerances as tol
from mlipd.testing.hostreads import warm_step_reads
from mlipd.types import Result, Structure

pytestmark = pytest.mark.timeout(300)


def oxide(repeat=(2, 2, 2), seed=0, rattle=0.08):
    """Disordered rocksalt Li(Mn,Ni)O, rattled: 8·repeat³ atoms (64 for 2x2x2)."""
    rng = np.random.default_rng(seed)
    atoms = bulk("LiO", "rocksalt", a=4.16, cubic=True).repeat(repeat)
    cations = np.flatnonzero(atoms.numbers == 3)
    swap = rng.permutation(cations)[: len(cations) // 2]
    atoms.numbers[swap[::2]] = 25
    atoms.numbers[swap[1::2]] = 28
    atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
    return atoms


def triclinic():
    """4 atoms in a skewed cell ~3.5 Å wide: the 6 Å cutoff spans several images
    and every atom bonds to its own images."""
    cell = [[3.6, 0.0, 0.0], [0.9, 3.4, 0.0], [0.7, -0.6, 3.8]]
    frac = [[0, 0, 0], [0.5, 0.45, 0.55], [0.1, 0.5, 0.25], [0.55, 0.05, 0.6]]
    return Atoms("LiCoO2", scaled_positions=frac, cell=cell, pbc=True)


def slab(pbc_z=True):
    """Rocksalt (001) slab, 3 layers, 12 Å of vacuum (periodic in z with vacuum, or not)."""
    atoms = bulk("MgO", "rocksalt", a=4.21, cubic=True).repeat((2, 2, 2))
    atoms = atoms[atoms.positions[:, 2] < 5.0]
    atoms.cell[2, 2] = 16.0
    atoms.rattle(0.05, seed=3)
    atoms.pbc = [True, True, pbc_z]
    return atoms


def molecule(*, box: float | None = None):
    """An isolated (Li,Mn,Ni)O cluster cut from the rattled oxide (atoms within 4 Å of
    its centre): no cell, no periodicity; or, for the package, which needs a lattice,
    the same atoms in a periodic cube of ``box`` Å (vacuum wider than the cutoff)."""
    atoms = oxide(seed=7)
    centre = atoms.cell.array.sum(0) / 2
    keep = np.linalg.norm(atoms.positions - centre, axis=1) < 4.0
    cluster = Atoms(numbers=atoms.numbers[keep], positions=atoms.positions[keep] - centre)
    if box is not None:
        cluster.positions += box / 2
        cluster.cell, cluster.pbc = np.eye(3) * box, True
    return cluster


SYSTEMS = {"oxide64": oxide, "triclinic": triclinic, "slab": slab,
           "open_slab": lambda: slab(pbc_z=False), "molecule": molecule}
# what the package sees: it needs a periodic lattice, so open directions are vacuum
PACKAGE_VIEW = {"open_slab": lambda: slab(pbc_z=True), "molecule": lambda: molecule(box=22.0)}


@pytest.fixture(scope="module")
def chgnet():
    return CHGNetModel()


@pytest.fixture(scope="module")
def engines(chgnet):
    dtypes = (torch.float32, torch.float64)
    return {dt: SingleRankEngine(copy.deepcopy(chgnet), dtype=dt) for dt in dtypes}


@pytest.fixture(scope="module")
def package32():
    calc = CHGNetCalculator(model=load_chgnet(), use_device="cpu", on_isolated_atoms="ignore")
    return calc


@pytest.fixture(scope="module")
def package64():
    return load_chgnet().double()


def package_float32(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
            "stress": atoms.get_stress(voigt=False),  # GPa * units.GPa: eV/Å³, ASE's sign
            "magmoms": atoms.get_magnetic_moments()}


def package_float64(model, atoms):
    """The package's own float64 forward: energy (eV), forces, dE/dstrain (eV), magmoms."""
    struct = AseAtomsAdaptor.get_structure(atoms)
    g = model.graph_converter(struct)
    g.atom_frac_coord = torch.tensor(struct.frac_coords, dtype=torch.float64, requires_grad=True)
    g.lattice = torch.tensor(struct.lattice.matrix, dtype=torch.float64, requires_grad=True)
    g.neighbor_image = g.neighbor_image.double()
    bg = BatchedGraph.from_graphs([g], bond_basis_expansion=model.bond_basis_expansion,
                                  angle_basis_expansion=model.angle_basis_expansion,
                                  compute_stress=True)
    out = model._compute(bg, compute_magmom=True)
    n = len(atoms)
    energy = out["e"][0] * n  # e is per atom and carries the autograd graph
    d_pos, d_strain = torch.autograd.grad(energy, [bg.atom_positions[0], bg.strains[0]])
    atom_ref = model.composition_model.fc.weight[0, g.atomic_number.long() - 1].sum()
    return {"energy": float(energy + atom_ref), "forces": -d_pos.numpy(),
            "virial": -d_strain.numpy(), "magmoms": out["m"][0].detach().numpy()}


def test_spec(chgnet):
    s = chgnet.spec
    assert s.name == "chgnet"
    assert s.cutoff == 6.0
    assert s.species == frozenset(range(1, 95))
    assert s.n_layers == 4
    assert s.per_atom_extras == ("magmoms",)
    assert chgnet.bond_cutoff == 3.0


def test_checkpoint_file(tmp_path, engines):
    """A checkpoint file in chgnet's own format loads through ``chgnet:PATH``."""
    net = load_chgnet()
    path = tmp_path / "mine.pth.tar"
    torch.save({"model": {"model_args": net.model_args, "state_dict": net.state_dict()}}, path)
    engine = SingleRankEngine(load_model(f"chgnet:{path}"), dtype=torch.float64)
    s = Structure.from_atoms(triclinic())
    (mine,) = engine.compute([s])
    (bundled,) = engines[torch.float64].compute([s])
    assert mine.energy == bundled.energy
    np.testing.assert_array_equal(mine.forces, bundled.forces)


def test_registry_and_bad_path(tmp_path):
    assert isinstance(load_model("chgnet"), CHGNetModel)
    with pytest.raises(SetupError, match="no checkpoint file"):
        load_model(f"chgnet:{tmp_path / 'missing.pth.tar'}")


@pytest.fixture(scope="module")
def float32_runs(chgnet, package32):
    """Per system: ours in float32 and the package's float32 calculator, each at 1 and 2
    threads (2 = CI's cores), and float64 (ours) as the reference."""
    before = torch.get_num_threads()
    out = {}
    try:
        for name, build in SYSTEMS.items():
            s = Structure.from_atoms(build())
            runs = {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                (runs[("ours", threads)],) = SingleRankEngine(
                    copy.deepcopy(chgnet), dtype=torch.float32).compute([s])
                pkg = package_float32(package32, PACKAGE_VIEW.get(name, build)())
                runs[("package", threads)] = Result(
                    energy=pkg["energy"], forces=pkg["forces"],
                    virial=(-pkg["stress"] * build().get_volume()
                            if s.pbc.all() else None),
                    extras={"magmoms": pkg["magmoms"]})
            out[name] = (s, runs)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_float32_equals_package_calculator(engines, float32_runs, name):
    """float32 at 1 and 2 threads, to the error model of ``mlipd.testing.tolerances``:
    ours against our float64 within the float32-arithmetic bound (our geometry is
    float64, see CHGNetModel.forward), the package's against our float64 within the
    arithmetic bound plus its float32 geometry's (its coordinates and edges are
    float32; the stiffness measured in float64), and ours against the package's within
    the sum of both sides' bounds."""
    s, runs = float32_runs[name]
    engine = engines[torch.float64]
    (exact,) = engine.compute([s])
    cutoff = engine.model.spec.cutoff

    def forces_at(positions):
        return engine.compute([replace(s, positions=positions)])[0].forces

    # magmoms: |linear readout| of features whose terms are ~1 μB, even where the
    # moments are ~0 (MgO)
    ours_bound = tol.arithmetic(exact, s, cutoff, layers=engine.model.spec.n_layers,
                                extras_scale={"magmoms": 1.0})
    package_bound = ours_bound + tol.geometry(exact, s, cutoff, tol.stiffness(forces_at,
                                                                              s.positions))
    ratios = {}
    for threads in (1, 2):
        ours, package = runs[("ours", threads)], runs[("package", threads)]
        if not s.pbc.all():
            assert ours.virial is None
        ratios[threads] = {
            "ours-f64": tol.assert_within(ours, exact, s, ours_bound, f"ours, {threads} thr"),
            "package-f64": tol.assert_within(package, exact, s, package_bound,
                                             f"package, {threads} thr"),
            "ours-package": tol.assert_within(ours, package, s, ours_bound + package_bound,
                                              f"ours vs package, {threads} thr")}
    print(f"\n{name} error / bound:", {t: {k: {q: f"{x:.2g}" for q, x in v.items()}
                                            for k, v in r.items()} for t, r in ratios.items()})


def module_calls(model: CHGNetModel) -> tuple[Counter, Counter]:
    """Calls of the package modules each checkpointed piece starts with (the message
    MLPs of AtomConv and BondConv, AngleUpdate): (calls so far, calls when the last
    forward returned); the difference is what the backward pass ran again."""
    m = model.net
    calls, at_return = Counter(), Counter()
    pieces = {"atom_conv": [c.twoBody_atom for c in m.atom_conv_layers],
              "bond_conv": [c.twoBody_bond for c in m.bond_conv_layers],
              "angle_update": list(m.angle_layers)}
    def count(name: str):
        def hook(*_) -> None:
            calls[name] += 1
        return hook

    def returned(*_) -> None:
        at_return.clear()
        at_return.update(calls)

    for name, modules in pieces.items():
        for module in modules:
            # at the call, not its return: a recompute stops early once it has every
            # tensor backward needs (torch's non-reentrant checkpoint)
            module.register_forward_pre_hook(count(name))
    model.register_forward_hook(returned)
    return calls, at_return


def test_recompute_equals_stored(engines):
    """``recompute=1`` (activation checkpointing) gives the same numbers, and the
    backward pass really runs every block's local pieces again (counted by hooks on the
    package's modules), where ``recompute=0`` runs none."""
    atoms = oxide(seed=5)
    (ref,) = engines[torch.float64].compute([Structure.from_atoms(atoms)])
    per_forward = {"atom_conv": 4, "bond_conv": 3, "angle_update": 2}  # n_conv = 4
    for flag in (0, 1):
        model = CHGNetModel(f"0.3.0,recompute={flag}")
        calls, at_return = module_calls(model)
        engine = SingleRankEngine(model, dtype=torch.float64)
        (r,) = engine.compute([Structure.from_atoms(atoms)])
        assert dict(at_return) == per_forward
        again = {k: calls[k] - at_return[k] for k in per_forward}
        assert again == {k: flag * n for k, n in per_forward.items()}, flag
        assert engine.model.counters["recomputed"] == flag
        s = Structure.from_atoms(atoms)
        tol.assert_within(r, ref, s, float64_same_edges(ref, s, engine), f"recompute={flag}")
    with pytest.raises(ValueError, match="bad value 'yes' for recompute"):
        CHGNetModel("0.3.0,recompute=yes")
    with pytest.raises(ValueError, match="unknown option 'recompte'"):
        CHGNetModel("0.3.0,recompte=1")


def test_recompute_auto_follows_free_memory(engines, monkeypatch):
    """``auto`` stores activations while they fit in half the free memory."""
    import mlipd.models.chgnet as chgnet_module

    engine = SingleRankEngine(CHGNetModel(), dtype=torch.float64, skin=0)
    s = Structure.from_atoms(oxide(seed=6))
    engine.compute([s])
    assert engine.model.counters["recomputed"] == 0  # a 64-atom cell on this machine
    monkeypatch.setattr(chgnet_module, "available_bytes", lambda device: 10**6)
    engine.compute([s])
    assert engine.model.counters["recomputed"] == 1


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_float64_equals_package_compute(engines, package64, name):
    atoms = SYSTEMS[name]()
    (r,) = engines[torch.float64].compute([Structure.from_atoms(atoms)])
    view = PACKAGE_VIEW.get(name, SYSTEMS[name])()
    ref = package_float64(package64, view)
    # two float64 computations, the package's graph its own (``tol.measured_float64``;
    # the geometry's reach from the package's view: a molecule sits in a box there)
    s = Structure.from_atoms(view)
    bound = tol.measured_float64(engines[torch.float64], s, r, extras_scale={"magmoms": 1.0})
    package = Result(energy=ref["energy"], forces=ref["forces"],
                     virial=ref["virial"] if atoms.pbc.all() else None,
                     extras={"magmoms": ref["magmoms"]})
    ratios = tol.assert_within(r, package, s, bound, name)
    print(f"{name} float64 vs the package: error / bound",
          {k: f"{v:.2g}" for k, v in ratios.items()})


def test_stress_is_ase_convention(engines, package32):
    """Compressing the cell raises the pressure: sign and unit against the package."""
    atoms = oxide(seed=4)
    atoms.set_cell(atoms.cell * 0.97, scale_atoms=True)
    (r,) = engines[torch.float64].compute([Structure.from_atoms(atoms)])
    stress = r.stress(atoms.cell.array)
    ref = package_float32(package32, atoms)["stress"]
    assert np.trace(stress) < 0  # compressed: negative stress in ASE's convention
    # the package's float32 (arithmetic and geometry) against our float64
    bound = float32_bounds(CHGNetModel(), atoms).package.stress
    assert np.abs(stress - ref).max() <= bound, (np.abs(stress - ref).max(), bound)
    assert np.trace(stress) / 3 / units.GPa < -1.0  # more than 1 GPa of pressure


def test_open_slab_equals_vacuum_slab(engines):
    """pbc=(T,T,F) gives the same energy and forces as the periodic slab with 12 Å vacuum."""
    eng = engines[torch.float64]
    (periodic,) = eng.compute([Structure.from_atoms(slab(pbc_z=True))])
    s = Structure.from_atoms(slab(pbc_z=False))
    (open_,) = eng.compute([s])
    assert open_.virial is None
    # the same edges (the vacuum is wider than the cutoff), listed in another order, their
    # image shifts multiplied by another cell (no z row): ``tol.measured_float64``
    tol.assert_within(open_, replace(periodic, virial=None), s,
                      tol.measured_float64(eng, s, periodic, extras_scale={"magmoms": 1.0}),
                      "open vs vacuum slab")


def float64_same_edges(ref: Result, s: Structure, engine: SingleRankEngine) -> tol.Bounds:
    """Two float64 runs on the same edge vectors in other orders (``tol.float64``)."""
    spec = engine.model.spec
    return tol.float64(ref, s, spec.cutoff, layers=spec.n_layers, extras_scale={"magmoms": 1.0})


def test_batch_equals_singles(engines):
    eng = engines[torch.float64]
    structures = [Structure.from_atoms(f()) for f in SYSTEMS.values()]
    batched = eng.compute(structures)
    for s, b in zip(structures, batched, strict=True):
        (single,) = eng.compute([s])
        if not s.pbc.all():
            assert b.virial is single.virial is None
        # the same edges, summed in another order within a batch, their image shifts
        # multiplied by the cells in a batched product (bmm, not mm)
        tol.assert_within(b, single, s, tol.measured_float64(eng, s, single,
                                                             extras_scale={"magmoms": 1.0}),
                          "batch")


@pytest.mark.parametrize("positions", [
    [[1.0, 1.0, 1.0], [2.9, 1.0, 1.0], [12.0, 12.0, 12.0]],  # one atom far from a pair
    [[1.0, 1.0, 1.0]],  # a structure without a single edge
], ids=["far-atom", "no-edges"])
def test_isolated_atoms_as_package_ignore(engines, package32, positions):
    """Atoms without neighbours compute, with the value the package's calculator
    gives with on_isolated_atoms='ignore' (its default warns and gives the same)."""
    atoms = Atoms(numbers=[8] * len(positions), positions=positions, cell=np.eye(3) * 20.0,
                  pbc=True)
    (r,) = engines[torch.float32].compute([Structure.from_atoms(atoms)])
    ref = package_float32(package32, atoms)
    assert np.isfinite(r.energy)
    # float32 on both sides, the package's geometry too (test_float32_equals_package_...)
    b = float32_bounds(CHGNetModel(), atoms, extras_scale={"magmoms": 1.0})
    package = Result(energy=ref["energy"], forces=ref["forces"],
                     extras={"magmoms": ref["magmoms"]})
    tol.assert_within(replace(r, virial=None), package, b.structure, b.ours + b.package,
                      "isolated atoms")


def test_unknown_species_rejected(engines):
    atoms = Atoms("Og", positions=[[0, 0, 0]], cell=np.eye(3) * 10, pbc=True)
    with pytest.raises(UnknownSpecies):
        engines[torch.float64].compute([Structure.from_atoms(atoms)])


def local_graph(atoms, cutoff=6.0):
    s = Structure.from_atoms(atoms)
    e = neighbor_list(s, cutoff)
    pos = torch.as_tensor(s.positions)
    images = torch.as_tensor(e.shifts)
    n = s.n_atoms
    return LocalGraph(
        n_owned=n, numbers=torch.as_tensor(s.numbers), positions=pos,
        batch=torch.zeros(n, dtype=torch.long), n_structures=1,
        cells=torch.as_tensor(s.cell)[None], receivers=torch.as_tensor(e.centers),
        senders=torch.as_tensor(e.neighbors), shifts=images.double() @ torch.as_tensor(s.cell),
        images=images, global_ids=torch.arange(n), n_atoms=torch.tensor([n]))


@pytest.mark.parametrize("name", ["triclinic", "oxide64"])
def test_bond_graph_reproduces_package_rows(package64, name):
    """Same directed edges, bond pairing and angle rows as chgnet's own converter."""
    atoms = SYSTEMS[name]()
    g = package64.graph_converter(AseAtomsAdaptor.get_structure(atoms))
    ag = g.atom_graph.long().numpy()
    img = g.neighbor_image.long().numpy()
    pkg_edges = [(int(c), int(nb), *map(int, s)) for (c, nb), s in zip(ag, img, strict=True)]
    pkg_bonds = {}
    for d, u in enumerate(g.directed2undirected.long().tolist()):
        pkg_bonds.setdefault(u, set()).add(pkg_edges[d])
    pkg_angles = sorted((int(c), pkg_edges[d1], pkg_edges[d2])
                        for c, _, d1, _, d2 in g.bond_graph.long().tolist())

    lg = local_graph(atoms)
    bg = build_bond_graph(lg, bond_cutoff=3.0)
    edges = [(int(r), int(s), *map(int, i)) for r, s, i in
             zip(lg.receivers, lg.senders, lg.images, strict=True)]
    assert sorted(edges) == sorted(pkg_edges)
    bonds = {}
    for d, u in enumerate(bg.edge_bond.tolist()):
        bonds.setdefault(u, set()).add(edges[d])
    assert sorted(map(sorted, bonds.values())) == sorted(map(sorted, pkg_bonds.values()))
    assert all(len(v) == 2 for v in bonds.values())
    rows = zip(bg.angles[:, 0].tolist(), bg.angle_d1.tolist(), bg.angle_d2.tolist(), strict=True)
    angles = sorted((c, edges[d1], edges[d2]) for c, d1, d2 in rows)
    assert len(angles) > 0
    assert angles == pkg_angles
    # the 3-column rows agree with the directed edges they came from
    assert torch.equal(bg.angles[:, 1], bg.edge_bond[bg.angle_d1])
    assert torch.equal(bg.angles[:, 2], bg.edge_bond[bg.angle_d2])
    assert bg.n_owned_bonds == bg.n_bonds  # one rank owns every bond


@pytest.mark.parametrize("ranks", [1, 2])
def test_warm_step_reads_nothing_back(ranks):
    """A warm step (lists reused) of 64-atom Si with angles=mask (what angles=auto does
    on CUDA) makes no data-dependent host read: its edges, bonds and angles are the
    topology's with weights, never a selection; at two ranks the exchanges are all that
    waits. With angles=select (auto on a CPU, where running every candidate angle costs
    more than a read) one ``nonzero`` remains: the selection of this step's angles."""
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    s = Structure.from_atoms(atoms)
    for reads in warm_step_reads(functools.partial(CHGNetModel, "0.3.0,angles=mask"), s,
                                 ranks):
        assert reads.total == 0, reads.report()
    if ranks == 1:
        (reads,) = warm_step_reads(functools.partial(CHGNetModel, "0.3.0,angles=select"), s)
        assert reads.counts == {"nonzero": 1}, reads.report()
