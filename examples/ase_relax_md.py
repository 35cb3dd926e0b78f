"""Relax a crystal with a vacancy (positions and cell), then run NVT molecular dynamics,
with ASE driving and ``MlipdCalculator`` computing in this process (no server).

    python examples/ase_relax_md.py                  # CHGNet, float32, Si 2x2x2 minus one atom
    python examples/ase_relax_md.py --ranks 2        # the same, partitioned over 2 ranks
    python examples/ase_relax_md.py --repeat 1 --relax-steps 5 --md-steps 5   # seconds

float32 is mlipd's default precision (usually faster than float64), and the
geometry (positions, edge vectors, energy sums, forces) stays float64, so the results
agree with CHGNet's own calculator to ~1e-6 eV/atom. ``--dtype float64`` for reference.
Writes ``relax_md.png`` (energy and largest force during the relaxation; potential
energy and temperature during MD) and the relaxed structure to the output directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from ase import units
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.optimize import FIRE

from mlipd.calculator import MlipdCalculator


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="chgnet")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2, help="diamond Si cubic cells per edge")
    p.add_argument("--relax-steps", type=int, default=100)
    p.add_argument("--fmax", type=float, default=0.05, help="eV/Å, relaxation target")
    p.add_argument("--md-steps", type=int, default=200)
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "output",
                   help="output directory (default: examples/output)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(args.repeat)
    del atoms[0]  # a vacancy: something to relax
    atoms.rattle(0.03, seed=1)

    t0 = time.perf_counter()
    with MlipdCalculator(model=args.model, device=args.device, dtype=args.dtype,
                         ranks=args.ranks) as calc:
        atoms.calc = calc
        start = time.perf_counter()
        relax = {"energy": [], "fmax": []}
        volume0 = atoms.get_volume()

        def record_relax():
            relax["energy"].append(atoms.get_potential_energy())
            relax["fmax"].append(float(np.linalg.norm(atoms.get_forces(), axis=1).max()))

        opt = FIRE(FrechetCellFilter(atoms), logfile=None)
        opt.attach(record_relax)
        converged = opt.run(fmax=args.fmax, steps=args.relax_steps)
        atoms.write(out / "relaxed.extxyz")
        calls_relax = calc.engine.calls

        MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature,
                                     rng=np.random.default_rng(0))
        Stationary(atoms)  # no drift of the centre of mass
        md = Langevin(atoms, timestep=2 * units.fs, temperature_K=args.temperature,
                      friction=0.02 / units.fs, fixcm=False, rng=np.random.default_rng(1))
        trace = {"time_fs": [], "epot": [], "temperature": []}

        def record_md():
            trace["time_fs"].append(md.get_time() / units.fs)
            trace["epot"].append(atoms.get_potential_energy())
            trace["temperature"].append(atoms.get_temperature())

        md.attach(record_md)
        t_md = time.perf_counter()
        md.run(args.md_steps)
        md_s = time.perf_counter() - t_md
        calls_md = calc.engine.calls - calls_relax
    wall = time.perf_counter() - t0

    n = len(atoms)
    print(f"model {args.model} ({args.dtype}), {args.ranks} rank(s), {n} Si atoms (a vacancy)")
    print(f"relaxation:  {len(relax['energy'])} steps, "
          f"{'converged' if converged else 'not converged'} to fmax {relax['fmax'][-1]:.3f} "
          f"eV/Å, energy {relax['energy'][0]:.4f} -> {relax['energy'][-1]:.4f} eV, volume "
          f"{100 * (atoms.get_volume() / volume0 - 1):+.2f} % "
          f"({calls_relax} engine calls)")
    print(f"NVT MD:      {args.md_steps} steps of 2 fs at {args.temperature:g} K, mean "
          f"temperature {np.mean(trace['temperature'][1:] or [0]):.0f} K, "
          f"{md_s / max(args.md_steps, 1):.3f} s/step ({calls_md} engine calls: one per step)")
    print(f"wall time:   {wall:.1f} s (model load {start - t0:.1f} s)")
    plot(relax, trace, out / "relax_md.png",
         title=f"{args.model}, Si{n}, {args.ranks} rank(s), {args.dtype}")
    print(f"plot:        {out / 'relax_md.png'}")
    return 0


def plot(relax: dict, trace: dict, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((e_ax, f_ax), (p_ax, t_ax)) = plt.subplots(2, 2, figsize=(9, 6))
    e_ax.plot(relax["energy"], marker=".")
    e_ax.set(xlabel="relaxation step", ylabel="energy (eV)", title="FIRE, cell and positions")
    f_ax.semilogy(relax["fmax"], marker=".")
    f_ax.set(xlabel="relaxation step", ylabel="largest force (eV/Å)")
    p_ax.plot(trace["time_fs"], trace["epot"])
    p_ax.set(xlabel="time (fs)", ylabel="potential energy (eV)", title="Langevin NVT")
    t_ax.plot(trace["time_fs"], trace["temperature"])
    t_ax.set(xlabel="time (fs)", ylabel="temperature (K)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # the guard is needed: --ranks > 1 spawns rank processes
    sys.exit(main())
