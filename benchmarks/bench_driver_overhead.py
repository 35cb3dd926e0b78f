"""Per-step cost of ``mlipd drive`` vs i-PI's own Python driver, same i-PI input.

i-PI runs NVE MD of N argon atoms (simple cubic, 3.8 Å) over a UNIX socket with
three clients, one after the other at each size:

    ipi-dummy   ``i-pi-py_driver -m dummy``: zero forces, no physics
    mlipd-zero  ``mlipd drive --model lj:...,cutoff=3``: the full mlipd path
                (decode, Structure checks, neighbour list, torch autograd,
                encode) with no neighbour inside the cutoff: the fair
                "no physics" comparison
    mlipd-lj    ``mlipd drive --model lj:...,cutoff=6``: real LJ physics
    base-zero, base-lj   the same two with another mlipd source tree
                (``--baseline-src DIR``, e.g. ``git archive HEAD mlipd | tar -x -C DIR``),
                for before/after figures from one run

ms/step is measured by watching i-PI's properties file (flushed every step):
time from step ``warmup`` to the last step, divided by the steps in between.
This is the whole MD step (i-PI's integrator + socket + client), which is what
a user waits for. Results go to ``benchmarks/results/driver_overhead.md``.

    python benchmarks/bench_driver_overhead.py            # 8, 1000, 65536 atoms
    python benchmarks/bench_driver_overhead.py --sizes 8 1000 --steps-scale 0.5
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = {8: 400, 1000: 200, 65536: 25}
WARMUP = 5

INPUT = """<simulation verbosity="quiet" sockets_prefix="{prefix}">
  <output prefix="sim">
    <properties stride="1" flush="1" filename="out">[step, potential]</properties>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>1</seed></prng>
  <ffsocket name="f" mode="unix"><address>b</address></ffsocket>
  <system>
    <initialize nbeads="1">
      <file mode="ase" units="angstrom">init.xyz</file>
      <velocities mode="thermal" units="kelvin">20</velocities>
    </initialize>
    <forces><force forcefield="f"/></forces>
    <motion mode="dynamics">
      <dynamics mode="nve"><timestep units="femtosecond">1</timestep></dynamics>
    </motion>
    <ensemble><temperature units="kelvin">20</temperature></ensemble>
  </system>
</simulation>
"""


def lattice(n: int):
    from ase import Atoms

    dims = {8: (2, 2, 2), 1000: (10, 10, 10), 65536: (64, 32, 32)}.get(n)
    if dims is None:
        side = round(n ** (1 / 3))
        dims = (side, side, side)
    a = 3.8
    grid = np.stack(np.meshgrid(*[np.arange(d) for d in dims], indexing="ij"), -1)
    return Atoms(f"Ar{int(np.prod(dims))}", positions=grid.reshape(-1, 3) * a,
                 cell=np.array(dims) * a, pbc=True)


def client_argv(kind: str, sockdir: Path) -> list[str]:
    if kind == "ipi-dummy":
        return ["i-pi-py_driver", "-u", "-a", "b", "-S", f"{sockdir}/ipi_", "-m", "dummy"]
    # 3 Å < the 3.8 Å spacing: no neighbours (a tiny cutoff would make vesin's cell grid huge)
    cutoff = {"zero": 3.0, "lj": 6.0}[kind.split("-")[1]]
    return [sys.executable, "-m", "mlipd", "drive", "--address", f"unix:{sockdir}/ipi_b",
            "--species", "Ar", "--model", f"lj:epsilon=0.0104,sigma=3.4,cutoff={cutoff}",
            "--dtype", "float64"]


def run_one(kind: str, n: int, steps: int, workdir: Path, baseline: str | None = None) -> float:
    """ms per MD step, steps WARMUP..steps."""
    sockdir = Path(tempfile.mkdtemp(prefix="mlb-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    lattice(n).write(workdir / "init.xyz", format="extxyz")
    (workdir / "input.xml").write_text(INPUT.format(prefix=f"{sockdir}/ipi_", steps=steps))
    out = workdir / "sim.out"
    out.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if kind.startswith("base-"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [baseline, env.get("PYTHONPATH")]))
    procs = []
    try:
        with (workdir / "ipi.log").open("w") as log, (workdir / "client.log").open("w") as clog:
            procs.append(subprocess.Popen(["i-pi", "input.xml"], cwd=workdir, stdout=log,
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
            # i-pi-py_driver does not retry connecting: start every client once the socket exists
            _wait_for_file(sockdir / "ipi_b", procs[0])
            procs.append(subprocess.Popen(client_argv(kind, sockdir), cwd=workdir, stdout=clog,
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
            t_warm = _wait_for_step(out, WARMUP, procs)
            t_end = _wait_for_step(out, steps, procs)
            procs[0].wait(timeout=120)
            procs[1].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    return 1000 * (t_end - t_warm) / (steps - WARMUP)


def _wait_for_file(path: Path, ipi: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if ipi.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"i-PI did not create {path}")
        time.sleep(0.01)


def _wait_for_step(path: Path, step: int, procs: list[subprocess.Popen],
                   timeout: float = 900) -> float:
    """Wall time at which the properties line of ``step`` appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
            if lines and int(float(lines[-1].split()[0])) >= step:
                return time.perf_counter()
        for proc in procs:
            if proc.poll() is not None and proc.returncode != 0:
                raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before step {step}")
        time.sleep(0.0005)
    raise TimeoutError(f"step {step} not reached")


def in_process_split(n: int, repeats: int) -> tuple[float, float]:
    """ms per step of mlipd's own protocol path (decode POSDATA, build Structures,
    encode FORCEREADY) and of the engine call (mlipd-zero model), in this process."""
    import torch

    from mlipd.engine import make_engine
    from mlipd.protocols import ipi
    from mlipd.protocols.convert import (
        forceready_from_results,
        posdata_from_structures,
        structures_from_posdata,
    )
    from mlipd.types import Structure

    torch.set_num_threads(1)  # as the drivers above (OMP_NUM_THREADS=1)
    s = Structure.from_atoms(lattice(n))
    engine = make_engine("lj:epsilon=0.0104,sigma=3.4,cutoff=3.0", dtype="float64")
    results = engine.compute([s])
    blob = ipi.encode_posdata(posdata_from_structures([s]))[ipi.HEADER_LEN:]
    k = max(3, 3000 // max(n // 100, 1))
    wire, eng = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(k):
            m = ipi.read_posdata(ipi.BufferReader(blob).read_exact)
            structures_from_posdata(m, numbers=s.numbers, pbc=s.pbc)
            ipi.encode_forceready(forceready_from_results(results))
        wire.append((time.perf_counter() - t0) / k)
        t0 = time.perf_counter()
        for _ in range(max(k // 10, 5)):
            engine.compute([s])
        eng.append((time.perf_counter() - t0) / max(k // 10, 5))
    return 1000 * min(wire), 1000 * min(eng)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 1000, 65536])
    p.add_argument("--steps-scale", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2, help="best of R runs per case")
    p.add_argument("--baseline-src", default=None,
                   help="directory holding another mlipd/ package: adds base-zero, base-lj")
    args = p.parse_args(argv)
    # a TERM (e.g. from `timeout`) unwinds through the finally blocks that kill i-PI
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kinds = ["ipi-dummy", "mlipd-zero", "mlipd-lj"]
    if args.baseline_src:
        kinds += ["base-zero", "base-lj"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlipd-bench-") as tmp:
        for n in args.sizes:
            steps = max(int(STEPS.get(n, 50) * args.steps_scale), WARMUP + 5)
            ms = {k: [] for k in kinds}
            for r in range(args.repeats):  # interleaved: load drifts hit every client alike
                for k in kinds:
                    ms[k].append(run_one(k, n, steps, Path(tmp) / f"{n}-{k}-{r}",
                                         args.baseline_src))
                    print(f"N={n:6d} {k:10s} run {r}: {ms[k][-1]:9.3f} ms/step", flush=True)
            best = {k: min(v) for k, v in ms.items()}
            best["wire"], best["engine"] = in_process_split(n, args.repeats)
            rows.append((n, steps, best))
    load = os.getloadavg()
    lines = [
        "# mlipd drive vs i-pi-py_driver -m dummy: ms per i-PI MD step",
        "",
        f"`python benchmarks/bench_driver_overhead.py {' '.join(argv or sys.argv[1:])}`; "
        f"best of {args.repeats} interleaved runs; {os.cpu_count()} CPUs, "
        f"load average at the end {load[0]:.1f}; UNIX socket, NVE, 1 bead, argon simple cubic.",
        "mlipd-zero: LJ with a 3 Å cutoff (no neighbours at 3.8 Å spacing): mlipd's full path "
        "(engine call included) without physics.",
        "mlipd-lj: LJ with a 6 Å cutoff (real forces). Ratios are against ipi-dummy.",
        "",
        "| atoms | steps | ipi-dummy ms | mlipd-zero ms | mlipd-lj ms | zero/dummy | lj/dummy |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, steps, b in rows:
        lines.append(f"| {n} | {steps} | {b['ipi-dummy']:.3f} | {b['mlipd-zero']:.3f} | "
                     f"{b['mlipd-lj']:.3f} | {b['mlipd-zero'] / b['ipi-dummy']:.2f} | "
                     f"{b['mlipd-lj'] / b['ipi-dummy']:.2f} |")
    if args.baseline_src:
        lines += [
            "",
            f"Before/after in the same run: base-* is the mlipd tree in `{args.baseline_src}` "
            "(same commands, PYTHONPATH pointing there).",
            "",
            "| atoms | base-zero ms | mlipd-zero ms | base-zero/dummy | mlipd-zero/dummy | "
            "base-lj ms | mlipd-lj ms | lj speed-up |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, _steps, b in rows:
            d = b["ipi-dummy"]
            lines.append(f"| {n} | {b['base-zero']:.3f} | {b['mlipd-zero']:.3f} | "
                         f"{b['base-zero'] / d:.2f} | {b['mlipd-zero'] / d:.2f} | "
                         f"{b['base-lj']:.3f} | {b['mlipd-lj']:.3f} | "
                         f"{b['base-lj'] / b['mlipd-lj']:.2f} |")
    lines += [
        "",
        "Where mlipd-zero's extra time goes, measured in-process (one torch thread): the driver's",
        "protocol path (decode POSDATA + Structures + encode FORCEREADY) vs the engine call",
        "(same structure every call, so the engine reuses its neighbour list as in MD).",
        "",
        "| atoms | protocol path ms | engine call (no neighbours) ms | protocol / ipi-dummy step |",
        "|---:|---:|---:|---:|",
    ]
    for n, _steps, b in rows:
        lines.append(f"| {n} | {b['wire']:.3f} | {b['engine']:.3f} | "
                     f"{b['wire'] / b['ipi-dummy']:.3f} |")
    table = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "driver_overhead.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
