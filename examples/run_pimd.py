"""Path-integral MD of silicon with i-PI, forces from ``mlipd drive``.

Starts the real ``i-pi`` on ``examples/pimd_si/input.xml`` and ``mlipd drive``
as its force client over a UNIX socket in a temporary directory, waits for
both, prints a short summary and saves a plot of potential energy and
temperature over the run.

    python examples/run_pimd.py                      # CHGNet, float32, 4 beads, 20 steps
    python examples/run_pimd.py --model lj:epsilon=0.1,sigma=2.1,cutoff=5 --steps 100

float32 is mlipd's default precision (usually faster than float64), and the
geometry (positions, edge vectors, energy sums, forces, virials) stays float64, so
CHGNet agrees with its own calculator to ~1e-6 eV/atom. ``--dtype float64`` for
reference runs. The driver's log (``mlipd.log``) shows its start-up line and its
progress every 30 s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "pimd_si"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="chgnet")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--beads", type=int, default=4)
    p.add_argument("--temperature", type=float, default=300.0, help="K")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "output",
                   help="output directory (default: examples/output)")
    p.add_argument("--timeout", type=float, default=1800.0, help="s, for the whole run")
    args = p.parse_args(argv)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "si64.xyz", out / "si64.xyz")
    sockdir = Path(tempfile.mkdtemp(prefix="mlipd-", dir="/tmp"))  # short: socket paths <108 B
    xml = string.Template((HERE / "input.xml").read_text()).substitute(
        prefix=f"{sockdir}/ipi_", steps=args.steps, beads=args.beads,
        temperature=args.temperature)
    (out / "input.xml").write_text(xml)
    for stale in ("sim.out", "RESTART"):
        (out / stale).unlink(missing_ok=True)

    procs = []
    t0 = time.perf_counter()
    try:
        with (out / "ipi.log").open("w") as ipi_log, (out / "mlipd.log").open("w") as drv_log:
            procs.append(subprocess.Popen(["i-pi", "input.xml"], cwd=out, stdout=ipi_log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "mlipd", "drive", "--address", f"unix:{sockdir}/ipi_si",
                 "--structure", "si64.xyz", "--model", args.model, "--dtype", args.dtype],
                cwd=out, stdout=drv_log, stderr=subprocess.STDOUT, start_new_session=True))
            driver_rc = procs[1].wait(timeout=args.timeout)
            ipi_rc = procs[0].wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    wall = time.perf_counter() - t0
    if driver_rc != 0 or ipi_rc != 0:
        print(f"failed: mlipd drive exit {driver_rc}, i-pi exit {ipi_rc}; see {out}/*.log")
        return 1

    data = np.loadtxt(out / "sim.out", ndmin=2)  # step, time ps, conserved, T K, V eV, K_cv eV
    steps = int(data[-1, 0])
    print(f"model {args.model} ({args.dtype}), {args.beads} beads, 64 Si atoms, "
          f"{args.temperature:g} K target")
    print(f"steps:                 {steps}")
    print(f"mean potential energy: {data[:, 4].mean():.6f} eV "
          f"({data[:, 4].mean() / 64:.6f} eV/atom)")
    print(f"mean temperature:      {data[:, 3].mean():.1f} K (last {data[-1, 3]:.1f} K)")
    print(f"wall time:             {wall:.1f} s total, {wall / max(steps, 1):.3f} s/step "
          f"(incl. start-up)")
    batch = re.search(r"batch size (\d+)", (out / "mlipd.log").read_text(errors="replace"))
    print(f"i-PI batch_size:       {batch.group(1) if batch else 'unknown'} "
          "(the beads of a step in one message, one engine call)")
    plot(data, out / "pimd_si.png", title=f"i-PI PIMD, Si64, {args.beads} beads, {args.model}")
    print(f"plot:                  {out / 'pimd_si.png'}")
    return 0


def plot(data: np.ndarray, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(6, 5))
    t_fs = data[:, 1] * 1000
    ax1.plot(t_fs, data[:, 4], label="potential")
    ax1.plot(t_fs, data[:, 2], label="conserved")
    ax1.set_ylabel("energy (eV)")
    ax1.legend()
    ax2.plot(t_fs, data[:, 3])
    ax2.set_ylabel("temperature (K)")
    ax2.set_xlabel("time (fs)")
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
