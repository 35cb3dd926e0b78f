"""Round-trip overhead per structure through one ``mlipd serve`` (LJ), four front ends:

* zmq-client: ``mlipd.client.Client.compute`` (msgpack over ZeroMQ)
* zmq-ase:    ``MlipdCalculator`` (the same, behind ASE's Calculator API)
* ase-socket: ASE's ``SocketIOCalculator`` (i-PI protocol, UNIX socket), whose client
              is the server's ``--ipi`` link
* ipi:        the real i-PI (NVE) against another ``--ipi`` link, per MD step,
              i-PI's integrator included

Overhead = round trip minus the engine time of that very call (the server's
``stats``), so engine noise cancels. Positions move a little before every call.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import ase.io
import numpy as np
from ase.build import bulk

from mlipd.bench.timing import Deadline, Timing

MODEL = "lj:cutoff=4.5"  # first neighbour shell only: the engine stays small next to I/O
IPI_TIMEOUT_S = 900.0
REPS = {8: (1, 1, 2), 1000: (5, 5, 10), 65536: (16, 32, 32)}


def argon(n_atoms: int):
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(REPS[n_atoms])
    atoms.rattle(0.02, seed=1)
    return atoms


def measure(sizes: list[int], repeats: dict[int, int], *, tmp: Path, threads: int,
            seconds: float) -> list[dict]:
    """Per size: {"atoms", path: Timing of overhead s, "engine": Timing of engine s},
    sizes started within ``seconds``. This process is the client of zmq-* and the ASE
    server of ase-socket: it gets the malloc tuning mlipd's own processes apply."""
    from ase.calculators.socketio import SocketIOCalculator

    from mlipd.calculator import MlipdCalculator
    from mlipd.client import Client
    from mlipd.malloc import keep_freed_memory
    from mlipd.server.testing import running_server
    from mlipd.types import Structure

    keep_freed_memory()
    deadline = Deadline(seconds)

    ase_name, ipi_name = f"mlipd-bench-{uuid.uuid4().hex[:8]}", "bench_ipi"
    ipi_addr = f"unix:{tmp}/ipi_{ipi_name}"
    args = ["--model", MODEL, "--device", "cpu", "--zmq", "tcp://127.0.0.1:0", "--species", "Ar",
            "--ipi", f"unix:{ase_name}", "--ipi", ipi_addr]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    rows = []
    with running_server(args, log=tmp / "serve.log", env=env) as srv, \
            Client(srv.address, timeout_s=600) as client, Client(srv.address) as stats:
        for n in sizes:
            if deadline.passed:
                break
            atoms = argon(n)
            row: dict = {"atoms": n}
            zmq_atoms, ase_atoms = atoms.copy(), atoms.copy()
            # ASE binds /tmp/ipi_<name>; the server's link (re)connects to it
            with MlipdCalculator(srv.address, timeout_s=600) as zcalc, \
                    SocketIOCalculator(unixsocket=ase_name, timeout=600) as scalc:
                zmq_atoms.calc, ase_atoms.calc = zcalc, scalc
                calls = {"zmq-client": (atoms, lambda a: client.compute(Structure.from_atoms(a))),
                         "zmq-ase": (zmq_atoms, lambda a: a.get_forces()),
                         "ase-socket": (ase_atoms, lambda a: a.get_forces())}
                row.update(_interleaved(calls, stats, repeats[n], deadline))
            # a run once started finishes (or fails at its own time limit)
            row["ipi"] = _ipi_steps(tmp, atoms, ipi_addr, stats, max(4, repeats[n] // 2),
                                    Deadline(IPI_TIMEOUT_S))
            rows.append(row)
    return rows


def _interleaved(calls: dict, stats, repeats: int, deadline: Deadline) -> dict[str, Timing]:
    """Paths take turns call by call; overhead and engine time of every call."""
    rng = np.random.default_rng(0)
    over = {name: [] for name in calls}
    engine = []
    for atoms, call in calls.values():
        call(atoms)  # warm up (connections, allocations)
    for k in range(repeats):
        if k >= 3 and deadline.passed:
            break
        for name, (atoms, call) in calls.items():
            atoms.positions += rng.normal(0, 1e-4, atoms.positions.shape)
            t0 = time.perf_counter()
            call(atoms)
            rt = time.perf_counter() - t0
            eng = stats.stats()["engine_time"]["last_s"]
            over[name].append(rt - eng)
            engine.append(eng)
    out = {name: Timing(tuple(v)) for name, v in over.items()}
    out["engine"] = Timing(tuple(engine))
    return out


def _ipi_steps(workdir: Path, atoms, link: str, stats, steps: int, deadline: Deadline
               ) -> Timing:
    """Real i-PI NVE steps against the server's link: (wall - engine) per step, in
    blocks of steps between snapshots of the server's stats."""
    ase.io.write(workdir / "init.xyz", atoms, format="extxyz")
    name = link.split("ipi_", 1)[1]
    (workdir / "input.xml").write_text(f"""<simulation verbosity="quiet"
        sockets_prefix="{workdir}/ipi_">
  <output prefix="sim"><properties stride="1000" filename="out">[step]</properties></output>
  <total_steps>{steps + 8}</total_steps>
  <ffsocket name="mlipd" mode="unix"><address>{name}</address></ffsocket>
  <system><initialize nbeads="1"><file mode="ase" units="angstrom">init.xyz</file>
      <velocities mode="thermal" units="kelvin">20</velocities></initialize>
    <forces><force forcefield="mlipd"/></forces>
    <motion mode="dynamics"><dynamics mode="nve"><timestep units="femtosecond">1</timestep>
    </dynamics></motion>
    <ensemble><temperature units="kelvin">20</temperature></ensemble>
  </system></simulation>""")
    before = stats.stats()["engine_calls"]
    block = max(1, steps // 4)
    samples = []
    with (workdir / "ipi.log").open("w") as log:
        proc = subprocess.Popen(["i-pi", "input.xml"], cwd=workdir, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            # stats answers between engine calls: wall and engine time of a block match
            snap = _wait_calls(stats, proc, before + 2, workdir, deadline)  # past start-up
            t = time.perf_counter()
            for _ in range(steps // block):
                nxt = _wait_calls(stats, proc, snap["engine_calls"] + block, workdir, deadline)
                now = time.perf_counter()
                calls = nxt["engine_calls"] - snap["engine_calls"]
                eng = nxt["engine_time"]["total_s"] - snap["engine_time"]["total_s"]
                samples.append((now - t - eng) / calls)
                snap, t = nxt, now
            proc.wait(timeout=120)
        except (RuntimeError, TimeoutError) as e:
            return Timing(tuple(samples), f"failed: {str(e)[:200]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Timing(tuple(samples))


def _wait_calls(stats, proc, calls: int, workdir: Path, deadline: Deadline) -> dict:
    while (snap := stats.stats())["engine_calls"] < calls:
        if proc.poll() is not None:
            raise RuntimeError((workdir / "ipi.log").read_text()[-2000:])
        if deadline.passed:
            raise TimeoutError("the i-PI run took longer than its time limit")
        time.sleep(0.0005)
    return snap
