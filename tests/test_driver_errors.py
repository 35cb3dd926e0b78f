"""Bad input on one connection of ``mlipd drive``: that connection is closed with a
clear message, the other connection of the same process keeps working, and the
exit status says a connection failed.

The misbehaving servers are small fakes written on ``mlipd.protocols.ipi``
(i-PI itself never sends bad bytes); the driver is the real ``mlipd drive``.
"""

from __future__ import annotations

import socket
import subprocess
import time

import numpy as np
import pytest
from conftest import MLIPD

from mlipd.engine import make_engine
from mlipd.protocols import ipi
from mlipd.protocols.convert import posdata_from_structures, results_from_forceready
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(90)

LJ = "lj:epsilon=0.0104,sigma=3.4,cutoff=6.0"


def argon(n_cells=2, seed=0):
    from ase.build import bulk

    atoms = bulk("Ar", "fcc", a=5.3, cubic=True).repeat((n_cells, n_cells, n_cells))
    atoms.rattle(0.05, seed=seed)
    return Structure.from_atoms(atoms)


class FakeServer:
    """An i-PI-like server on a UNIX socket, one client connection."""

    def __init__(self, path):
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(0.2)
        self.conn: socket.socket | None = None

    def accept(self, proc, timeout=30.0):
        """Wait for the driver, failing fast if its process died (no hang)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"driver exited early:\n{proc.stdout.read()}")
            try:
                self.conn, _ = self.listener.accept()
                self.conn.settimeout(30)
                return
            except TimeoutError:
                continue
        raise AssertionError("driver did not connect")

    def read_exact(self, n):
        out = b""
        while len(out) < n:
            chunk = self.conn.recv(n - len(out))
            if not chunk:
                raise ConnectionError("driver closed the connection")
            out += chunk
        return out

    def status(self) -> ipi.Header:
        self.conn.sendall(ipi.Header.STATUS.value)
        return ipi.read_header(self.read_exact)

    def step(self, structures, *, init=b"") -> list:
        if self.status() is ipi.Header.NEEDINIT:
            self.conn.sendall(ipi.encode_init(ipi.Init(bead=0, text=init)))
        assert self.status() is ipi.Header.READY
        self.conn.sendall(ipi.encode_posdata(posdata_from_structures(structures)))
        assert self.status() is ipi.Header.HAVEDATA
        self.conn.sendall(ipi.Header.GETFORCE.value)
        assert ipi.read_header(self.read_exact) is ipi.Header.FORCEREADY
        m = ipi.read_forceready(self.read_exact, batch_size=len(structures))
        return results_from_forceready(m)

    def closed_by_driver(self, timeout=30.0) -> bool:
        """True once the driver has closed its end (EOF or reset)."""
        self.conn.settimeout(timeout)
        try:
            while self.conn.recv(4096):
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self):
        for s in (self.conn, self.listener):
            if s is not None:
                s.close()


def bad_garbage(srv, s):
    srv.conn.sendall(b"\x13\x37 definitely not i-PI \xff\xfe")


def bad_header(srv, s):
    srv.conn.sendall(b"HELLO       ")


def bad_client_header(srv, s):
    srv.conn.sendall(ipi.Header.FORCEREADY.value)


def bad_order(srv, s):
    srv.conn.sendall(ipi.Header.GETFORCE.value)  # before any POSDATA


def bad_atom_count_change(srv, s):
    srv.step([s])
    smaller = Structure(numbers=s.numbers[:-1], positions=s.positions[:-1], cell=s.cell,
                        pbc=True)
    srv.conn.sendall(ipi.encode_posdata(posdata_from_structures([smaller])))


def bad_nan_positions(srv, s):
    blob = bytearray(ipi.encode_posdata(posdata_from_structures([s])))
    blob[-8:] = np.array([np.nan]).tobytes()
    srv.conn.sendall(bytes(blob))


def bad_huge_count(srv, s):
    srv.conn.sendall(ipi.Header.POSDATA.value + np.eye(3).tobytes() * 2
                     + np.int32(2**31 - 1).tobytes())


CASES = {
    "garbage": (bad_garbage, "unknown i-PI message header"),
    "wrong_header": (bad_header, "unknown i-PI message header b'HELLO       '"),
    "client_header": (bad_client_header, "FORCEREADY is a client message"),
    "wrong_order": (bad_order, "GETFORCE received in phase NEEDINIT"),
    "atom_count_change": (bad_atom_count_change, "atom count changed mid-run from 32 to 31"),
    "nan_positions": (bad_nan_positions, "non-finite value in positions"),
    "huge_atom_count": (bad_huge_count, "atom count 2147483647 outside 1..5000000"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_connection_is_closed_others_keep_working(case, processes, short_tmp):
    send_bad, message = CASES[case]
    good, bad = FakeServer(short_tmp / "good"), FakeServer(short_tmp / "bad")
    s = argon()
    try:
        proc = processes.start([*MLIPD, "drive", "--address", f"unix:{good.path}",
                                "--address", f"unix:{bad.path}", "--species", "Ar",
                                "--model", LJ, "--dtype", "float64"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        good.accept(proc)
        bad.accept(proc)
        first = good.step([s])
        send_bad(bad, s)
        assert bad.closed_by_driver()
        # the same process still serves the good connection, correctly
        engine = make_engine(LJ, dtype="float64")
        for seed in (1, 2):
            s2 = argon(seed=seed)
            (got,) = good.step([s2])
            (ref,) = engine.compute([s2])
            np.testing.assert_allclose(got.forces, ref.forces, rtol=1e-12, atol=1e-15)
        assert len(first) == 1
        good.conn.sendall(ipi.Header.EXIT.value)
        out, _ = proc.communicate(timeout=30)
    finally:
        good.close()
        bad.close()
    assert proc.returncode == 1, out
    assert message in out, out
    assert "1 of 2 connections failed" in out
    assert "EXIT after 3 steps" in out


def test_address_that_never_appears(processes, short_tmp):
    t0 = time.monotonic()
    proc = processes.start([*MLIPD, "drive", "--address", f"unix:{short_tmp}/nobody",
                            "--species", "Ar", "--model", LJ, "--dtype", "float64",
                            "--connect-timeout", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert f"cannot connect to unix:{short_tmp}/nobody within 1 s" in out
    assert time.monotonic() - t0 < 20


def test_template_mismatch_closes_connection(processes, short_tmp):
    """A template file with 4 atoms while the server sends 32."""
    from ase.build import bulk

    bulk("Ar", "fcc", a=5.3, cubic=True).write(short_tmp / "four.xyz", format="extxyz")
    srv = FakeServer(short_tmp / "srv")
    try:
        proc = processes.start([*MLIPD, "drive", "--address", f"unix:{srv.path}",
                                "--structure", short_tmp / "four.xyz", "--model", LJ,
                                "--dtype", "float64"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        srv.accept(proc)
        srv.conn.sendall(ipi.encode_posdata(posdata_from_structures([argon()])))
        assert srv.closed_by_driver()
        out, _ = proc.communicate(timeout=30)
    finally:
        srv.close()
    assert proc.returncode == 1
    assert "the server sent 32 atoms but the template structure has 4" in out


def test_setup_errors_exit_2(processes, short_tmp):
    proc = processes.start([*MLIPD, "drive", "--address", "localhost:notaport",
                            "--species", "Ar", "--model", LJ, "--dtype", "float64"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "port 'notaport' is not a number" in out


def test_address_forms():
    from mlipd.driver.socket_io import parse_address
    from mlipd.errors import SetupError

    assert parse_address("unix:md").path == "/tmp/ipi_md"  # i-PI's and ASE's default name
    assert parse_address("unix:md", sockets_prefix="/run/x_").path == "/run/x_md"
    assert parse_address("unix:/tmp/a/sock").path == "/tmp/a/sock"
    a = parse_address("localhost:31415")
    assert (a.host, a.port, a.is_unix) == ("localhost", 31415, False)
    assert parse_address("tcp:[::1]:8000").host == "::1"
    for bad in ("unix:", "31415", "host:0", "host:70000", ":5"):
        with pytest.raises(SetupError, match="address"):
            parse_address(bad)


def test_template_rules(short_tmp):
    from mlipd.driver.template import Template
    from mlipd.errors import ProtocolError, SetupError

    path = short_tmp / "ipi.xyz"  # i-PI's own xyz: ase.io sees no cell, i-PI is periodic
    path.write_text("2\n# CELL(abcABC): 10 10 10 90 90 90 Step: 0 positions{angstrom}\n"
                    "Si 0 0 0\nO 1 1 1\n")
    t = Template.from_file(str(path))
    assert t.pbc.all()
    assert t.numbers.tolist() == [14, 8]
    assert not Template.from_file(str(path), pbc=False).pbc.any()
    with pytest.raises(ProtocolError, match="sent 3 atoms but the template structure has 2"):
        t.numbers_for(3)
    assert Template.from_species("Ar").numbers_for(5).tolist() == [18] * 5
    with pytest.raises(SetupError, match="unknown element"):
        Template.from_species("Xx")
    with pytest.raises(SetupError, match="cannot read template"):
        Template.from_file(str(short_tmp / "missing.xyz"))
