"""Bad input on one connection of ``mlipd drive``: that connection is closed with a
clear message, the other connection of the same process keeps working, and the
exit status says a connection failed.

The misbehaving servers are small fakes written on ``mlipd.protocols.ipi``
(i-PI itself never sends bad bytes); the driver is the real ``mlipd drive``.
"""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
from conftest import MLIPD
from helpers import systems
from helpers.fake_ipi import FakeIpi
from helpers.float64_bounds import assert_over_wire

from mlipd.engine import make_engine
from mlipd.protocols import ipi
from mlipd.protocols.convert import posdata_from_structures
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(90)

LJ = "lj:epsilon=0.0104,sigma=3.4,cutoff=6.0"


def argon(seed=0):
    return systems.argon(2, seed=seed, a=5.3)


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


SHM_MESSAGE = ("POSDATA looks like i-PI's shm mode (an atom count, then shared-memory names): "
               "use --mode shm")
SHM_NAMES = {k: f"ipi_shm_4242_7_{k}" for k in ipi.SHM_KINDS}  # i-PI's naming


def bad_shm_frame(srv, s):
    """i-PI in shm mode, the driver in socket mode (the user forgot --mode shm)."""
    srv.conn.sendall(ipi.encode_shm_posdata(ipi.ShmPosData(s.n_atoms, SHM_NAMES)))


def bad_shm_frame_batched(srv, s):
    srv.conn.sendall(ipi.encode_init(ipi.Init(bead=0, text=b"batch_size:2")))
    srv.conn.sendall(ipi.encode_shm_posdata(ipi.ShmPosData(s.n_atoms, SHM_NAMES)))


CASES = {
    "garbage": (bad_garbage, "unknown i-PI message header"),
    "wrong_header": (bad_header, "unknown i-PI message header b'HELLO       '"),
    "client_header": (bad_client_header, "FORCEREADY is a client message"),
    "wrong_order": (bad_order, "GETFORCE received in phase NEEDINIT"),
    "atom_count_change": (bad_atom_count_change, "atom count changed mid-run from 32 to 31"),
    "nan_positions": (bad_nan_positions, "non-finite value in positions"),
    "huge_atom_count": (bad_huge_count, "atom count 2147483647 outside 1..5000000"),
    "shm_frame": (bad_shm_frame, SHM_MESSAGE),
    "shm_frame_batched": (bad_shm_frame_batched, SHM_MESSAGE),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_connection_is_closed_others_keep_working(case, processes, short_tmp):
    send_bad, message = CASES[case]
    good, bad = FakeIpi(short_tmp / "good"), FakeIpi(short_tmp / "bad")
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
        assert bad.closed_by_peer()
        # the same process still serves the good connection, correctly
        engine = make_engine(LJ, dtype="float64")
        for seed in (1, 2):
            s2 = argon(seed=seed)
            (got,) = good.step([s2])
            (ref,) = engine.compute([s2])
            # positions and results through i-PI's units and back (2 roundings each)
            assert_over_wire(got, ref, s2, engine, geometry_roundings=2, output_roundings=2)
        assert len(first) == 1
        good.conn.sendall(ipi.Header.EXIT.value)
        out, _ = proc.communicate(timeout=30)
    finally:
        good.close()
        bad.close()
    assert proc.returncode == 1, out
    assert message in out, out
    assert "1 of 2 connections failed" in out
    assert "EXIT after 3 force requests" in out


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
    srv = FakeIpi(short_tmp / "srv")
    try:
        proc = processes.start([*MLIPD, "drive", "--address", f"unix:{srv.path}",
                                "--structure", short_tmp / "four.xyz", "--model", LJ,
                                "--dtype", "float64"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        srv.accept(proc)
        srv.conn.sendall(ipi.encode_posdata(posdata_from_structures([argon()])))
        assert srv.closed_by_peer()
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


def run_cli(processes, *args, timeout=60):
    """``mlipd *args`` to the end: (exit code, output, seconds)."""
    t0 = time.monotonic()
    proc = processes.start([*MLIPD, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out, time.monotonic() - t0


@pytest.mark.parametrize(("address", "words"), [
    ("tcp://127.0.0.1:5555", "not a URL (tcp://... is for mlipd serve --zmq)"),
    ("127.0.0.1", "expected unix:NAME, unix:/path/to/socket, shm:NAME (i-PI's shm mode) "
                  "or HOST:PORT"),
    ("::1:31415", "an IPv6 address goes in brackets: [::1]:PORT"),
    ("localhost:port", "port 'port' is not a number"),
    ("unix:", "empty socket name"),
])
def test_malformed_address_refused_at_parse_time(processes, address, words):
    """Refused by the argument parser (before torch or any model loads), with the
    expected forms."""
    rc, out, _ = run_cli(processes, "drive", "--address", address, "--species", "Ar",
                         "--model", LJ)
    assert rc == 2, out
    assert "argument --address" in out, out  # the parser's own refusal
    assert words in out, out


def test_host_that_does_not_resolve_fails_at_once(processes):
    """Before the model loads, with no connection retries (``.invalid`` never resolves)."""
    rc, out, seconds = run_cli(processes, "drive", "--address", "nothere.invalid:31415",
                               "--species", "Ar", "--model", LJ, "--connect-timeout", "60")
    assert rc == 2, out
    assert "host 'nothere.invalid' does not resolve" in out, out
    assert "engine ready" not in out  # refused before loading the model
    assert seconds < 10, seconds  # not the 60 s of --connect-timeout


def test_missing_unix_socket_names_its_path(processes, short_tmp):
    """``unix:NAME`` means ``<prefix>NAME``: the message names that file, after
    retrying for --connect-timeout and no longer."""
    rc, out, seconds = run_cli(processes, "drive", "--address", "unix:nothere",
                               "--sockets-prefix", f"{short_tmp}/ipi_", "--species", "Ar",
                               "--model", LJ, "--connect-timeout", "1.5")
    assert rc == 1, out
    assert (f"cannot connect to unix:nothere ({short_tmp}/ipi_nothere) within 1.5 s: "
            f"no socket file {short_tmp}/ipi_nothere") in out, out
    assert seconds < 20, seconds


def test_socket_appearing_within_connect_timeout_is_served(processes, short_tmp):
    """The driver keeps retrying while the socket file is missing, within the timeout."""
    srv = None
    try:
        proc = processes.start([*MLIPD, "drive", "--address", f"unix:{short_tmp}/late",
                                "--species", "Ar", "--model", LJ, "--dtype", "float64",
                                "--connect-timeout", "60"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(2.0)  # the driver is up and retrying by now (or still loading: both fine)
        assert proc.poll() is None
        srv = FakeIpi(short_tmp / "late")
        srv.accept(proc)
        (got,) = srv.step([argon()])
        srv.conn.sendall(ipi.Header.EXIT.value)
        out, _ = proc.communicate(timeout=30)
    finally:
        if srv is not None:
            srv.close()
    assert proc.returncode == 0, out
    assert np.isfinite(got.energy)


def test_unknown_element_refused_at_start_up(processes, short_tmp):
    """An element the model does not know is refused by symbol once the model has
    loaded, before any connection (the server would only see its socket closed)."""
    from ase import Atoms

    Atoms("SiOg", positions=[[0, 0, 0], [2, 0, 0]], cell=np.eye(3) * 8, pbc=True).write(
        short_tmp / "og.xyz", format="extxyz")
    srv = FakeIpi(short_tmp / "srv")
    try:
        rc, out, _ = run_cli(processes, "drive", "--address", f"unix:{srv.path}",
                             "--structure", short_tmp / "og.xyz", "--model", "chgnet")
        srv.listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            srv.listener.accept()  # nobody ever connected
    finally:
        srv.close()
    assert rc == 2, out
    assert f"model 'chgnet' does not know Og (Z=118) (in {short_tmp / 'og.xyz'})" in out, out
    assert "connecting to" not in out


def test_progress_start_up_line_and_counts(processes, short_tmp):
    """The start-up line says what runs; progress lines come every --progress-every s;
    the end counts force requests (``-v`` after the command is accepted)."""
    srv = FakeIpi(short_tmp / "srv")
    try:
        proc = processes.start([*MLIPD, "drive", "-v", "--address", f"unix:{srv.path}",
                                "--species", "Ar", "--model", LJ, "--dtype", "float64",
                                "--threads", "1", "--progress-every", "0.2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        srv.accept(proc)
        for seed in range(3):
            srv.step([argon(seed=seed)])
            time.sleep(0.3)
        srv.conn.sendall(ipi.Header.EXIT.value)
        out, _ = proc.communicate(timeout=30)
    finally:
        srv.close()
    assert proc.returncode == 0, out
    assert ("model lj (cutoff 6 Å, 1 layer), device cpu, dtype float64, 1 rank, 1 thread; "
            "memory: ") in out, out
    assert "DEBUG" in out  # -v after the command: debug output
    progress = [line for line in out.splitlines() if "mlipd.driver.progress" in line]
    assert progress, out
    assert any("structures/s) in 1 engine call, mean engine time" in line
               for line in progress), out
    assert "EXIT after 3 force requests (3 structures, 3 computed)" in out
    assert "in all" in out
    assert "3 force requests, 3 structures (" in out


def test_version_and_bad_threads(processes):
    import mlipd

    rc, out, _ = run_cli(processes, "--version")
    assert (rc, out.strip()) == (0, f"mlipd {mlipd.__version__}")
    rc, out, _ = run_cli(processes, "drive", "--address", "unix:x", "--species", "Ar",
                         "--model", LJ, "--threads", "0")
    assert rc == 2
    assert "--threads must be >= 1, got 0" in out
