"""A large structure partitioned across several ranks: molecular dynamics of a disordered
Li(Mn,Ni)O rocksalt supercell with CHGNet, every step computed by 2 CPU ranks.

    python examples/multirank_large.py                          # 1728 atoms, 2 ranks
    python examples/multirank_large.py --repeat 8 --ranks 4     # 4096 atoms, 4 ranks
    python examples/multirank_large.py --device cuda --ranks 2  # the ranks take the GPUs
    python examples/multirank_large.py --repeat 2 --steps 2     # seconds

Each rank owns a part of the atoms (recursive coordinate bisection) and computes only
their edges, bonds and angles; before each of CHGNet's layers it receives the features
of its halo atoms from their owners. So a structure too large for one device's memory
fits on several. The command-line equivalent is ``mlipd serve --ranks 2`` or
``mlipd drive --ranks 2``; here ``MlipdCalculator(model=..., ranks=2)`` spawns the rank
processes from this script. float32 is the default (usually faster than float64;
geometry, energy sums and forces stay float64). ``--check`` (default) evaluates the
last structure on one rank as well, prints the difference and writes that structure
(``multirank_last.traj``).

Writes ``multirank.png``: owned and halo atoms per rank, and the time of each step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.build import bulk
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet

from mlipd.calculator import MlipdCalculator


def oxide(repeat: int, seed: int = 0):
    """Rocksalt LiO with half the Li replaced by Mn and Ni: 8 * repeat**3 atoms."""
    rng = np.random.default_rng(seed)
    atoms = bulk("LiO", "rocksalt", a=4.16, cubic=True).repeat(repeat)
    cations = rng.permutation(np.flatnonzero(atoms.numbers == 3))[: 4 * repeat**3 // 2]
    atoms.numbers[cations[::2]] = 25
    atoms.numbers[cations[1::2]] = 28
    atoms.rattle(0.05, seed=seed)
    return atoms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="chgnet")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeat", type=int, default=6, help="rocksalt cubic cells per edge")
    p.add_argument("--steps", type=int, default=5, help="MD steps (1 fs)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare the last structure with one rank")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "output",
                   help="output directory (default: examples/output)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    atoms = oxide(args.repeat)
    n = len(atoms)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(1))
    Stationary(atoms)  # no drift of the centre of mass
    t0 = time.perf_counter()
    with MlipdCalculator(model=args.model, device=args.device, dtype=args.dtype,
                         ranks=args.ranks) as calc:
        atoms.calc = calc
        started = time.perf_counter() - t0
        step_s, energies = [], []
        md = VelocityVerlet(atoms, timestep=1 * units.fs)
        t_step = time.perf_counter()
        atoms.get_forces()  # step 0: the first neighbour list and partition

        def record():
            nonlocal t_step
            now = time.perf_counter()
            step_s.append(now - t_step)
            t_step = now
            energies.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())

        md.attach(record)
        md.run(args.steps)
        stats = calc.engine.last_stats  # (ranks, 3): owned atoms, edges, halo atoms
        devices = getattr(calc.engine, "devices", (str(calc.engine.device),))
        ours = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}

    print(f"model {args.model} ({args.dtype}), {n} atoms, {args.ranks} ranks on "
          f"{', '.join(sorted(set(devices)))}; ranks up in {started:.1f} s")
    for r, (owned, edges, halo) in enumerate(stats):
        print(f"rank {r}: {owned:.0f} atoms owned, {halo:.0f} halo atoms "
              f"({100 * halo / owned:.0f} %), {edges:.0f} edges")
    print(f"{args.steps} MD steps: {np.median(step_s[1:] or step_s):.2f} s/step (median; "
          f"the first, with the partition, {step_s[0]:.2f} s), total energy drift "
          f"{1e3 * (energies[-1] - energies[0]) / n:+.3f} meV/atom")
    if args.check:
        with MlipdCalculator(model=args.model, device=args.device, dtype=args.dtype,
                             ranks=1) as one:
            check = atoms.copy()
            check.calc = one
            de = abs(check.get_potential_energy() - ours["energy"]) / n
            df = np.abs(check.get_forces() - ours["forces"]).max()
        print(f"one rank, same structure: |dE| {de:.1e} eV/atom, max |dF| {df:.1e} eV/Å")
        atoms.copy().write(out / "multirank_last.traj")  # that structure, for a recheck
    plot(stats, step_s, out / "multirank.png",
         title=f"{args.model}, {n} atoms on {args.ranks} ranks ({args.dtype})")
    print(f"plot: {out / 'multirank.png'}")
    return 0


def plot(stats: np.ndarray, step_s: list[float], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (r_ax, t_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    ranks = np.arange(len(stats))
    r_ax.bar(ranks - 0.2, stats[:, 0], width=0.4, label="owned atoms")
    r_ax.bar(ranks + 0.2, stats[:, 2], width=0.4, label="halo atoms")
    r_ax.set(xlabel="rank", ylabel="atoms", xticks=ranks)
    r_ax.legend(loc="lower right")
    t_ax.plot(np.arange(len(step_s)), step_s, "o-")
    t_ax.set(xlabel="MD step (0: the first evaluation)", ylabel="seconds", ylim=(0, None))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # the guard is needed: the ranks are spawned processes
    sys.exit(main())
