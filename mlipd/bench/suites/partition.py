"""Partition quality: halo, balance and partition time of slabs, RCB and METIS, beside
a spatial decomposition's ghost shell; one process, no model.

Pairs are those the engine keeps as candidate edges: within ``radius = cutoff + skin``
(6 + 0.5 Å here), and ``partition_structure`` gets the same radius as the engine's
coordinator passes it. For water and Si boxes and P ranks:

- halo: atoms a rank receives before each layer (senders of its candidate edges that
  it does not own), summed over ranks and the most on one rank; per layer, so a model
  with L exchanges moves L times this;
- balance: max / mean candidate edges per rank (an edge lives with its receiver's owner);
- ghosts: what a LAMMPS-style spatial decomposition of the same RCB bricks holds and
  recomputes: atoms within layers x cutoff + skin of each brick, not owned;
- time: the partition call (weights from the bin grid included).
"""

from __future__ import annotations

import time

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule

from mlipd.bench.report import Report

REQUIRES = ("pymetis",)
DESCRIPTION = "halo, balance and partition time: slab vs RCB vs METIS vs a ghost shell"
BUDGET_S = {"tiny": 60.0, "quick": 20.0, "full": 1800.0}
GPU_BUDGET_S = {"full": 15.0}  # one GPU session: all suites in ~9 min
CUTOFF, SKIN, LAYERS = 6.0, 0.5, 2
SIZES = {"tiny": [1e3], "quick": [1e4], "full": [1e5, 1e6]}
RANKS = {"tiny": [2, 4], "quick": [2, 4, 8], "full": [2, 4, 8, 16, 32, 64]}


def water_box(n_target: float, seed: int = 0) -> Atoms:
    """Water at 1 g/cm3: molecules on a cubic grid (3.104 Å), random orientations."""
    n = round((n_target / 3) ** (1 / 3))
    spacing = 3.1043
    rng = np.random.default_rng(seed)
    h2o = molecule("H2O").positions
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    q = np.linalg.qr(rng.normal(size=(grid.shape[0], 3, 3)))[0]
    pos = (grid[:, None, :] + 0.5) * spacing + np.einsum("mij,aj->mai", q, h2o)
    return Atoms("OH2" * grid.shape[0], positions=pos.reshape(-1, 3),
                 cell=np.eye(3) * n * spacing, pbc=True)


def si_box(n_target: float) -> Atoms:
    n = round((n_target / 8) ** (1 / 3))
    return bulk("Si", "diamond", a=5.431, cubic=True).repeat((n, n, n))


def half_pairs(a: Atoms, radius: float) -> tuple[np.ndarray, np.ndarray]:
    from vesin import NeighborList

    i, j = NeighborList(cutoff=radius, full_list=False).compute(
        a.positions, a.cell.array, True, quantities="ij")
    return i.astype(np.int32), j.astype(np.int32)


def halo_and_balance(i, j, owner, p: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Halo atoms per rank (P,) and candidate edges per rank (P,) from a half list."""
    oi, oj = owner[i], owner[j]
    cut = oi != oj
    seen = np.zeros((p, n), dtype=bool)
    seen[oi[cut], j[cut]] = True  # j is a halo atom of i's owner
    seen[oj[cut], i[cut]] = True
    edges = np.bincount(oi, minlength=p) + np.bincount(oj, minlength=p)
    return seen.sum(axis=1), edges


def ghost_shell(a: Atoms, owner: np.ndarray, p: int, shell: float) -> np.ndarray:
    """Atoms within ``shell`` Å of each rank's brick (bounding box in fractional
    coordinates, periodic), not owned."""
    from mlipd.engine.bins import plane_spacing, reduced_coordinates

    u, _ = reduced_coordinates(a.positions, a.cell.array, a.pbc)
    width = shell / plane_spacing(a.cell.array, a.pbc)
    out = np.zeros(p, dtype=np.int64)
    for r in range(p):
        mine = u[owner == r]
        lo, hi = mine.min(axis=0), mine.max(axis=0)
        centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo) + width
        d = np.abs((u - centre + 0.5) % 1.0 - 0.5)
        out[r] = int((d <= np.minimum(half, 0.5)).all(axis=1).sum()) - int(mine.shape[0])
    return out


def methods() -> list[str]:
    try:
        import pymetis  # noqa: F401
    except ImportError:
        return ["slab", "rcb"]
    return ["slab", "rcb", "metis"]


def run(report: Report, *, size: str, device: str) -> None:
    from mlipd.engine.partition import Geometry, partition_structure

    radius = CUTOFF + SKIN
    shell = LAYERS * CUTOFF + SKIN
    table = report.table(
        f"Partition quality: candidate edges within {CUTOFF} + {SKIN} Å (cutoff + skin), "
        f"{LAYERS} layers (ghost shell {shell} Å)",
        ["system", "atoms", "P", "method", "halo sum", "halo max", "halo/atoms", "balance",
         "partition s", "slab halo / this", "ghosts sum", "ghosts / halo"])
    for name, build in (("water", water_box), ("Si", si_box)):
        for target in SIZES[size]:
            if report.deadline.passed:
                table.notes.append(f"{name} {target:.0e}: not run (deadline)")
                continue
            a = build(target)
            n = len(a)
            i, j = half_pairs(a, radius)
            g = Geometry(a.positions, a.cell.array, a.pbc)
            for p in RANKS[size]:
                slab_sum = None
                for method in methods():
                    t0 = time.perf_counter()
                    owner = partition_structure(g, p, radius=radius, method=method)
                    dt = time.perf_counter() - t0
                    halo, edges = halo_and_balance(i, j, owner, p, n)
                    slab_sum = halo.sum() if method == "slab" else slab_sum
                    ghosts = ghost_shell(a, owner, p, shell) if method == "rcb" else None
                    table.add(name, n, p, method, int(halo.sum()), int(halo.max()),
                              f"{halo.sum() / n:.3f}", f"{edges.max() / edges.mean():.3f}",
                              f"{dt:.2f}", f"{slab_sum / halo.sum():.2f}",
                              int(ghosts.sum()) if ghosts is not None else "",
                              f"{ghosts.sum() / halo.sum():.1f}" if ghosts is not None else "")
            del i, j
    if "metis" not in methods():
        table.notes.append("metis: not run (pymetis is not installed)")
    table.notes.append("halo = atoms received per layer; balance = max/mean candidate edges "
                       "per rank; ghosts = spatial decomposition of the RCB bricks.")
