"""Malformed i-PI frames and structures the guards refuse, on the i-PI side of mlipd:
an `mlipd serve --ipi` link closes only that connection (the reason in the log),
reconnects, and answers the next valid step correctly, while ZeroMQ keeps serving;
`mlipd drive` with two connections closes only the bad one (issue 13, row 1: the
healthy connection used to die with the process; issue 16: malformed frames on
`serve --ipi` links)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers.fake_ipi import FakeIpi
from helpers.float64_bounds import assert_over_wire
from helpers.systems import argon

from mlipd.client import Client
from mlipd.engine import make_engine
from mlipd.protocols import ipi
from mlipd.protocols.convert import posdata_from_structures
from mlipd.server.testing import running_server
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(180)

REFERENCE = make_engine("lj", dtype="float64")


def check_step(fake: FakeIpi, seed: int) -> None:
    s = argon(seed=seed)
    (got,) = fake.step([s])
    (ref,) = REFERENCE.compute([s])
    # positions and results through i-PI's units and back, our constants on both sides
    assert_over_wire(got, ref, s, REFERENCE, geometry_roundings=2, output_roundings=2)


def with_positions(s: Structure, positions: np.ndarray) -> Structure:
    return Structure(numbers=s.numbers, positions=positions, cell=s.cell, pbc=s.pbc)


def posdata(s: Structure) -> bytes:
    return ipi.encode_posdata(posdata_from_structures([s]))


def _far(s):
    p = s.positions.copy()
    p[1] += [1e6, 0, 0]  # 1e5 cells away: vesin bins it in int32
    return posdata(with_positions(s, p))


def _overlap(s):
    p = s.positions.copy()
    p[1] = p[0]
    return posdata(with_positions(s, p))


def _huge_cell(s):
    return posdata(Structure(numbers=s.numbers, positions=s.positions,
                             cell=np.eye(3) * 1e300, pbc=True))


def _nan(s):
    blob = bytearray(posdata(s))
    blob[-8:] = np.array([np.nan]).tobytes()
    return bytes(blob)


def _huge_count(s):
    return ipi.Header.POSDATA.value + np.eye(3).tobytes() * 2 + np.int32(2**31 - 1).tobytes()


def _fewer_atoms(s):
    return posdata(Structure(numbers=s.numbers[:-1], positions=s.positions[:-1], cell=s.cell,
                             pbc=True))


MALFORMED = {  # case: (frame sent after INIT, words of the logged reason)
    "garbage": (lambda s: b"\x13\x37 definitely not i-PI \xff", "unknown i-PI message header"),
    "unknown header": (lambda s: b"HELLO       ", "unknown i-PI message header"),
    "client header": (lambda s: ipi.Header.FORCEREADY.value, "client message"),
    "GETFORCE before POSDATA": (lambda s: ipi.Header.GETFORCE.value, "received in phase"),
    "NaN positions": (_nan, "non-finite value in positions"),
    "huge atom count": (_huge_count, "atom count"),
    "atom count changes": (_fewer_atoms, "atom count changed"),
    "atom 1e5 cells away": (_far, "cells from the origin"),
    "overlapping atoms": (_overlap, "apart"),
    "cell of 1e300 Å": (_huge_cell, "cell entry"),
}


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("link")
    import tempfile
    from pathlib import Path

    sock_dir = Path(tempfile.mkdtemp(prefix="mlipd-", dir="/tmp"))  # short UNIX path
    fake = FakeIpi(sock_dir / "ipi.sock")
    try:
        with running_server(["--model", "lj", "--dtype", "float64", "--zmq",
                             "tcp://127.0.0.1:0", "--species", "Ar", "--ipi",
                             f"unix:{fake.path}"], log=tmp / "serve.log") as srv:
            fake.accept()
            yield srv, fake
    finally:
        fake.close()
        import shutil

        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_frame_closes_only_that_link_connection(linked, case):
    srv, fake = linked
    make, reason = MALFORMED[case]
    check_step(fake, seed=1)
    fake.conn.sendall(make(argon(seed=2)))
    assert fake.closed_by_peer()
    fake.drop()
    fake.accept()  # the link reconnects by itself
    check_step(fake, seed=3)
    with Client(srv.address) as c:  # the ZeroMQ side never noticed
        assert c.compute(argon(seed=4)).forces.shape == (4, 3)
    assert srv.proc.poll() is None
    assert reason in srv.log_text()


def test_drive_closes_only_the_connection_with_a_bad_structure(short_tmp):
    bad, good = FakeIpi(short_tmp / "bad.sock"), FakeIpi(short_tmp / "good.sock")
    proc = subprocess.Popen([sys.executable, "-m", "mlipd", "drive", "--model", "lj",
                             "--dtype", "float64", "--species", "Ar",
                             "--address", f"unix:{bad.path}", "--address", f"unix:{good.path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        bad.accept()
        good.accept()
        check_step(good, seed=1)
        check_step(bad, seed=2)
        bad.conn.sendall(ipi.Header.STATUS.value)
        assert ipi.read_header(bad.read_exact) is ipi.Header.READY
        bad.conn.sendall(_far(argon(seed=3)))  # the SIGFPE of the issue, before the guards
        assert bad.closed_by_peer()
        for seed in (4, 5):
            check_step(good, seed=seed)
        good.conn.sendall(ipi.Header.EXIT.value)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        bad.close()
        good.close()
    assert proc.returncode == 1, out  # a connection failed; the process did not crash
    assert "cells from the origin" in out
