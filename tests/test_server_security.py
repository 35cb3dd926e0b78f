"""Who can reach `mlipd serve` (issue 13, security): loopback by default (IPv6 too),
owner-only ipc sockets that never replace a file or a live server and are removed at
stop, CURVE with keys from `mlipd keygen`; and `mlipd stats`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys

import pytest
from helpers.systems import argon

from mlipd.client import Client
from mlipd.curve import keygen
from mlipd.errors import ServerUnavailable, SetupError
from mlipd.server.testing import running_server

pytestmark = pytest.mark.timeout(180)

MLIPD = [sys.executable, "-m", "mlipd"]
LJ = ["--model", "lj", "--dtype", "float64"]


def serve_fails(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*MLIPD, "serve", *LJ, *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    return proc


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_ipc_socket_is_owner_only_exclusive_and_removed_at_stop(short_tmp):
    path = short_tmp / "mlipd.sock"
    with umask(0), running_server([*LJ, "--zmq", f"ipc://{path}"],
                                  log=short_tmp / "a.log") as first:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, oct(mode)  # under umask 0 a plain bind makes it 0777
        with Client(first.address) as c:
            assert c.compute(argon()).forces.shape == (4, 3)
        # a second server may not take the path over while the first listens
        proc = serve_fails("--zmq", f"ipc://{path}")
        assert "another server is listening" in proc.stderr
        with Client(first.address) as c:  # the first still serves
            assert c.ping()["pong"] is True
        assert first.stop() == 0
    assert not path.exists()


def test_ipc_never_replaces_a_regular_file_and_replaces_a_stale_socket(short_tmp):
    path = short_tmp / "data.txt"
    path.write_text("precious")
    proc = serve_fails("--zmq", f"ipc://{path}")
    assert "not a socket" in proc.stderr
    assert path.read_text() == "precious"
    stale = short_tmp / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))  # a socket file nobody listens on (a killed server's)
    leftover.close()
    with running_server([*LJ, "--zmq", f"ipc://{stale}"], log=short_tmp / "s.log") as srv, \
            Client(srv.address) as c:
        assert c.ping()["pong"] is True


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:0", "tcp://*:0", "tcp://[::]:0",
                                     "tcp://192.0.2.1:5555"])
def test_binding_beyond_loopback_needs_allow_remote(address):
    proc = serve_fails("--zmq", address)
    assert "--allow-remote" in proc.stderr


def test_ipv6_loopback_serves(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    with running_server([*LJ, "--zmq", "tcp://[::1]:0"], log=tmp_path / "s.log") as srv:
        assert srv.address.startswith("tcp://[::1]:")
        with Client(srv.address) as c:
            assert c.compute(argon()).forces.shape == (4, 3)


def test_curve_serves_known_clients_only_and_logs_why(tmp_path):
    keys, other = tmp_path / "keys", tmp_path / "other"
    written = subprocess.run([*MLIPD, "keygen", str(keys)], capture_output=True, text=True,
                             timeout=60, check=True).stdout.split()
    assert sorted(os.path.basename(p) for p in written) == [
        "client.key", "client.key", "client.key_secret", "server.key", "server.key_secret"]
    for secret in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((keys / secret).stat().st_mode) == 0o600
    with pytest.raises(SetupError, match="never overwrites"):
        keygen(keys)
    keygen(other)  # another client's pair, which knows the server's key but is not accepted
    (other / "server.key").write_bytes((keys / "server.key").read_bytes())
    with running_server([*LJ, "--zmq", "tcp://127.0.0.1:0", "--curve", str(keys)],
                        log=tmp_path / "s.log") as srv:
        with Client(srv.address, curve=keys) as c:
            assert c.compute(argon()).forces.shape == (4, 3)
        with pytest.raises(ServerUnavailable, match="CURVE"):
            Client(srv.address, curve=other, connect_timeout_s=2)
        with pytest.raises(ServerUnavailable):
            Client(srv.address, connect_timeout_s=2)  # no encryption at all
        with Client(srv.address, curve=keys) as c:  # still serving the known client
            assert c.ping()["pong"] is True
        log = srv.log_text()
    assert "CURVE: denied a client whose public key" in log
    assert "not in" in log


def test_mlipd_stats_prints_the_counters(tmp_path):
    with running_server([*LJ, "--zmq", "tcp://127.0.0.1:0"], log=tmp_path / "s.log") as srv:
        with Client(srv.address) as c:
            c.compute(argon())
        out = subprocess.run([*MLIPD, "stats", srv.address], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    stats = json.loads(out)
    assert stats["requests"]["compute"] == 1
    assert stats["engine_calls"] == 1


def test_serve_logs_its_counters_periodically_by_default():
    from mlipd.cli import parse

    assert parse(["serve", "--zmq", "tcp://127.0.0.1:0"]).stats_every > 0
