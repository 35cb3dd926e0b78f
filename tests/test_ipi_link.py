"""The i-PI link and the commands around it, through the real ``mlipd drive`` and
``mlipd serve``: no reconnection in drive, a request whose socket closed is dropped
unanswered (counted), a frame trickled too slowly is refused, interrupts report,
what can be checked before the model loads is (a port in use, a missing socket),
and a readable secret key is refused. The servers are ``helpers.fake_ipi.FakeIpi``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
from conftest import MLIPD
from helpers.fake_ipi import FakeIpi
from helpers.float64_bounds import assert_over_wire
from helpers.systems import argon

from mlipd.client import Client
from mlipd.server.testing import running_server

pytestmark = pytest.mark.timeout(120)

LJ = "lj:epsilon=0.0104,sigma=3.4,cutoff=6.0"
DRIVE = [*MLIPD, "drive", "--species", "Ar", "--model", LJ, "--dtype", "float64"]


def start_drive(processes, *args):
    return processes.start([*DRIVE, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)


def test_drive_ends_when_the_server_closes_and_does_not_reconnect(processes, short_tmp):
    """A server that closes without EXIT (ASE's way): drive ends, status 0, and never
    connects again although the socket is still there."""
    fake = FakeIpi(short_tmp / "srv")
    try:
        proc = start_drive(processes, "--address", f"unix:{fake.path}")
        fake.accept(proc)
        fake.step([argon()])
        fake.drop()
        out, _ = proc.communicate(timeout=60)
        fake.listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            fake.listener.accept()  # nobody came back
    finally:
        fake.close()
    assert proc.returncode == 0, out
    assert "server closed the connection after 1 force requests" in out, out
    assert out.count(": connected") == 1, out


def test_ipi_request_of_a_closed_socket_is_dropped_not_computed(short_tmp):
    """Two i-PI links of `serve`: link A's request waits for link B's bead (the gate,
    --max-wait-ms 60000); A's server closes meanwhile. The request is dropped when its
    socket closes (stats: dropped), no engine call ever runs it, and the link
    reconnects and serves the next request."""
    a, b = FakeIpi(short_tmp / "a"), FakeIpi(short_tmp / "b")
    try:
        with running_server(["--model", LJ, "--dtype", "float64", "--species", "Ar",
                             "--zmq", "tcp://127.0.0.1:0", "--max-wait-ms", "60000",
                             "--ipi", f"unix:{a.path}", "--ipi", f"unix:{b.path}"],
                            log=short_tmp / "serve.log") as srv:
            a.accept()
            b.accept()
            a.init()
            a.status()  # READY
            a.send(a.posdata_frame([argon()]))
            with Client(srv.address) as c:
                deadline = time.monotonic() + 30
                while c.stats()["queue_depth"] < 1:  # the request is queued, gated
                    assert time.monotonic() < deadline, c.stats()
                    time.sleep(0.02)
                a.drop()
                while c.stats()["dropped"].get("disconnected", 0) < 1:
                    assert time.monotonic() < deadline, c.stats()
                    time.sleep(0.02)
                stats = c.stats()
                assert stats["engine_calls"] == 0, stats
                assert stats["dropped"] == {"disconnected": 1}, stats
                a.accept()  # the link is back: both beads of the next step, one call
                a.post([argon(seed=1)])
                b.post([argon(seed=2)])
                assert a.collect(1)[0].forces.shape == b.collect(1)[0].forces.shape == (4, 3)
                assert c.stats()["batch_structures"] == {"2": 1}
    finally:
        a.close()
        b.close()


def test_frame_trickled_past_the_frame_timeout_is_refused(processes, short_tmp):
    """A POSDATA begun and never finished: closed after --frame-timeout, while --timeout
    (idle between messages) is long."""
    fake = FakeIpi(short_tmp / "srv")
    try:
        proc = start_drive(processes, "--address", f"unix:{fake.path}", "--frame-timeout", "1",
                           "--timeout", "600")
        fake.accept(proc)
        fake.init()
        fake.status()
        frame = fake.posdata_frame([argon()])
        fake.send(frame[: len(frame) // 2])
        assert fake.closed_by_peer(timeout_s=30)
        out, _ = proc.communicate(timeout=30)
    finally:
        fake.close()
    assert proc.returncode == 1, out
    assert "message incomplete after 1 s" in out, out


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_drive_interrupted_reports_and_exits_with_the_signal(processes, short_tmp, sig, code):
    fake = FakeIpi(short_tmp / "srv")
    try:
        proc = start_drive(processes, "--address", f"unix:{fake.path}")
        fake.accept(proc)
        for seed in range(2):
            fake.step([argon(seed=seed)])
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        fake.close()
    assert proc.returncode == code, out
    assert out.count(f"interrupted by {signal.Signals(sig).name}") == 1, out
    assert "in all, " in out, out
    assert "2 force requests, 2 structures" in out, out


def test_serve_interrupted_reports(short_tmp):
    with running_server(["--model", LJ, "--zmq", "tcp://127.0.0.1:0"],
                        log=short_tmp / "serve.log") as srv:
        with Client(srv.address) as c:
            c.compute(argon())
        assert srv.stop(sig=signal.SIGINT) == 0
        text = srv.log_text()
    assert text.count("interrupted by SIGINT") == 1, text
    assert "server stopped: requests=2 errors=0 engine_calls=1" in text, text  # info, compute


def test_port_in_use_refused_before_the_model_loads(processes):
    """One line naming the address and the way out; the model (CHGNet, seconds to load)
    is never loaded."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = processes.start([*MLIPD, "serve", "--model", "chgnet", "--zmq",
                                f"tcp://127.0.0.1:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"cannot bind tcp://127.0.0.1:{port}: Address already in use" in out, out
    assert "tcp://127.0.0.1:* for any free one" in out, out
    assert "engine ready" not in out, out
    assert "server stopped" not in out, out


def test_any_free_port_is_named_in_the_ready_line(short_tmp):
    with running_server(["--model", LJ, "--zmq", "tcp://127.0.0.1:*"],
                        log=short_tmp / "serve.log") as srv:
        host, _, port = srv.address.rpartition(":")
        assert host == "tcp://127.0.0.1"
        assert int(port) > 0
        with Client(srv.address) as c:
            assert c.ping() is not None


def test_drive_says_at_once_which_socket_it_waits_for(processes, short_tmp):
    path = short_tmp / "ipi_late"
    proc = start_drive(processes, "--address", "unix:late", "--sockets-prefix",
                       f"{short_tmp}/ipi_", "--connect-timeout", "1")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if f"socket file {path} is not there yet"
                 in line)
    ready = next(i for i, line in enumerate(lines) if "engine ready" in line)
    assert first < ready, out  # before the model loads
    assert f"unix:late ({path}): waiting (no socket file {path}" in out, out


def test_readable_secret_key_refused_unless_allowed(short_tmp, caplog):
    from mlipd.curve import CurveKeys, keygen
    from mlipd.errors import SetupError

    keygen(short_tmp / "keys")
    secret = short_tmp / "keys" / "server.key_secret"
    CurveKeys(short_tmp / "keys").server_pair()  # 0600: fine
    os.chmod(secret, 0o644)
    with pytest.raises(SetupError, match=r"readable by group or others.*chmod 600"):
        CurveKeys(short_tmp / "keys").server_pair()
    _public, private = CurveKeys(short_tmp / "keys", allow_readable_secret=True).server_pair()
    assert private is not None
    assert "secret key readable by group or others" in caplog.text


def test_serve_refuses_a_readable_secret_key_before_loading(processes, short_tmp):
    from mlipd.curve import keygen

    keygen(short_tmp / "keys")
    os.chmod(short_tmp / "keys" / "server.key_secret", 0o640)
    proc = processes.start([*MLIPD, "serve", "--model", LJ, "--zmq", "tcp://127.0.0.1:0",
                            "--curve", str(short_tmp / "keys")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "--allow-readable-key" in out, out
    assert "engine ready" not in out, out


def test_serve_with_one_ipi_link_alone_computes_inline(short_tmp):
    """`serve --ipi` with no ZeroMQ endpoint: the link is the only source and calls the
    engine itself; its counters, forces and shutdown are those of the scheduled path."""
    from mlipd.engine import make_engine

    fake = FakeIpi(short_tmp / "srv")
    reference = make_engine(LJ, dtype="float64")
    try:
        with running_server(["--model", LJ, "--dtype", "float64", "--species", "Ar",
                             "--ipi", f"unix:{fake.path}"], log=short_tmp / "serve.log") as srv:
            assert srv.addresses == []
            fake.accept()
            for seed in range(2):
                s = argon(seed=seed)
                (got,) = fake.step([s])
                (ref,) = reference.compute([s])
                # positions and results through i-PI's units and back (2 roundings each)
                assert_over_wire(got, ref, s, reference, geometry_roundings=2,
                                 output_roundings=2)
            assert srv.stop() == 0
            text = srv.log_text()
    finally:
        fake.close()
    assert "server stopped: requests=2 errors=0 engine_calls=2 structures=2" in text, text
