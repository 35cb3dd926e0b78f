"""The compiled clients (``clients/``: C library, Fortran module, example programs), built
with CMake from a source checkout, and the probe programs' file formats; used by the tests
and by ``mlipd bench clients``.

``build_clients(build_dir)`` configures, builds and installs into ``build_dir`` and
returns the programs; any failure (no cmake, no compiler, libzmq or msgpack-c missing)
raises ``BuildFailed`` with the tool's output: the callers fail on it, never skip.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlipd.types import Result, Structure

SOURCE = Path(__file__).resolve().parents[2] / "clients"
BUILD_TIMEOUT_S = 600.0
INSTALL_HINT = ("apt-get install libzmq3-dev libmsgpack-dev gfortran cmake pkg-config "
                "(scripts/setup.sh does it)")


class BuildFailed(RuntimeError):
    """CMake could not configure, build or install the clients."""


@dataclass(frozen=True)
class ClientPrograms:
    """Paths of a built and installed ``clients/`` tree."""

    build: Path
    prefix: Path

    def program(self, name: str) -> Path:
        return self.build / name

    @property
    def pkg_config_path(self) -> str:
        return os.pathsep.join(str(p) for p in self.prefix.glob("lib*/pkgconfig"))


def build_clients(build_dir: Path) -> ClientPrograms:
    """Configure, build and install ``clients/`` under ``build_dir`` (``build/`` and
    ``prefix/``); raises ``BuildFailed`` with the log of the failing step."""
    if not SOURCE.is_dir():
        raise BuildFailed(f"{SOURCE}: no clients/ source tree (not a source checkout)")
    if shutil.which("cmake") is None:
        raise BuildFailed(f"cmake is not installed: {INSTALL_HINT}")
    build, prefix = build_dir / "build", build_dir / "prefix"
    steps = [["cmake", "-S", str(SOURCE), "-B", str(build), f"-DCMAKE_INSTALL_PREFIX={prefix}"],
             ["cmake", "--build", str(build), "--parallel", "2"],
             ["cmake", "--install", str(build)]]
    for argv in steps:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise BuildFailed(f"{' '.join(argv)}: no end within {BUILD_TIMEOUT_S:g} s") from e
        if proc.returncode != 0:
            raise BuildFailed(f"{' '.join(argv)} failed ({proc.returncode}); {INSTALL_HINT}\n"
                              f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return ClientPrograms(build=build, prefix=prefix)


# ---------------------------------------------------------------- the probes' files


def write_structures(path: Path, structures: Sequence[Structure]) -> None:
    """The probes' input (clients/examples/probe.c): int32 count, then per structure
    int32 n, int32 numbers[n], float64 positions[3n], int32 has_cell, float64 cell[9],
    int32 pbc[3], little-endian. has_cell is 0 for an all-zero cell (the probe then
    sends NULL and the client zeros, the same bytes)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(structures)))
        for s in structures:
            f.write(struct.pack("<i", s.n_atoms))
            f.write(np.ascontiguousarray(s.numbers, dtype="<i4").tobytes())
            f.write(np.ascontiguousarray(s.positions, dtype="<f8").tobytes())
            f.write(struct.pack("<i", int(np.any(s.cell != 0))))
            f.write(np.ascontiguousarray(s.cell, dtype="<f8").tobytes())
            f.write(np.asarray(s.pbc, dtype="<i4").tobytes())


def read_results(path: Path, structures: Sequence[Structure]) -> list[Result]:
    """The probes' output: per structure float64 energy, forces[3n], virial[9] (NaN:
    none, returned as None)."""
    raw = np.fromfile(path, dtype="<f8")
    out, k = [], 0
    for s in structures:
        n = s.n_atoms
        energy, forces = raw[k], raw[k + 1: k + 1 + 3 * n].reshape(n, 3)
        virial = raw[k + 1 + 3 * n: k + 10 + 3 * n].reshape(3, 3)
        k += 10 + 3 * n
        out.append(Result(energy=float(energy), forces=forces.copy(),
                          virial=None if np.isnan(virial).all() else virial.copy()))
    if k != raw.size:
        raise ValueError(f"{path}: {raw.size} numbers, expected {k}")
    return out


@dataclass(frozen=True)
class ProbeRun:
    """A probe's exit status, its stdout lines, and its results when it succeeded."""

    returncode: int
    lines: list[str]
    results: list[Result] | None

    def line(self, word: str) -> str:
        """The first stdout line starting with ``word``."""
        return next((ln for ln in self.lines if ln.startswith(word)), "")

    @property
    def seconds(self) -> list[float]:
        return [float(ln.split()[1]) for ln in self.lines if ln.startswith("seconds ")]


def run_probe(program: Path, endpoint: str, structures: Sequence[Structure], *, mode: str,
              workdir: Path, timeout_s: float = 60.0, key_dir: Path | None = None,
              wait_s: float = 300.0) -> ProbeRun:
    """Run a probe (``mlipd_probe_c`` / ``mlipd_probe_fortran``) once."""
    workdir.mkdir(parents=True, exist_ok=True)
    src, dst = workdir / "in.bin", workdir / "out.bin"
    dst.unlink(missing_ok=True)
    write_structures(src, structures)
    argv = [str(program), endpoint, repr(float(timeout_s)), mode, str(src), str(dst)]
    if key_dir is not None:
        argv.append(str(key_dir))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=wait_s)
    lines = (proc.stdout + proc.stderr).splitlines()
    ok = proc.returncode == 0 and "ok" in lines
    return ProbeRun(proc.returncode, lines, read_results(dst, structures) if ok else None)
