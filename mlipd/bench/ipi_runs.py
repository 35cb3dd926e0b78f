"""Runs of the real i-PI against one force client, timed step by step.

i-PI writes its properties file at every step (``flush="1"``); the wall time at which
each step's line appears is recorded (the file is polled every millisecond), so a
step's time is what a user of that client waits for: i-PI's integrator, the socket
and the client's evaluation. Steps before ``warmup`` are not timed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import ase.io

from mlipd.bench.timing import Deadline

log = logging.getLogger(__name__)

POLL_S = 0.001
SOCKET = "b"  # i-PI's socket name; the file is <sockets_prefix><SOCKET>


def input_xml(*, prefix: str, steps: int, nbeads: int = 1, batch_size: int = 1,
              thermostat: bool = False, timestep_fs: float = 1.0,
              temperature_k: float = 300.0) -> str:
    """NVE (one bead) or PILE-thermostatted PIMD of ``init.xyz``."""
    motion = ("<dynamics mode='nvt'><timestep units='femtosecond'>{dt}</timestep>"
              "<thermostat mode='pile_l'><tau units='femtosecond'>100</tau></thermostat>"
              "</dynamics>" if thermostat else
              "<dynamics mode='nve'><timestep units='femtosecond'>{dt}</timestep></dynamics>"
              ).format(dt=timestep_fs)
    return f"""<simulation verbosity="quiet" sockets_prefix="{prefix}">
  <output prefix="sim">
    <properties stride="1" flush="1" filename="out">[step, potential]</properties>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>1</seed></prng>
  <ffsocket name="f" mode="unix"><address>{SOCKET}</address>
    <batch_size>{batch_size}</batch_size></ffsocket>
  <system>
    <initialize nbeads="{nbeads}">
      <file mode="ase" units="angstrom">init.xyz</file>
      <velocities mode="thermal" units="kelvin">{temperature_k}</velocities>
    </initialize>
    <forces><force forcefield="f"/></forces>
    <motion mode="dynamics">{motion}</motion>
    <ensemble><temperature units="kelvin">{temperature_k}</temperature></ensemble>
  </system>
</simulation>
"""


def mlipd_client(model: str, *, dtype: str = "float32", device: str = "cpu",
                 options: Sequence[str] = ()) -> list[str]:
    """``mlipd drive`` for the run's socket ({socket} is filled in) and template, with
    further ``options`` (e.g. ``--compile 1``)."""
    return [sys.executable, "-m", "mlipd", "drive", "--address", "unix:{socket}",
            "--structure", "init.xyz", "--model", model, "--dtype", dtype,
            "--device", device, *options]


def ipi_client(mode: str, *, param: str = "", pes_path: str | None = None) -> list[str]:
    """i-PI's own Python driver, ``i-pi-py_driver -m MODE [-P FILE] -o PARAM``."""
    argv = [shutil.which("i-pi-py_driver") or "i-pi-py_driver", "-u", "-a", SOCKET,
            "-S", "{prefix}", "-m", mode]
    if pes_path:
        argv += ["-P", pes_path]
    return argv + (["-o", param] if param else [])


def run(workdir: Path, atoms, client: Sequence[str], *, steps: int, warmup: int,
        threads: int, timeout: float, blocks: int | None = None,
        client_cpu: list[float] | None = None, **xml) -> list[float]:
    """Seconds of each step after ``warmup`` of i-PI driven by ``client``; with
    ``blocks``, the mean step of each of that many runs of consecutive steps instead
    (for steps too short to time one by one from a polled file). With ``client_cpu``,
    the client process's CPU seconds per step over the timed steps are appended to it
    (user + system, all its threads: what it spends, whatever the machine's load).

    ``client`` may contain ``{socket}`` (the socket's path) and ``{prefix}`` (i-PI's
    sockets_prefix). Raises RuntimeError if i-PI or the client fails, TimeoutError past
    ``timeout`` seconds (both processes are killed either way). A run once started
    finishes: callers check their deadlines between runs."""
    deadline = Deadline(timeout)
    workdir.mkdir(parents=True, exist_ok=True)
    sockdir = Path(tempfile.mkdtemp(prefix="mlb-", dir="/tmp"))  # socket paths are short
    prefix = f"{sockdir}/ipi_"
    ase.io.write(workdir / "init.xyz", atoms, format="extxyz")
    (workdir / "input.xml").write_text(input_xml(prefix=prefix, steps=steps + warmup, **xml))
    out = workdir / "sim.out"
    out.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    argv = [a.format(socket=f"{prefix}{SOCKET}", prefix=prefix) for a in client]
    log.info("i-PI run %s/%s: %d atoms x %d beads, %d + %d steps", workdir.parent.name,
             workdir.name, len(atoms), xml.get("nbeads", 1), warmup, steps)
    t0 = time.monotonic()
    procs: list[subprocess.Popen] = []
    try:
        with (workdir / "ipi.log").open("w") as ilog, (workdir / "client.log").open("w") as clog:
            procs.append(subprocess.Popen(["i-pi", "input.xml"], cwd=workdir, stdout=ilog,
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
            _wait_for(lambda: (sockdir / f"ipi_{SOCKET}").exists(), procs, deadline, workdir)
            procs.append(subprocess.Popen(argv, cwd=workdir, stdout=clog,
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
            times, cpu = _step_times(out, steps + warmup, procs, deadline, workdir,
                                     cpu_steps=(warmup, steps + warmup))
            procs[0].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    log.info("i-PI run %s/%s: done in %.1f s", workdir.parent.name, workdir.name,
             time.monotonic() - t0)
    if client_cpu is not None and len(cpu) == 2:
        before, after = cpu[warmup], cpu[steps + warmup]
        # threads alive at the end, from where they were at the start (0: started since);
        # a thread that ended in between takes its whole count with it, so it is left out
        client_cpu.append(sum(t - before.get(k, 0.0) for k, t in after.items()) / steps)
    if blocks:
        edges = [warmup + round(i * steps / blocks) for i in range(blocks + 1)]
        return [(times[b] - times[a]) / (b - a) for a, b in itertools.pairwise(edges)]
    stamps = [times[s] for s in range(warmup, steps + warmup + 1)]
    return [b - a for a, b in itertools.pairwise(stamps)]


def _step_times(out: Path, last: int, procs, deadline: Deadline, workdir: Path, *,
                cpu_steps: Sequence[int] = ()
                ) -> tuple[dict[int, float], dict[int, dict[int, float]]]:
    """Wall time at which each step's line appeared, until step ``last``; and for each
    of ``cpu_steps``, the client's (``procs[1]``) CPU seconds per thread when its line
    appeared."""
    seen: dict[int, float] = {}
    cpu: dict[int, dict[int, float]] = {}
    size = 0
    while last not in seen:
        now = time.perf_counter()
        try:
            new = out.stat().st_size
        except FileNotFoundError:
            new = 0
        if new != size:
            size = new
            for line in out.read_text().splitlines():
                if line and not line.startswith("#"):
                    seen.setdefault(int(float(line.split()[0])), now)
            for step in cpu_steps:
                if step in seen and step not in cpu:
                    cpu[step] = _cpu_seconds(procs[1].pid)
            continue
        _check(procs, deadline, workdir)
        time.sleep(POLL_S)
    return seen, cpu


def _cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread of process ``pid`` so far, to the nanosecond (the
    scheduler's run time, ``/proc/PID/task/*/schedstat``; ``stat``'s clock ticks are 10
    ms, too coarse for a few dozen steps of a millisecond)."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            threads[int(task.name)] = int((task / "schedstat").read_text().split()[0]) * 1e-9
    return threads


def _wait_for(ready, procs, deadline: Deadline, workdir: Path) -> None:
    while not ready():
        _check(procs, deadline, workdir)
        time.sleep(0.01)


def _check(procs, deadline: Deadline, workdir: Path) -> None:
    for p, name in zip(procs, ("i-PI", "client"), strict=False):
        if p.poll() is not None:
            log = workdir / ("ipi.log" if name == "i-PI" else "client.log")
            raise RuntimeError(f"{name} exited ({p.returncode}) before the last step: "
                               + log.read_text(errors="replace")[-1500:])
    if deadline.passed:
        raise TimeoutError("an i-PI run took longer than its time limit")
