"""Compiled clients and LAMMPS: what reaching mlipd from C, Fortran and LAMMPS costs.

1. Round-trip overhead per call through one ``mlipd serve`` (LJ, argon) from the C
   client, the Fortran module (their probe programs, built here with CMake) and the
   Python client, at 8 and 1,000 atoms, beside the engine time of the same calls.
   Clients take turns in blocks of calls; a sample is a block's wall time per call minus
   the engine time the server's ``stats`` counted for that block, per call.
2. MD step time, CHGNet (float32), 216 atoms of silicon, NVE with 1 fs steps: LAMMPS
   driven by mlipd (``mlipd.lammps.couple``, engine in LAMMPS's process), ASE's velocity
   Verlet with ``MlipdCalculator`` (the same engine), and ASE with CHGNet's own
   ``CHGNetCalculator``. Each contender runs in its own process; they take turns, one
   block of steps each; a sample is a block's time per step.
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

import numpy as np

from mlipd.bench.report import Report
from mlipd.bench.timing import Deadline, Measured, Timing, interleaved
from mlipd.bench.workers import Worker

REQUIRES = ("lammps", "chgnet")
DESCRIPTION = "C, Fortran and Python client round trips; LAMMPS + mlipd vs ASE MD steps"
BUDGET_S = {"tiny": 150.0, "quick": 240.0, "full": 1800.0}
RT_SIZES = {"tiny": [8], "quick": [8, 1000], "full": [8, 1000]}
RT_CALLS = {8: 100, 1000: 20}  # calls per block
RT_ROUNDS = {"tiny": 1, "quick": 3, "full": 10}
RT_MODEL = "lj:cutoff=4.5"  # first neighbour shell only: the engine stays small next to I/O
MD_ATOMS = {"tiny": 8, "quick": 216, "full": 216}
MD_STEPS = {"tiny": 1, "quick": 3, "full": 10}  # steps per block
MD_ROUNDS = {"tiny": 1, "quick": 3, "full": 5}
MD_CONTENDERS = ("LAMMPS + mlipd", "ASE + MlipdCalculator", "ASE + CHGNetCalculator")


def run(report: Report, *, size: str, device: str) -> None:
    parts = report.deadline.shares(["round trips", "md"])
    _, deadline = next(parts)
    with tempfile.TemporaryDirectory(prefix="mlipd-bench-clients-") as tmp:
        _round_trips(report, size=size, tmp=Path(tmp), deadline=deadline)
    _, deadline = next(parts)
    _md_steps(report, size=size, device=device, deadline=deadline)


# ---------------------------------------------------------------- round trips


def _round_trips(report: Report, *, size: str, tmp: Path, deadline: Deadline) -> None:
    from mlipd.bench.compiled import build_clients
    from mlipd.client import Client
    from mlipd.server.testing import running_server

    t0 = time.monotonic()
    programs = build_clients(tmp / "clients")  # BuildFailed: the suite fails, with the log
    build_s = time.monotonic() - t0
    table = report.table("Round-trip overhead per call (one `mlipd serve`, "
                         f"{RT_MODEL}): ms, median (min-max) of blocks",
                         ["atoms", "engine", "C", "Fortran", "Python", "Python / C"])
    args = ["--model", RT_MODEL, "--device", "cpu", "--dtype", "float64", "--zmq",
            "tcp://127.0.0.1:0"]
    with running_server(args, log=tmp / "serve.log") as srv, \
            Client(srv.address, timeout_s=600) as client, Client(srv.address) as stats:
        for n in RT_SIZES[size]:
            if deadline.passed:
                table.notes.append(f"{n} atoms: not run (the suite's time was up)")
                break
            paths = {"C": _probe(programs.program("mlipd_probe_c"), srv.address, tmp),
                     "Fortran": _probe(programs.program("mlipd_probe_fortran"), srv.address,
                                       tmp),
                     "Python": functools.partial(_python_calls, client)}
            t, engine = _blocks(paths, stats, n, calls=RT_CALLS[n] if size != "tiny" else 10,
                                rounds=RT_ROUNDS[size], deadline=deadline)
            table.add(n, engine.cell(1e-3), t["C"].cell(1e-3), t["Fortran"].cell(1e-3),
                      t["Python"].cell(1e-3), t["C"].ratio(t["Python"]))
    table.notes += [
        "Overhead = wall time per call minus the engine time of those calls (the server's "
        "stats): packing, ZeroMQ both ways, the server's decode, queue and encode, the "
        "client's decode. C and Fortran time their calls in the probe programs "
        "(clients/examples/probe.c, probe.f90: one connection, then the calls); Python "
        "is mlipd.client.Client in this process.",
        f"Each block moves one atom by 1e-6 Å per call; {RT_ROUNDS[size]} round(s) of "
        f"blocks taking turns. CMake built the clients in {build_s:.0f} s.",
    ]


def _probe(program: Path, endpoint: str, tmp: Path):
    """A compiled client's block: ``calls`` computes of ``structure`` in one probe run;
    wall seconds per call as the probe timed them."""
    from mlipd.bench.compiled import run_probe

    def block(structure, calls: int) -> float:
        out = run_probe(program, endpoint, [structure], mode=f"repeat:{calls}",
                        workdir=tmp / program.name, timeout_s=600)
        if out.results is None:
            raise RuntimeError(f"{program.name}: {out.lines[-3:]}")
        return out.seconds[0]

    return block


def _python_calls(client, structure, calls: int) -> float:
    """The Python client's block, with the probes' moves (a new structure every call)."""
    from mlipd.types import Structure

    x = structure.positions.copy()
    t = time.perf_counter()
    for k in range(calls):
        x[0, 0] += -1e-6 if k % 2 else 1e-6
        client.compute(Structure(numbers=structure.numbers, positions=x, cell=structure.cell,
                                 pbc=structure.pbc))
    return (time.perf_counter() - t) / calls


def _blocks(paths: dict, stats, n: int, *, calls: int, rounds: int, deadline: Deadline
            ) -> tuple[dict[str, Timing], Timing]:
    """Blocks of every path in turn: overhead per call of each path, engine per call."""
    from mlipd.bench.roundtrip import argon
    from mlipd.types import Structure

    structure = Structure.from_atoms(argon(n))
    over: dict[str, list[float]] = {k: [] for k in paths}
    engine: list[float] = []
    for r in range(rounds):
        if r >= 1 and deadline.passed:
            break
        for name, block in paths.items():
            before = stats.stats()
            wall = block(structure, calls)
            after = stats.stats()
            done = after["engine_calls"] - before["engine_calls"]
            if done != calls:
                raise RuntimeError(f"{name}: {done} engine calls for {calls} requests")
            eng = (after["engine_time"]["total_s"] - before["engine_time"]["total_s"]) / calls
            over[name].append(wall - eng)
            engine.append(eng)
    return {k: Timing(tuple(v)) for k, v in over.items()}, Timing(tuple(engine))


# ---------------------------------------------------------------- MD steps


def lammps_recipe(n_atoms: int, steps: int, *, device: str):
    """LAMMPS (NVE, 1 fs) with mlipd's engine in its process: a call runs ``steps``
    steps and returns the time per step."""
    import ase.io

    from mlipd.bench.systems import silicon
    from mlipd.lammps import couple, new_lammps

    atoms = silicon(n_atoms)
    path = Path(tempfile.mkdtemp(prefix="mlipd-bench-lammps-")) / "si.data"
    ase.io.write(path, atoms, format="lammps-data", specorder=["Si"], masses=True,
                 atom_style="atomic")
    lmp = new_lammps(["-log", "none", "-screen", "none", "-nocite"])
    lmp.commands_string(f"units metal\natom_style atomic\nboundary p p p\nread_data {path}\n"
                        "velocity all create 600 87287 mom yes rot yes dist gaussian\n"
                        "fix nve all nve\ntimestep 0.001\nthermo 0")
    coupling = couple(lmp, elements=["Si"], model="chgnet", device=device)
    lmp.command("run 0")

    def call(k: int) -> Measured:
        t = time.perf_counter()
        lmp.command(f"run {steps} pre no post no")  # no set-up: only MD steps
        if coupling.error is not None:
            raise coupling.error
        return Measured((time.perf_counter() - t) / steps)

    return call


def ase_recipe(n_atoms: int, steps: int, which: str, *, device: str):
    """ASE's velocity Verlet (NVE, 1 fs) with ``MlipdCalculator`` or CHGNet's own
    ``CHGNetCalculator``: a call runs ``steps`` steps and returns the time per step."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    from mlipd.bench.systems import silicon

    atoms = silicon(n_atoms)
    if which == "mlipd":
        from mlipd.calculator import MlipdCalculator

        atoms.calc = MlipdCalculator(model="chgnet", device=device)
    else:
        from mlipd.bench.zoo import make_case, package_calculator

        case = make_case("chgnet", scale="small", workdir=Path(tempfile.mkdtemp()))
        atoms.calc = package_calculator(case, device)
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
    md = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    atoms.get_forces()

    def call(k: int) -> Measured:
        t = time.perf_counter()
        md.run(steps)
        return Measured((time.perf_counter() - t) / steps)

    return call


def _md_steps(report: Report, *, size: str, device: str, deadline: Deadline) -> None:
    from mlipd.bench.workers import setup_all

    n, steps = MD_ATOMS[size], MD_STEPS[size]
    table = report.table(f"MD step, CHGNet float32, Si{n}, NVE 1 fs: s per step, median "
                         "(min-max) of blocks", ["contender", "atoms", "s/step",
                                                 "vs LAMMPS + mlipd"])
    workers = {name: Worker(name, device=device, threads=report.threads, call_timeout=900)
               for name in MD_CONTENDERS}
    try:
        recipes = {workers["LAMMPS + mlipd"]: (lammps_recipe, n, steps),
                   workers["ASE + MlipdCalculator"]: (ase_recipe, n, steps, "mlipd"),
                   workers["ASE + CHGNetCalculator"]: (ase_recipe, n, steps, "package")}
        failed = setup_all(recipes, timeout=900)
        calls = {name: w for name, w in workers.items() if w not in failed}
        t = interleaved(calls, warmup=1, repeats=MD_ROUNDS[size], deadline=deadline,
                        min_repeats=2)
    finally:
        for w in workers.values():
            w.close()
    base = t.get("LAMMPS + mlipd", Timing(()))
    for name in MD_CONTENDERS:
        mine = t.get(name, Timing((), failed.get(workers[name], "not run")))
        table.add(name, n, mine.cell(), base.ratio(mine))
    table.notes += [
        f"Each contender in its own process ({report.threads or 'default'} torch "
        f"thread(s)); blocks of {steps} steps taking turns, one warm-up block each. "
        "LAMMPS runs `run N pre no post no` (no set-up between blocks) with `fix external` "
        "calling mlipd's engine in LAMMPS's process (neighbour list kept within the Verlet "
        "skin); ASE's VelocityVerlet calls the calculator once per step.",
        "vs LAMMPS + mlipd: the contender's time per step over LAMMPS + mlipd's.",
    ]
