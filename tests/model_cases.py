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
from mlipd.engine.neighbors import neighbor_list
from mlipd.engine.single_rank import SingleRankEngine
from mlipd.testing import tolerances as tol
from mlipd.testing.redundancy import assert_results_close, rel
from mlipd.testing.work import Measured, Run, measure_runs
from mlipd.types import Result, Structure

__all__ = ["assert_results_close", "rel"]  # shared with the model tests


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


def float64_bound(engine: SingleRankEngine, s: Structure, ref: Result, *,
                  terms_per_edge: int = 1) -> tol.Bounds:
    """Two float64 computations of ``engine``'s model at ``s`` that build their edge
    vectors by other operations (``tol.measured_float64``: the stiffness measured with
    ``engine``); ``terms_per_edge`` as there."""
    return tol.measured_float64(engine, s, ref, terms_per_edge=terms_per_edge)


def compare_to_ase(result: Result, atoms: Atoms, engine: SingleRankEngine, *,
                   terms_per_edge: int = 1) -> dict[str, float]:
    """``atoms`` carries a package calculator (float64); energy, forces (and stress if
    periodic) within ``float64_bound`` of ``result`` (``engine``'s), plus the stress's 4
    float64 roundings through the virial here. Returns error / bound."""
    s = Structure.from_atoms(atoms)
    virial = (-atoms.get_stress(voigt=False) * atoms.get_volume() if atoms.pbc.all()
              else None)
    package = Result(energy=atoms.get_potential_energy(), forces=atoms.get_forces(),
                     virial=virial)
    bound = (float64_bound(engine, s, result, terms_per_edge=terms_per_edge)
             + tol.proportional(result, s, tol.roundings(4)))
    ratios = tol.assert_within(result, package, s, bound, "against the package")
    print("float64 vs the package: error / bound", {k: f"{v:.2g}" for k, v in ratios.items()})
    return ratios


def check_distributed(spec: str, model, ranks: int, cases: dict) -> None:
    """``spec`` on ``ranks`` ranks equals ``model`` at P = 1 (``SingleRankEngine``) on every
    structure of ``cases``, within the float64 bound of two computations that build
    their edge vectors differently (``tol.float64`` with the structure's stiffness), and
    the ranks' counters show each atom and each edge (r < cutoff) owned exactly once."""
    structures = {k: Structure.from_atoms(a) for k, a in cases.items()}
    local = SingleRankEngine(model)
    cutoff = model.spec.cutoff
    bounds = {}
    with DistributedEngine(spec, ranks=ranks) as engine:
        for name, s in structures.items():
            (ref,) = local.compute([s])
            (got,) = engine.compute([s])
            bounds[name] = float64_bound(local, s, ref)
            r = tol.assert_within(got, ref, s, bounds[name], f"{name}, P = {ranks}")
            print(f"{name}, P = {ranks}: float64 error / bound",
                  {k: f"{v:.2g}" for k, v in r.items()})
            owned, edges, halo = engine.last_stats.sum(0)
            assert owned == s.n_atoms, name
            assert edges == len(neighbor_list(s, cutoff)), name
            if name == "bulk":
                assert (engine.last_stats[:, 0] > 0).all()  # really split over every rank
                assert (halo > 0) == (ranks > 1)
        together = engine.compute(list(structures.values()))  # one batch, mixed pbc
        for (name, s), got in zip(structures.items(), together, strict=True):
            tol.assert_within(got, local.compute([s])[0], s, bounds[name], f"{name} in a batch")


def as_structures(cases: Mapping[str, Atoms | Structure]) -> dict[str, Structure]:
    return {k: a if isinstance(a, Structure) else Structure.from_atoms(a)
            for k, a in cases.items()}


def check_float32(factory: Callable, cases: Mapping[str, Atoms | Structure], ranks: int, *,
                  runs: Mapping[Run, list[Measured]] | None = None,
                  terms_per_edge: int = 1,
                  extras_scale: dict[str, float] | None = None) -> list[dict[str, float]]:
    """``factory()``'s model with float32 features on ``ranks`` ranks against float64 at
    P = 1, within the float32-arithmetic bounds of ``mlipd.testing.tolerances`` (energy
    per atom, forces, stress, per-atom extras; ``extras_scale`` as there). The engine
    keeps the geometry in float64 whatever the features' dtype. ``runs``:
    ``measure_runs`` holding (1, float64) and (ranks, float32) (measured here if None).
    Returns the observed error / bound per structure."""
    structures = as_structures(cases)
    f32, f64 = (ranks, torch.float32), (1, torch.float64)
    if runs is None:
        runs = measure_runs(factory, list(structures.values()), [f64, f32])
    out = []
    for (name, s), one, m in zip(structures.items(), runs[f64], runs[f32], strict=True):
        w = one.work[0]
        bounds = tol.arithmetic(one.result, s, w.cutoff, layers=w.layers,
                                terms_per_edge=terms_per_edge, extras_scale=extras_scale)
        out.append(tol.assert_within(m.result, one.result, s, bounds, f"{name}, P = {ranks}"))
    return out

