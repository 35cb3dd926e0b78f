"""Halo size, balance and partition time: slabs vs RCB vs METIS, beside a spatial
decomposition's ghost shell. One process, no model.

For water and Si boxes (~1e5 and ~1e6 atoms) and P = 2..64:
- halo: atoms a rank receives before each layer (1-hop boundary of its owned atoms),
  summed over ranks and the max per rank; per layer, so a model with L exchanges
  moves L times this;
- balance: max / mean edges owned per rank (an edge is owned with its receiver);
- ghosts: what a LAMMPS-style spatial decomposition of the same RCB bricks would hold
  and recompute: atoms within n_layers x cutoff of each brick, not owned;
- time: the partition call on rank 0 (weights from the bin grid included).

Usage: python benchmarks/bench_partition.py [--sizes 1e5 1e6] [--cutoff 6 --layers 2]
Writes benchmarks/results/bench_partition.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule
from vesin import NeighborList

from mlipd.engine.bins import plane_spacing, reduced_coordinates
from mlipd.engine.partition import Geometry, partition_structure

RESULTS = Path(__file__).parent / "results"


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


def half_pairs(a: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    i, j = NeighborList(cutoff=cutoff, full_list=False).compute(
        a.positions, a.cell.array, True, quantities="ij")
    return i.astype(np.int32), j.astype(np.int32)


def halo_and_balance(i, j, owner, p, n):
    """Halo atoms per rank (P,) and edges per rank (P,) from a half list."""
    oi, oj = owner[i], owner[j]
    cut = oi != oj
    seen = np.zeros((p, n), dtype=bool)
    seen[oi[cut], j[cut]] = True  # j is a halo atom of i's owner
    seen[oj[cut], i[cut]] = True
    edges = np.bincount(oi, minlength=p) + np.bincount(oj, minlength=p)
    return seen.sum(axis=1), edges


def ghost_shell(a: Atoms, owner: np.ndarray, p: int, shell: float) -> np.ndarray:
    """Atoms within ``shell`` Å of each rank's brick (bounding box in fractional
    coordinates, periodic), not owned: what spatial decomposition holds as ghosts."""
    u, _ = reduced_coordinates(a.positions, a.cell.array, a.pbc)
    width = shell / plane_spacing(a.cell.array, a.pbc)
    out = np.zeros(p, dtype=np.int64)
    for r in range(p):
        mine = u[owner == r]
        lo, hi = mine.min(axis=0), mine.max(axis=0)
        centre, half = 0.5 * (lo + hi), 0.5 * (hi - lo) + width
        d = np.abs((u - centre + 0.5) % 1.0 - 0.5)
        inside = (d <= half).all(axis=1) if (half < 0.5).all() else (
            (d <= np.minimum(half, 0.5)).all(axis=1))
        out[r] = int(inside.sum()) - int(mine.shape[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    ap.add_argument("--cutoff", type=float, default=6.0)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["slab", "rcb", "metis"])
    args = ap.parse_args()
    shell = args.layers * args.cutoff
    lines = [
        f"# Partition quality: cutoff {args.cutoff} Å, {args.layers} layers "
        f"(spatial-decomposition ghost shell {shell} Å)", "",
        "halo = atoms received per layer (sum over ranks / max per rank); balance = max/mean "
        "edges per rank; ghosts = spatial decomposition of the RCB bricks; "
        "x slab = slab halo sum / this halo sum.", "",
        "| system | atoms | P | method | halo sum | halo max | halo/atoms | balance "
        "| partition s | x slab | ghosts sum | ghosts / halo |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, build in (("water", water_box), ("Si", si_box)):
        for size in args.sizes:
            a = build(size)
            n = len(a)
            t0 = time.perf_counter()
            i, j = half_pairs(a, args.cutoff)
            print(f"{name} {n} atoms: {i.size} pairs in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            g = Geometry(a.positions, a.cell.array, a.pbc)
            for p in args.ranks:
                slab_sum = None
                for method in args.methods:
                    t0 = time.perf_counter()
                    owner = partition_structure(g, p, radius=args.cutoff, method=method)
                    dt = time.perf_counter() - t0
                    halo, edges = halo_and_balance(i, j, owner, p, n)
                    if method == "slab":
                        slab_sum = halo.sum()
                    ghosts = ghost_shell(a, owner, p, shell) if method == "rcb" else None
                    row = (f"| {name} | {n} | {p} | {method} | {halo.sum()} | {halo.max()} | "
                           f"{halo.sum() / n:.3f} | {edges.max() / edges.mean():.3f} | {dt:.2f} | "
                           f"{slab_sum / halo.sum():.2f} | "
                           + (f"{ghosts.sum()} | {ghosts.sum() / halo.sum():.1f} |"
                              if ghosts is not None else " | |"))
                    print(row, flush=True)
                    lines.append(row)
            del i, j
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_partition.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
