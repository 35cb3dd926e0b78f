"""A client of ``mlipd serve`` in plain Python: only ``zmq``, ``msgpack`` and ``numpy``.

The part above the line ``# ---- the example`` is the wire schema of docs/protocol.md
written out, for other codes (C++, Julia, Fortran via a small shim...) to copy: a
DEALER socket, one msgpack map per request and per reply, arrays as raw little-endian
bytes with their dtype and shape. No mlipd import on the client side.

The example starts a server (``python -m mlipd serve --zmq tcp://127.0.0.1:0``; or use
``--endpoint`` for one already running), asks for ``info``, then computes an
energy-volume curve of diamond silicon with ONE ``batch`` request (the server
evaluates the structures in one engine call), fits an equation of state, and checks
the virial against the curve: the pressure ``trace(virial) / 3V`` integrated over the
volume gives the energy differences.

    python examples/zmq_client.py                  # CHGNet, float32, 9 volumes
    python examples/zmq_client.py --points 3       # seconds
"""

from __future__ import annotations

import argparse
import itertools
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

PROTOCOL = 1


def pack_array(a: np.ndarray) -> dict:
    """An array on the wire: dtype string, shape, the C-order little-endian bytes."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def unpack_array(d: dict) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=d["dtype"]).reshape(d["shape"])


def structure(numbers, positions, cell, pbc) -> dict:
    """numbers (N,) int; positions (N, 3) Å; cell (3, 3) Å, lattice vectors as ROWS;
    pbc three booleans."""
    return {"numbers": pack_array(np.asarray(numbers, dtype="<i4")),
            "positions": pack_array(np.asarray(positions, dtype="<f8")),
            "cell": pack_array(np.asarray(cell, dtype="<f8")),
            "pbc": [bool(x) for x in pbc]}


class ServerError(Exception):
    """An error reply: ``code`` is one of docs/protocol.md's stable codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class MlipdConnection:
    """One DEALER socket to one server. Every request gets exactly one reply; a
    request may be resent after a timeout (all ops are idempotent)."""

    def __init__(self, endpoint: str, *, timeout_s: float = 120.0) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.timeout_ms = int(timeout_s * 1000)
        self.ids = itertools.count(1)

    def request(self, op: str, **fields) -> dict:
        rid = next(self.ids)
        self.socket.send(msgpack.packb({"v": PROTOCOL, "id": rid, "op": op, **fields}))
        while True:
            if not self.socket.poll(self.timeout_ms, zmq.POLLIN):
                raise TimeoutError(f"no reply to {op} within {self.timeout_ms / 1000:g} s")
            reply = msgpack.unpackb(self.socket.recv())
            if reply.get("id") in (rid, None):  # None: the server could not read our id
                break  # any other id: a late reply to an earlier request, skipped
        if not reply["ok"]:
            raise ServerError(reply["error"]["code"], reply["error"]["message"])
        return reply

    def batch(self, structures: list[dict], *, virial: bool = True) -> list[dict]:
        """Energy (eV), forces (N, 3) eV/Å, virial (3, 3) eV (-dE/dstrain; None unless
        periodic in 3D) and per-atom extras of each structure, in order."""
        reply = self.request("batch", structures=structures, virial=virial)
        return [{"energy": r["energy"], "forces": unpack_array(r["forces"]),
                 "virial": None if r["virial"] is None else unpack_array(r["virial"]),
                 "extras": r["extras"]} for r in reply["results"]]

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


# ---- the example ----------------------------------------------------------------------


def start_server(model: str, dtype: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    """``mlipd serve`` on a free port; waits for its ``READY <endpoint>`` line."""
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlipd", "serve", "--model", model,
                                 "--dtype", dtype, "--zmq", "tcp://127.0.0.1:0"],
                                stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline().split()  # blocks until the model is loaded
    if not line or line[0] != "READY":
        proc.wait()
        raise RuntimeError(f"server did not start; see {log_path}")
    return proc, line[1]


def diamond_si(a: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Diamond silicon, the 8-atom cubic cell of edge ``a`` Å."""
    frac = np.array([[0, 0, 0], [0, 2, 2], [2, 0, 2], [2, 2, 0],
                     [1, 1, 1], [1, 3, 3], [3, 1, 3], [3, 3, 1]]) / 4.0
    cell = np.eye(3) * a
    return np.full(8, 14), frac @ cell, cell


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", help="a running server (default: start one)")
    p.add_argument("--model", default="chgnet", help="for the server this example starts")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--points", type=int, default=9, help="volumes on the curve (>= 3)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "output",
                   help="output directory (default: examples/output)")
    args = p.parse_args(argv)
    if args.points < 3:
        p.error("--points must be >= 3 (an equation of state is fitted)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    server, endpoint = (None, args.endpoint) if args.endpoint else start_server(
        args.model, args.dtype, out / "serve.log")
    conn = MlipdConnection(endpoint)
    try:
        info = conn.request("info")["value"]
        print(f"server {endpoint}: model {info['model']}, cutoff {info['cutoff']:g} Å, "
              f"{info['ranks']} rank(s) on {info['device']}, {info['dtype']}, "
              f"mlipd {info['version']}")
        edges = 5.43 * np.linspace(0.97, 1.03, args.points)
        structures = [structure(*diamond_si(a), pbc=(True, True, True)) for a in edges]
        t_batch = time.perf_counter()
        results = conn.batch(structures)
        batch_s = time.perf_counter() - t_batch
        try:  # an error reply, not silence: e.g. an element the model does not know
            conn.batch([structure([118], [[0, 0, 0]], np.eye(3) * 10, (True,) * 3)])
        except ServerError as e:
            print(f"an error reply, as documented: {e.code} ({e})")
    finally:
        conn.close()
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    volumes = edges**3 / 8  # Å³ per atom
    energies = np.array([r["energy"] for r in results]) / 8  # eV per atom
    # pressure from the virial (-dE/dstrain): stress = -virial / V, p = -trace(stress) / 3
    pressures = np.array([np.trace(r["virial"]) / 3 for r in results]) / (8 * volumes)
    curve = BirchMurnaghan(volumes, energies)
    gpa = 160.21766  # eV/Å³ in GPa
    print(f"{args.points} volumes in one batch request: {batch_s:.2f} s")
    print(f"equilibrium volume {curve.v0:.3f} Å³/atom (a = {(8 * curve.v0) ** (1 / 3):.4f} Å), "
          f"bulk modulus {curve.bulk_modulus * gpa:.0f} GPa")
    # the virial is -dE/dstrain: integrating its pressure over volume gives the energy steps
    steps = np.diff(energies)
    from_virial = -0.5 * (pressures[1:] + pressures[:-1]) * np.diff(volumes)  # trapezoids
    print(f"energy steps between volumes, from the energies and from the virial's pressure "
          f"(trapezoid rule): largest difference {1e3 * np.abs(steps - from_virial).max():.2f} "
          f"meV/atom, steps up to {1e3 * np.abs(steps).max():.1f} meV/atom")
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    plot(volumes, energies, pressures, curve, out / "zmq_ev_curve.png",
         title=f"Si, {info['model']} via ZeroMQ ({info['dtype']})")
    print(f"plot: {out / 'zmq_ev_curve.png'}")
    return 0


class BirchMurnaghan:
    """E(V) as a polynomial in V^(-2/3) (third order where there are >= 4 points, as the
    Birch-Murnaghan equation of state is; second order with 3)."""

    def __init__(self, volumes: np.ndarray, energies: np.ndarray) -> None:
        x = volumes ** (-2 / 3)
        self.fit = np.polynomial.Polynomial.fit(x, energies, min(3, len(volumes) - 1))
        roots = self.fit.deriv(1).roots()
        roots = roots[np.isreal(roots)].real
        x0 = roots[np.argmin(np.abs(roots - x.mean()))]  # the minimum inside the range
        self.v0 = x0 ** (-3 / 2)
        dx_dv = -2 / 3 * self.v0 ** (-5 / 3)
        self.bulk_modulus = self.v0 * self.fit.deriv(2)(x0) * dx_dv**2  # V d2E/dV2, eV/Å³

    def energy(self, volumes: np.ndarray) -> np.ndarray:
        return self.fit(volumes ** (-2 / 3))

    def pressure(self, volumes: np.ndarray) -> np.ndarray:
        """-dE/dV, eV/Å³."""
        return self.fit.deriv(1)(volumes ** (-2 / 3)) * 2 / 3 * volumes ** (-5 / 3)


def plot(volumes, energies, pressures, curve, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpa = 160.21766
    v = np.linspace(volumes.min(), volumes.max(), 100)
    fig, (e_ax, p_ax) = plt.subplots(1, 2, figsize=(9, 3.8))
    e_ax.plot(volumes, energies, "o", label="batch results")
    e_ax.plot(v, curve.energy(v), "-", label="Birch-Murnaghan fit")
    e_ax.set(xlabel="volume (Å³/atom)", ylabel="energy (eV/atom)")
    e_ax.legend()
    p_ax.plot(volumes, pressures * gpa, "o", label="trace(virial) / 3V")
    p_ax.plot(v, curve.pressure(v) * gpa, "-", label="-dE/dV of the fit")
    p_ax.set(xlabel="volume (Å³/atom)", ylabel="pressure (GPa)")
    p_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
