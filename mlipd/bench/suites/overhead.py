"""Overhead: what mlipd costs beyond the model's arithmetic.

1. i-PI MD step with six clients, one after the other at each size (NVE, one bead,
   argon simple cubic, UNIX socket): ``i-pi-py_driver -m dummy`` (zero forces, no
   physics), ``mlipd drive`` with LJ and a 1 Å cutoff (no pair within cutoff + skin in
   the timed steps: mlipd's whole path, engine call and its gradient included, without
   physics) eager, with ``--compile 1`` (``mlipd.engine.compiled``) and with
   ``--compile 1 --busy-poll-us`` (the link polls for the next message instead of
   sleeping), and with a 6 Å cutoff (real LJ) eager and with both options. Each mlipd
   run sits between two dummy runs (``ROUNDS`` rounds); a sample is the mean step over a
   block of consecutive steps (``ipi_runs``, ``blocks``), a ratio is paired: the client's
   median block over its two neighbouring dummy runs'.
2. The same comparison timed end to end (8 atoms): the wall time of whole i-PI NVE
   runs of ``WHOLE_STEPS`` steps (500 and 2,000 at quick), from i-PI's start to its exit,
   for ``i-pi-py_driver -m dummy`` and the mlipd-zero clients; the slope between the
   two lengths is the cost of one step with start-up and shutdown taken out.
3. Where mlipd-zero's time goes, in this process: the driver's protocol path (decode
   POSDATA, build Structures, encode FORCEREADY) against the engine call, eager and
   compiled.
4. Round-trip overhead per structure through one ``mlipd serve`` (``roundtrip``):
   ZeroMQ client, ``MlipdCalculator``, ASE's ``SocketIOCalculator`` and the real i-PI.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ase import Atoms

from mlipd.bench import ipi_runs, roundtrip
from mlipd.bench.report import Report, Table
from mlipd.bench.timing import Deadline, Timing
from mlipd.bench.workers import Worker

log = logging.getLogger(__name__)

REQUIRES = ("ipi",)
DESCRIPTION = "driver overhead vs i-PI's dummy driver; round trips of every front end"
# quick: ~410 s (each compiled client compiles for a few s at its start; a dummy run
# between every two clients)
BUDGET_S = {"tiny": 240.0, "quick": 720.0, "full": 3600.0}
GPU_BUDGET_S = {"full": 30.0}  # one GPU session: all suites in ~9 min
SIZES = {"tiny": [8], "quick": [8, 1000], "full": [8, 1000, 65536]}
STEPS = {"tiny": {8: 20}, "quick": {8: 200, 1000: 100},
         "full": {8: 400, 1000: 200, 65536: 25}}
# MD runs thousands of steps: time the steady state, after the steps that pay a
# client's one-time costs (allocator, torch's dispatch caches)
WARMUP = {"tiny": 5, "quick": 50, "full": 50}
RUN_TIMEOUT_S = 900.0  # one i-PI run, start-up included: a hung client ends here
BLOCKS = 3
ROUNDS = {"tiny": 1, "quick": 3, "full": 3}
ROUNDTRIP_REPEATS = {"tiny": {8: 10}, "quick": {8: 30, 1000: 10},
                     "full": {8: 300, 1000: 60, 65536: 6}}
# two run lengths per size: the slope between them is one step. Both longer than i-PI's
# floor: 100 and 500 dummy steps both took 2.62 s from i-PI's start to its exit (2,000:
# 5.58 s), so a slope from runs inside it reads ~0 for a fast client
WHOLE_STEPS = {"tiny": (50, 150), "quick": (500, 2000), "full": (500, 2000)}
WHOLE_ATOMS = 8
LJ = "lj:epsilon=0.0104,sigma=3.4,cutoff={}"
# zero: 1 Å + the 0.5 Å skin. A 3 Å cutoff (< the 3.8 Å spacing) was not enough: at 20 K
# with no forces the atoms drift as a gas and came within 3.5 Å after a few hundred steps
# (rebuilds, pairs, and a recompile of a compiled step inside a timed block). 1 Å holds for
# the runs here (<= 250 steps at 1,000 atoms); by ~1,000 steps two of 1,000 atoms came
# within 1 Å, and LJ's repulsion there blew the lattice apart
CUTOFF = {"mlipd-zero": 1.0, "mlipd-lj": 6.0}
# round trips before each call in the split table's last columns. From one force
# computation to the next a driver waits four times: i-PI 3's dispatch
# (ipi/interfaces/sockets.py) sends GETFORCE and STATUS after the forces, then integrates
# and sends STATUS and POSDATA; three short round trips stand for those waits
EXCHANGES = 3
# beyond any i-PI step timed here (a longer one falls back to a blocking read)
BUSY_POLL_US = 20_000
VARIANTS = {  # suffix: drive's options
    "": (),
    "-compiled": ("--compile", "1"),
    "-compiled-busy": ("--compile", "1", "--busy-poll-us", str(BUSY_POLL_US)),
}
KINDS = {"mlipd-zero": ("", "-compiled", "-compiled-busy"),
         "mlipd-lj": ("", "-compiled-busy")}
WHOLE_CLIENTS = ("ipi-dummy", *(f"mlipd-zero{v}" for v in KINDS["mlipd-zero"]))
# the per-step table takes most of the suite's time: three runs per client and size,
# a dummy run between every two
SHARES = {"drivers": 5.0, "whole runs": 2.0, "split": 1.0, "round trips": 1.5}


def lattice(n: int) -> Atoms:
    """Argon on a simple cubic lattice (3.8 Å), ``n`` atoms."""
    dims = {8: (2, 2, 2), 1000: (10, 10, 10), 65536: (64, 32, 32)}[n]
    grid = np.stack(np.meshgrid(*[np.arange(d) for d in dims], indexing="ij"), -1)
    return Atoms(f"Ar{int(np.prod(dims))}", positions=grid.reshape(-1, 3) * 3.8,
                 cell=np.array(dims) * 3.8, pbc=True)


def clients() -> dict[str, list[str]]:
    """ipi-dummy, then the mlipd clients (``KINDS``: each with its ``VARIANTS``)."""
    mlipd = {}
    for k, suffixes in KINDS.items():
        for suffix in suffixes:
            mlipd[k + suffix] = ipi_runs.mlipd_client(LJ.format(CUTOFF[k]), dtype="float64",
                                                      options=VARIANTS[suffix])
    return {"ipi-dummy": ipi_runs.ipi_client("dummy"), **mlipd}


def run(report: Report, *, size: str, device: str) -> None:
    parts = report.deadline.shares(SHARES, weights=SHARES.values())
    with tempfile.TemporaryDirectory(prefix="mlipd-bench-overhead-") as tmp:
        _, deadline = next(parts)
        _drivers(report, size=size, tmp=Path(tmp), deadline=deadline)
        _, deadline = next(parts)
        _whole_runs(report, lengths=WHOLE_STEPS[size], tmp=Path(tmp), deadline=deadline)
        _, deadline = next(parts)
        _split(report, size=size, deadline=deadline)
        _, deadline = next(parts)
        if deadline.passed:
            report.note("round-trip table not run: the suite's deadline had passed")
            return
        _roundtrips(report, size=size, tmp=Path(tmp), deadline=deadline)


def _drivers(report: Report, *, size: str, tmp: Path, deadline: Deadline) -> None:
    table = report.table("ms per i-PI MD step: mlipd drive vs i-pi-py_driver -m dummy, "
                         "median (min-max) of block means; / dummy: median (min-max) of "
                         "paired ratios; the client's own CPU ms per step",
                         ["atoms", "client", "steps timed", "ms per step", "/ dummy",
                          "client CPU ms per step"])
    for n in SIZES[size]:
        if deadline.passed:
            table.notes.append(f"{n} atoms and beyond: not run (deadline)")
            break
        _driver_rows(table, n=n, size=size, tmp=tmp, deadline=deadline)
    table.notes += [
        "mlipd-zero: LJ with a 1 Å cutoff (no pair within cutoff + skin in the timed "
        "steps): mlipd's full path, engine call and gradient included, without physics; "
        "mlipd-lj: a 6 Å cutoff (real forces). -compiled: the same with `--compile 1` (the "
        "model, forces and virial as one torch.compile'd function; compiled at the client's "
        "first step, before the warm-up). -busy: and `--busy-poll-us "
        f"{BUSY_POLL_US}` (between steps the client polls its socket instead of sleeping: "
        "it wakes at once and with warm caches, and keeps one core busy, which its CPU "
        "column shows).",
        f"{ROUNDS[size]} run(s) per mlipd client, each between two runs of the dummy (the "
        "paired ratio: the client's median block over the mean of its two neighbours'; "
        "the machine's speed drifts between runs, the pairs cancel it); "
        f"{WARMUP[size]} warm-up steps; each "
        f"run's timed steps split into {BLOCKS} blocks (a sample = a block's mean step, "
        "from the times i-PI's lines appear in its properties file, polled every ms: on a "
        "loaded machine a descheduled poller makes single blocks noisy). One torch thread "
        "per client; float64.",
        "CPU: the client process's run time over the timed steps per step (the scheduler's "
        "count, all its threads; median of the runs): what the client itself spends, "
        "whatever else the machine runs. A step's time is i-PI's own work, the client's "
        "CPU, and the wake-ups between the two processes.",
    ]


def _driver_rows(table: Table, *, n: int, size: str, tmp: Path, deadline: Deadline) -> None:
    """``_drivers``' rows for ``n`` atoms."""
    steps, argvs = STEPS[size][n], clients()
    samples: dict[str, list[float]] = {k: [] for k in argvs}
    cpu: dict[str, list[float]] = {k: [] for k in argvs}
    ratios: dict[str, list[float]] = {k: [] for k in argvs}
    failed: dict[str, str] = {}

    def timed(name: str, tag: str) -> float | None:
        """The run's median block (s), its blocks added to ``samples``."""
        try:
            blocks = ipi_runs.run(
                tmp / f"{n}-{name}-{tag}", lattice(n), argvs[name], steps=steps,
                warmup=WARMUP[size], threads=1, timeout=RUN_TIMEOUT_S, blocks=BLOCKS,
                client_cpu=cpu[name], temperature_k=20.0)
        except (RuntimeError, TimeoutError) as e:
            failed[name] = f"failed: {str(e).splitlines()[0][:200]}"
            return None
        samples[name] += blocks
        log.info("%d atoms, %s, run %s: blocks %s ms", n, name, tag,
                 " ".join(f"{1e3 * b:.3f}" for b in blocks))
        return float(np.median(blocks))

    for r in range(ROUNDS[size]):
        if r and deadline.passed:  # rounds are whole
            break
        # the dummy before and after each mlipd client: this VM's speed drifts by tens
        # of percent within minutes, so a client is compared with its neighbours in time
        before = timed("ipi-dummy", f"{r}-0")
        for j, name in enumerate(k for k in argvs if k != "ipi-dummy"):
            mine = None if name in failed else timed(name, str(r))
            after = timed("ipi-dummy", f"{r}-{j + 1}")
            dummy = [t for t in (before, after) if t is not None]
            if mine is not None and dummy:
                ratios[name].append(mine / float(np.mean(dummy)))
                log.info("%d atoms, %s / dummy: %.2f", n, name, ratios[name][-1])
            before = after
    t = {k: Timing(tuple(v), failed.get(k)) for k, v in samples.items()}
    for k in argvs:
        paired = Timing(tuple(ratios[k]), failed.get(k) or failed.get("ipi-dummy"))
        table.add(n, k, steps, t[k].cell(1e-3),
                  paired.cell(digits=2) if k != "ipi-dummy" else "",
                  f"{1e3 * float(np.median(cpu[k])):.3f}" if cpu[k] else "")


def _whole_runs(report: Report, *, lengths: tuple[int, int], tmp: Path,
                deadline: Deadline) -> None:
    """The step timed end to end: whole i-PI runs of two lengths per client."""
    names = WHOLE_CLIENTS
    table = report.table(
        f"The same step timed end to end ({WHOLE_ATOMS} atoms): wall time of whole i-PI "
        "NVE runs, s, and the slope per step, ms",
        ["client", *(f"{n} steps, s" for n in lengths), "ms per step (slope)",
         "slope / dummy's"])
    slopes: dict[str, float] = {}
    for name in names:
        argv = clients()[name]
        walls = []
        for steps in lengths if not deadline.passed else ():  # a client's pair is whole
            try:
                walls.append(_whole_run_s(tmp / f"whole-{name}-{steps}", lattice(WHOLE_ATOMS),
                                          argv, steps=steps, timeout=RUN_TIMEOUT_S))
            except (RuntimeError, TimeoutError) as e:
                table.notes.append(f"{name}, {steps} steps: failed: {str(e)[:200]}")
                break
        if len(walls) < len(lengths):
            table.add(name, *(f"{w:.2f}" for w in walls),
                      *["not run"] * (len(lengths) - len(walls)), "", "")
            continue
        slopes[name] = (walls[-1] - walls[0]) / (lengths[-1] - lengths[0])
        ratio = (f"{slopes[name] / slopes['ipi-dummy']:.2f}" if "ipi-dummy" in slopes
                 else "")
        table.add(name, *(f"{w:.2f}" for w in walls), f"{1e3 * slopes[name]:.3f}", ratio)
    table.notes += [
        "One run per client and length, one after the other; wall time from i-PI's first "
        "step (its line in the properties file) to its exit: the client's start-up and "
        "first call (where a compiled client compiles) are out, i-PI's shutdown cancels in "
        "the slope.",
        "Why the two ways differ: the per-step table is the mean interval between i-PI's "
        "property lines over blocks of consecutive steps inside one run, warm-up excluded; "
        "the slope is (T(long) - T(short)) / (long - short) over two separate runs, so it "
        "cancels start-up and shutdown only as far as they are equal in both runs, carries "
        "both runs' scheduling noise in one difference, and includes steps whose requests "
        "i-PI's threads (its force-field poller and the integrator, which hand requests "
        "over with sleeps of i-PI's latency) overlap with the client's work. Two clients "
        "that differ by block means can come out equal by the slope, and on a loaded "
        "machine (the load average above) either can swing by several ms: compare figures "
        "of one run only.",
    ]


def _whole_run_s(workdir: Path, atoms, client: list[str], *, steps: int,
                 timeout: float) -> float:
    """Seconds from i-PI's first step (its line in the properties file) to its exit,
    ``steps`` NVE steps forced by ``client``: the client's start-up and first call (a
    compiled client compiles there, for seconds that vary between runs) stay out."""
    workdir.mkdir(parents=True, exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="mlb-", dir="/tmp"))  # socket paths are short
    prefix = f"{sockdir}/ipi_"
    atoms.write(workdir / "init.xyz", format="extxyz")
    (workdir / "input.xml").write_text(ipi_runs.input_xml(prefix=prefix, steps=steps,
                                                          temperature_k=20.0))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = [a.format(socket=f"{prefix}{ipi_runs.SOCKET}", prefix=prefix) for a in client]
    procs: list[subprocess.Popen] = []
    try:
        with (workdir / "ipi.log").open("w") as log, (workdir / "client.log").open("w") as clog:
            t0 = time.perf_counter()
            procs.append(subprocess.Popen(["i-pi", "input.xml"], cwd=workdir, stdout=log,
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
            socket_file = sockdir / f"ipi_{ipi_runs.SOCKET}"
            while not socket_file.exists():  # i-pi-py_driver does not retry
                if procs[0].poll() is not None or time.perf_counter() - t0 > timeout:
                    raise RuntimeError("i-PI did not open its socket: "
                                       + (workdir / "ipi.log").read_text(errors="replace")[-500:])
                time.sleep(0.01)
            procs.append(subprocess.Popen(argv, cwd=workdir, stdout=clog,
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
            first = _first_step_seen(workdir / "sim.out", procs, t0 + timeout)
            rc = procs[0].wait(timeout=max(t0 + timeout - time.perf_counter(), 1.0))
            wall = time.perf_counter() - first
            if rc != 0:
                raise RuntimeError(f"i-PI exited {rc}: "
                                   + (workdir / "ipi.log").read_text(errors="replace")[-500:])
    except subprocess.TimeoutExpired as e:
        raise TimeoutError("an i-PI run took longer than its time limit") from e
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    return wall


def _first_step_seen(out: Path, procs: list[subprocess.Popen], until: float) -> float:
    """When the first step's line appeared in i-PI's properties file ``out``."""
    while True:
        now = time.perf_counter()
        with contextlib.suppress(FileNotFoundError):
            if any(line and not line.startswith("#") for line in out.read_text().splitlines()):
                return now
        if procs[0].poll() is not None or any(p.poll() is not None for p in procs[1:]):
            return now  # an early exit: the caller reads i-PI's status
        if now > until:
            raise TimeoutError("i-PI wrote no step within the run's time limit")
        time.sleep(0.001)


def _split(report: Report, *, size: str, deadline: Deadline) -> None:
    """Protocol path vs engine call of mlipd-zero, in this process."""
    import torch

    from mlipd.engine import make_engine
    from mlipd.protocols import ipi
    from mlipd.protocols.convert import (
        forceready_from_results,
        posdata_from_structures,
        structures_from_posdata,
    )
    from mlipd.types import Structure

    table = report.table("Where mlipd-zero's time goes, in this process: ms per step, "
                         "median (min-max) of 3 batches",
                         ["atoms", "protocol path", "engine call (no pairs)",
                          "engine call, compiled",
                          f"after {EXCHANGES} socket round trips: engine call CPU",
                          "compiled"])
    model = LJ.format(CUTOFF["mlipd-zero"])
    for n in SIZES[size]:
        if deadline.passed:
            break
        s = Structure.from_atoms(lattice(n))
        engines = [make_engine(model, device="cpu", dtype="float64", compile=c)
                   for c in ("0", "1")]
        results = [e.compute([s]) for e in engines]  # the compiled one compiles here
        blob = ipi.encode_posdata(posdata_from_structures([s]))[ipi.HEADER_LEN:]
        k = max(3, 3000 // max(n // 100, 1))
        wire, eng, woken = [], [[] for _ in engines], [[] for _ in engines]
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(k):
                m = ipi.read_posdata(io.BytesIO(blob).read)
                structures_from_posdata(m, numbers=s.numbers, pbc=s.pbc)
                ipi.encode_forceready(forceready_from_results(results[0]))
            wire.append((time.perf_counter() - t0) / k)
            for engine, times in zip(engines, eng, strict=True):
                t0 = time.perf_counter()
                for _ in range(max(k // 10, 5)):
                    engine.compute([s])
                times.append((time.perf_counter() - t0) / max(k // 10, 5))
        with _Echo() as echo:
            for _ in range(3):
                for engine, times in zip(engines, woken, strict=True):
                    times.append(echo.call_after_exchanges(engine.compute, [s],
                                                           calls=max(k // 10, 5)))
        table.add(n, Timing(tuple(wire)).cell(1e-3),
                  *(Timing(tuple(times)).cell(1e-3) for times in eng),
                  *(Timing(tuple(times)).cell(1e-3) for times in woken))
    table.notes += [
        f"torch threads {torch.get_num_threads()}; the same structure every call, so the "
        "engine reuses its neighbour list, as in MD.",
        f"After {EXCHANGES} socket round trips: before each call this process exchanges "
        f"{EXCHANGES} 12-byte messages with another process over a UNIX socket pair, as a "
        "driver waits for i-PI between two force computations (four times: GETFORCE, "
        "STATUS, STATUS, POSDATA); the column is the call's own CPU time (this "
        "thread's). Each wait for an answer lets the core go "
        "idle, and on a VM a call after idle waits can run with cold caches: the "
        "difference to the engine-call columns is what the waits cost the call itself, a "
        "part of what the live client spends per step (first table) beyond the protocol "
        "path and the engine call back to back.",
    ]


class _Echo:
    """A child process that answers each 12-byte message with 12 bytes (i-PI's side of
    a STATUS exchange, without i-PI)."""

    SCRIPT = ("import socket, sys\n"
              "s = socket.socket(fileno=int(sys.argv[1]))\n"
              "while (m := s.recv(12)):\n"
              "    s.sendall(m)\n")

    def __enter__(self) -> _Echo:
        self.mine, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()])
        theirs.close()
        self.mine.settimeout(30.0)
        return self

    def __exit__(self, *exc) -> None:
        self.mine.close()  # the child reads EOF and ends
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def call_after_exchanges(self, fn, *args, calls: int) -> float:
        """Mean CPU seconds of ``fn(*args)`` (this thread's), each call after
        ``EXCHANGES`` round trips."""
        total = 0.0
        for _ in range(calls):
            for _ in range(EXCHANGES):
                self.mine.sendall(b"STATUS      ")
                if len(self.mine.recv(12, socket.MSG_WAITALL)) < 12:
                    raise RuntimeError("the echo process ended")
            t0 = time.thread_time()
            fn(*args)
            total += time.thread_time() - t0
        return total / calls


def _roundtrips(report: Report, *, size: str, tmp: Path, deadline: Deadline) -> None:
    # in a process of its own: the client side there gets mlipd's malloc tuning
    with Worker("roundtrip") as w:
        rows = w.run(roundtrip.measure, SIZES[size], ROUNDTRIP_REPEATS[size], tmp=tmp,
                     threads=report.threads or 1, seconds=deadline.left(),
                     timeout=deadline.left() + 600)
    table = report.table(
        f"Round-trip overhead per structure ({roundtrip.MODEL}, one `mlipd serve`): "
        "ms, median (min-max)",
        ["atoms", "engine", "zmq-client", "zmq-ase", "ase-socket", "ipi (per MD step)",
         "ase-socket / zmq-ase", "ase-socket / zmq-client"])
    for r in rows:
        a = r["ase-socket"]
        table.add(r["atoms"], r["engine"].cell(1e-3), r["zmq-client"].cell(1e-3),
                  r["zmq-ase"].cell(1e-3), a.cell(1e-3), r["ipi"].cell(1e-3),
                  r["zmq-ase"].ratio(a), r["zmq-client"].ratio(a))
    table.notes += [
        "Overhead = round trip - engine time of the same call (the server's stats). ipi: "
        "NVE step wall time minus engine time in blocks of steps (i-PI's integrator "
        "included).",
        "The measuring process (zmq client, ASE's socket server) runs with "
        "mlipd.malloc.keep_freed_memory(), as mlipd's own processes do.",
    ]
