"""Structures and comparisons shared by the model adapter tests (MACE, TensorNet, eSEN, plug-ins).

Every builder takes the species to draw from, so each model gets structures it knows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, fcc111

from mlipd.engine.distributed import DistributedEngine
from mlipd.engine.local import LocalEngine
from mlipd.engine.neighbors import neighbor_list
from mlipd.testing.work import Measured, Run, Work, measure_runs
from mlipd.types import Result, Structure


def _species(atoms: Atoms, species: Sequence[int], rng: np.random.Generator) -> Atoms:
    atoms.numbers = rng.choice(list(species), size=len(atoms))
    return atoms


def bulk_box(species: Sequence[int], *, reps: int = 5, a: float = 5.43, seed: int = 0) -> Atoms:
    """Rattled diamond lattice, 8 reps³ atoms (1,000 at reps = 5), fully periodic."""
    rng = np.random.default_rng(seed)
    at = bulk("Si", "diamond", a=a, cubic=True).repeat((reps, reps, reps))
    at.positions += rng.normal(scale=0.1, size=at.positions.shape)
    return _species(at, species, rng)


def small_triclinic(species: Sequence[int], *, seed: int = 1) -> Atoms:
    """3 atoms in a skewed cell ~3 Å wide: any cutoff above 1.5 Å sees many self-images."""
    rng = np.random.default_rng(seed)
    cell = np.array([[3.1, 0.0, 0.0], [1.2, 2.9, 0.0], [0.6, 0.8, 3.0]])
    frac = np.array([[0.0, 0.0, 0.0], [0.45, 0.5, 0.4], [0.7, 0.2, 0.8]])
    at = Atoms(numbers=np.ones(3, int), scaled_positions=frac, cell=cell, pbc=True)
    at.positions += rng.normal(scale=0.05, size=at.positions.shape)
    return _species(at, species, rng)


def slab(species: Sequence[int], *, seed: int = 2) -> Atoms:
    """fcc(111) slab, periodic in x and y, open in z (pbc = T, T, F)."""
    rng = np.random.default_rng(seed)
    at = fcc111("Cu", size=(4, 4, 3), a=3.6, vacuum=5.0)
    at.pbc = (True, True, False)
    at.positions += rng.normal(scale=0.05, size=at.positions.shape)
    return _species(at, species, rng)


def molecule(species: Sequence[int], *, n: int = 24, seed: int = 3) -> Atoms:
    """An isolated cluster (no cell, no periodicity), nearest neighbours >= 1.0 Å apart."""
    rng = np.random.default_rng(seed)
    pos: list[np.ndarray] = []
    while len(pos) < n:
        p = rng.uniform(-4.0, 4.0, size=3)
        if all(np.linalg.norm(p - q) >= 1.0 for q in pos):
            pos.append(p)
    at = Atoms(numbers=np.ones(n, int), positions=np.array(pos), pbc=False)
    return _species(at, species, rng)


def four_cases(species: Sequence[int], *, bulk_reps: int = 5) -> dict[str, Atoms]:
    """The structures every distributed test runs: bulk (1,000 atoms at reps 5), small
    triclinic, slab and molecule."""
    return {
        "bulk": bulk_box(species, reps=bulk_reps),
        "triclinic": small_triclinic(species),
        "slab": slab(species),
        "molecule": molecule(species),
    }


def rel(a: np.ndarray | float, b: np.ndarray | float) -> float:
    """max |a - b| / max(|b|), the relative error used by the acceptance tests."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    scale = max(float(np.abs(b).max()), 1e-300)
    return float(np.abs(a - b).max()) / scale


def assert_results_close(got: Result, ref: Result, *, rtol: float, cell: np.ndarray) -> None:
    assert rel(got.energy, ref.energy) <= rtol, (got.energy, ref.energy)
    assert rel(got.forces, ref.forces) <= rtol, rel(got.forces, ref.forces)
    assert set(got.extras) == set(ref.extras)
    for k, v in ref.extras.items():
        assert np.shape(got.extras[k]) == np.shape(v), k
        assert rel(got.extras[k], v) <= rtol, k
    if ref.virial is None:
        assert got.virial is None
    else:
        assert got.virial is not None
        assert rel(got.stress(cell), ref.stress(cell)) <= rtol, rel(got.virial, ref.virial)


def compare_to_ase(result: Result, atoms: Atoms, *, rtol: float) -> None:
    """``atoms`` carries a package calculator; energy, forces (and stress if periodic)."""
    assert rel(result.energy, atoms.get_potential_energy()) <= rtol
    assert rel(result.forces, atoms.get_forces()) <= rtol
    if atoms.pbc.all():
        assert rel(result.stress(atoms.cell.array), atoms.get_stress(voigt=False)) <= rtol


def check_distributed(spec: str, model, ranks: int, cases: dict) -> None:
    """``spec`` on ``ranks`` ranks equals ``model`` at P = 1 (``LocalEngine``) on every
    structure of ``cases`` (to 1e-12 at one rank, where both run the same step without a
    halo, 1e-10 beyond), and the ranks' counters show each atom and each edge
    (r < cutoff) owned exactly once."""
    structures = {k: Structure.from_atoms(a) for k, a in cases.items()}
    local = LocalEngine(model)
    cutoff = model.spec.cutoff
    rtol = 1e-12 if ranks == 1 else 1e-10
    with DistributedEngine(spec, ranks=ranks) as engine:
        for name, s in structures.items():
            (ref,) = local.compute([s])
            (got,) = engine.compute([s])
            assert_results_close(got, ref, rtol=rtol, cell=s.cell)
            owned, edges, halo = engine.last_stats.sum(0)
            assert owned == s.n_atoms, name
            assert edges == len(neighbor_list(s, cutoff)), name
            if name == "bulk":
                assert (engine.last_stats[:, 0] > 0).all()  # really split over every rank
                assert (halo > 0) == (ranks > 1)
        together = engine.compute(list(structures.values()))  # one batch, mixed pbc
        for s, got in zip(structures.values(), together, strict=True):
            assert_results_close(got, local.compute([s])[0], rtol=rtol, cell=s.cell)


def as_structures(cases: Mapping[str, Atoms | Structure]) -> dict[str, Structure]:
    return {k: a if isinstance(a, Structure) else Structure.from_atoms(a)
            for k, a in cases.items()}


def check_zero_redundancy(factory: Callable, cases: Mapping[str, Atoms | Structure], ranks: int,
                          *, runs: Mapping[Run, list[Measured]] | None = None,
                          rtol: float = 0.01, result_rtol: float = 1e-10,
                          dtype: torch.dtype = torch.float64,
                          model_traffic: Callable[[list[Work]], tuple[int, int]] | None = None,
                          rank_constant: tuple[int, int] = (0, 0),
                          ) -> list[Measured]:
    """``factory()``'s model on ``ranks`` real gloo ranks (each structure of ``cases``
    partitioned alone) against P = 1, by work measured in every rank's forward
    (``mlipd.testing.work``), not by the model's own counters:

    * results equal P = 1's to ``result_rtol`` (energy, forces, virial, extras);
    * every atom owned once, every edge (r < cutoff) on one rank;
    * matrix FLOPs and element-wise arithmetic summed over ranks within ``rtol`` of
      P = 1's (halo rows computed and thrown away, or an edge computed twice, add work);
    * each rank's ``graph.exchange`` calls equal P = 1's, and the rows they received are
      (calls) x (its halo atoms), counted at the all_to_all; rows sent = rows received
      over all ranks;
    * the model's own exchanges (all other traffic): none, or per ``model_traffic(work)``
      -> (exchanges each rank makes, rows received summed over ranks) from the ranks'
      ``Work`` (e.g. CHGNet's bond exchanges, from its bond counts);
    * ``rank_constant``: (FLOPs, elements) every rank spends whatever it holds (work on
      weights, e.g. e3nn's normalisation of its radial networks' weights in every forward,
      measured on a rank that owns no atoms), allowed once per extra rank.

    A structure of >= 4 atoms per rank must really be split: every rank owns atoms and
    has a halo. ``runs``: ``measure_runs(factory, cases, ...)`` holding (1, dtype) and
    (ranks, dtype), to share one spawn between several P (measured here if None).
    Returns the measurements at ``ranks``.
    """
    names = list(cases)
    structures = as_structures(cases)
    if runs is None:
        runs = measure_runs(factory, list(structures.values()), [(1, dtype), (ranks, dtype)])
    single, got = runs[(1, dtype)], runs[(ranks, dtype)]
    for name, one, many in zip(names, single, got, strict=True):
        s = structures[name]
        assert_results_close(many.result, one.result, rtol=result_rtol, cell=s.cell)
        (w1,) = one.work
        works = many.work
        assert len(works) == ranks
        assert sum(w.owned for w in works) == s.n_atoms == w1.owned, name
        assert sum(w.edges for w in works) == w1.edges, name
        if s.n_atoms >= 4 * ranks:
            assert all(w.owned > 0 for w in works), (name, [w.owned for w in works])
            assert all(w.halo > 0 for w in works) or ranks == 1, name
        assert w1.flops > 0 or w1.elements > 0, f"{name}: no work measured at P = 1"
        for what, constant in zip(("flops", "elements"), rank_constant, strict=True):
            total, base = sum(getattr(w, what) for w in works), getattr(w1, what)
            assert abs(total - (ranks - 1) * constant - base) <= rtol * base, (
                f"{name}: {what} summed over {ranks} ranks {total} vs {base} at P = 1 "
                f"(x{total / max(base, 1):.4f}); per rank {[getattr(w, what) for w in works]}")
        for w in works:
            assert w.atom_exchanges == w1.atom_exchanges, (name, w.atom_exchanges)
            assert w.atom_rows_received == w.atom_exchanges * w.halo, (name, w)
        assert sum(w.atom_rows_sent for w in works) == sum(w.atom_rows_received for w in works)
        assert sum(w.rows_sent for w in works) == sum(w.rows_received for w in works), name
        if ranks == 1:  # no communicator: nothing moves
            assert all(w.exchanges == w.rows_received == 0 for w in works), name
            continue
        own_calls, own_rows = (0, 0) if model_traffic is None else model_traffic(works)
        for w in works:
            assert w.exchanges - w.atom_exchanges == own_calls, (name, w)
        assert sum(w.rows_received - w.atom_rows_received for w in works) == own_rows, name
    return got


def check_float32(factory: Callable, cases: Mapping[str, Atoms | Structure], ranks: int, *,
                  energy_per_atom: float, forces: float, stress: float, extras: float = 0.0,
                  runs: Mapping[Run, list[Measured]] | None = None) -> list[Measured]:
    """``factory()``'s model with float32 features on ``ranks`` ranks against float64 at
    P = 1: energy per atom (eV), forces (eV/Å), stress (eV/Å³) and per-atom extras (their
    unit) within the given absolute bounds. The engine keeps the geometry in float64
    whatever the features' dtype. ``runs``: ``measure_runs`` holding (1, float64) and
    (ranks, float32) (measured here if None)."""
    structures = as_structures(cases)
    f32, f64 = (ranks, torch.float32), (1, torch.float64)
    if runs is None:
        runs = measure_runs(factory, list(structures.values()), [f64, f32])
    for (name, s), one, m in zip(structures.items(), runs[f64], runs[f32], strict=True):
        ref, r = one.result, m.result
        assert abs(r.energy - ref.energy) / s.n_atoms <= energy_per_atom, name
        np.testing.assert_allclose(r.forces, ref.forces, rtol=0, atol=forces, err_msg=name)
        if ref.virial is not None:
            np.testing.assert_allclose(r.stress(s.cell), ref.stress(s.cell), rtol=0,
                                       atol=stress, err_msg=name)
        for k, v in ref.extras.items():
            np.testing.assert_allclose(r.extras[k], v, rtol=0, atol=extras, err_msg=f"{name} {k}")
    return runs[f32]
