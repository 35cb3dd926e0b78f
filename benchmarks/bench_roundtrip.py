"""Round-trip overhead per structure: ZeroMQ vs the i-PI socket protocol, side by side.

One ``mlipd serve`` process (LJ) serves both front ends at once:

* zmq-client: ``mlipd.client.Client.compute`` (msgpack over ZeroMQ)
* zmq-ase:    ``MlipdCalculator`` (the same, behind ASE's Calculator API)
* ase-socket: ASE's ``SocketIOCalculator`` (i-PI protocol, unix socket), whose
              client is the server's ``--ipi`` link
* ipi:        the real i-PI (NVE MD, unix socket) against another ``--ipi`` link;
              per step, with i-PI's own integrator time included

Overhead = round trip minus the engine time of that very call (the server's
``stats``: ``engine_time.last_s``), so engine noise cancels. Positions move a
little before every call so that no layer can answer from a cache.

    python benchmarks/bench_roundtrip.py [--sizes 8 1000 65536] [--quick]

Writes benchmarks/results/roundtrip.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import ase.io
import numpy as np
from ase.build import bulk
from ase.calculators.socketio import SocketIOCalculator

from mlipd.calculator import MlipdCalculator
from mlipd.client import Client
from mlipd.server.testing import running_server
from mlipd.types import Structure

MODEL = "lj:cutoff=4.5"  # first neighbour shell only: the engine stays small next to I/O
REPEATS = {8: 300, 1000: 60, 65536: 6}
RESULTS = Path(__file__).parent / "results"
MALLOC_NOTE = ""


def argon(n_atoms: int):
    reps = {8: (1, 1, 2), 1000: (5, 5, 10), 65536: (16, 32, 32)}[n_atoms]
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(reps)
    atoms.rattle(0.02, seed=1)
    return atoms


def interleaved(calls: dict, stats_client: Client, repeats: int) -> dict:
    """calls: {path: (atoms, call(atoms))}. Returns {path: (round trips, engine times)}
    in s. The paths take turns call by call, so a busy machine slows them alike."""
    rng = np.random.default_rng(0)
    out = {name: ([], []) for name in calls}
    for atoms, call in calls.values():
        call(atoms)  # warm up (connections, allocations)
    for _ in range(repeats):
        for name, (atoms, call) in calls.items():
            atoms.positions += rng.normal(0, 1e-4, atoms.positions.shape)
            t0 = time.perf_counter()
            call(atoms)
            out[name][0].append(time.perf_counter() - t0)
            out[name][1].append(stats_client.stats()["engine_time"]["last_s"])
    return out


def summarise(rt, eng) -> dict:
    rt, eng = np.array(rt), np.array(eng)
    return {"roundtrip_ms": 1e3 * float(np.median(rt)), "engine_ms": 1e3 * float(np.median(eng)),
            "overhead_ms": 1e3 * float(np.median(rt - eng))}


def ipi_per_step(workdir: Path, atoms, link_address: str, stats_client: Client,
                 steps: int) -> dict:
    """Real i-PI NVE steps against the server: (wall per step - engine per step)."""
    ase.io.write(workdir / "init.xyz", atoms, format="extxyz")
    name = link_address.split("ipi_", 1)[1]
    (workdir / "input.xml").write_text(f"""<simulation verbosity="quiet"
        sockets_prefix="{workdir}/ipi_">
  <output prefix="sim"><properties stride="1000" filename="out">[step]</properties></output>
  <total_steps>{steps + 2}</total_steps>
  <ffsocket name="mlipd" mode="unix"><address>{name}</address></ffsocket>
  <system><initialize nbeads="1"><file mode="ase" units="angstrom">init.xyz</file>
      <velocities mode="thermal" units="kelvin">20</velocities></initialize>
    <forces><force forcefield="mlipd"/></forces>
    <motion mode="dynamics"><dynamics mode="nve"><timestep units="femtosecond">1</timestep>
    </dynamics></motion>
    <ensemble><temperature units="kelvin">20</temperature></ensemble>
  </system></simulation>""")
    before = stats_client.stats()["engine_calls"]
    log = open(workdir / "ipi.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["i-pi", "input.xml"], cwd=workdir, stdout=log,
                            stderr=subprocess.STDOUT)
    # The loop thread answers `stats` between engine calls, so each snapshot sits at
    # an engine-call boundary: wall and engine time between two snapshots match.
    try:
        first = _wait_calls(stats_client, proc, before + 2, workdir)  # past i-PI's start-up
        t1 = time.perf_counter()
        last = _wait_calls(stats_client, proc, first["engine_calls"] + steps, workdir)
        wall = time.perf_counter() - t1
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    calls = last["engine_calls"] - first["engine_calls"]
    engine_s = last["engine_time"]["total_s"] - first["engine_time"]["total_s"]
    return {"roundtrip_ms": 1e3 * wall / calls, "engine_ms": 1e3 * engine_s / calls,
            "overhead_ms": 1e3 * (wall - engine_s) / calls}


def _wait_calls(stats_client: Client, proc, calls: int, workdir: Path) -> dict:
    while (snap := stats_client.stats())["engine_calls"] < calls:
        if proc.poll() is not None:
            raise RuntimeError((workdir / "ipi.log").read_text()[-2000:])
        time.sleep(0.0005)
    return snap


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 1000, 65536])
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    p.add_argument("--no-ipi", action="store_true", help="skip the real i-PI column")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="leave this process's malloc alone (the server tunes its own)")
    args = p.parse_args(argv)
    if not args.no_malloc_tuning:
        # this process is the client of zmq-* and the ASE server of ase-socket: both
        # paths get the tuning that `mlipd serve` and `mlipd drive` apply to themselves
        from mlipd.malloc import keep_freed_memory

        keep_freed_memory()
    global MALLOC_NOTE
    MALLOC_NOTE = ("untuned" if args.no_malloc_tuning
                   else "tuned with mlipd.malloc.keep_freed_memory()")
    RESULTS.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlipd-bench-", dir="/tmp") as tmp:
        tmp = Path(tmp)
        ase_name, ipi_name = f"mlipd-bench-{uuid.uuid4().hex[:8]}", "bench_ipi"
        ase_addr = f"unix:{ase_name}"
        ipi_addr = f"unix:{tmp}/ipi_{ipi_name}"
        server_args = ["--model", MODEL, "--zmq", "tcp://127.0.0.1:0", "--species", "Ar",
                       "--ipi", ase_addr, "--ipi", ipi_addr]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        with running_server(server_args, log=tmp / "serve.log", env=env) as srv, \
                Client(srv.address, timeout_s=600) as client, \
                Client(srv.address) as stats_client:
            for n in args.sizes:
                reps = max(2, REPEATS.get(n, 10) // (10 if args.quick else 1))
                atoms = argon(n)
                res = {"atoms": n, "repeats": reps}
                zmq_atoms, ase_atoms = atoms.copy(), atoms.copy()
                # ASE binds /tmp/ipi_<name>; the server's link (re)connects to it
                with MlipdCalculator(srv.address, timeout_s=600) as zcalc, \
                        SocketIOCalculator(unixsocket=ase_name, timeout=600) as scalc:
                    zmq_atoms.calc, ase_atoms.calc = zcalc, scalc
                    calls = {
                        "zmq-client": (atoms, lambda a: client.compute(Structure.from_atoms(a))),
                        "zmq-ase": (zmq_atoms, lambda a: a.get_forces()),
                        "ase-socket": (ase_atoms, lambda a: a.get_forces()),
                    }
                    for name, (rt, eng) in interleaved(calls, stats_client, reps).items():
                        res[name] = summarise(rt, eng)
                if not args.no_ipi:
                    steps = max(4, reps // 2)
                    res["ipi"] = ipi_per_step(tmp, atoms, ipi_addr, stats_client, steps)
                rows.append(res)
                print(format_row(res), flush=True)
    write_table(rows)
    return 0


def format_row(r: dict) -> str:
    parts = [f"{r['atoms']:>6} atoms"]
    for k in ("zmq-client", "zmq-ase", "ase-socket", "ipi"):
        if k in r:
            parts.append(f"{k}: {r[k]['overhead_ms']:8.3f} ms")
    if "ase-socket" in r:
        ratio = r["zmq-ase"]["overhead_ms"] / r["ase-socket"]["overhead_ms"]
        parts.append(f"zmq/ase = {ratio:.2f}")
    return "  ".join(parts)


def write_table(rows: list[dict]) -> None:
    lines = ["# Round-trip overhead per structure (LJ, one `mlipd serve`, median ms)", "",
             f"Model `{MODEL}`; overhead = round trip - engine time of the same call. "
             "i-PI column: NVE step wall time minus engine time (includes i-PI's integrator). "
             f"Benchmark process (zmq client, ASE's socket server) malloc: {MALLOC_NOTE}.",
             "", "| atoms | engine | zmq-client | zmq-ase | ase-socket | ipi | "
             "zmq-ase / ase-socket | zmq-client / ase-socket |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ipi = f"{r['ipi']['overhead_ms']:.3f}" if "ipi" in r else "-"
        a = r["ase-socket"]["overhead_ms"]
        lines.append(f"| {r['atoms']} | {r['zmq-client']['engine_ms']:.3f} | "
                     f"{r['zmq-client']['overhead_ms']:.3f} | {r['zmq-ase']['overhead_ms']:.3f} | "
                     f"{a:.3f} | {ipi} | {r['zmq-ase']['overhead_ms'] / a:.2f} | "
                     f"{r['zmq-client']['overhead_ms'] / a:.2f} |")
    lines += ["", f"Machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
              f"load average at the end {os.getloadavg()[0]:.1f} (a shared box: "
              "ratios measured side by side, absolute times noisy)."]
    (RESULTS / "roundtrip.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
