"""Issue 13, through a real `mlipd serve` process: one request cannot kill or stall it.

Each row of the issue's table is a test here (or in ``test_server_ipi_faults.py`` for the
i-PI side and ``test_server_security.py`` for transports): the right error or
behaviour, the process alive, and the next valid request answered correctly. Long
computations come from the ``gated`` test model (``fault_models.GatedLJ``),
held by a file, so "in flight" is an event the model reports, not a guess.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from helpers.float64_bounds import assert_over_wire
from helpers.server import Dealer, Gate, peak_rss_mb, plugin_env, raw
from helpers.systems import argon

from mlipd.client import Client
from mlipd.engine import make_engine
from mlipd.errors import CalculationFailed, DeadlineExceeded, MlipdError
from mlipd.protocols import zmq_msgs as zm
from mlipd.server.testing import running_server
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(180)

REFERENCE = make_engine("lj", dtype="float64")  # the gated model is LJ with LJ's defaults


def answered_correctly(client: Client, seed: int = 7) -> None:
    s = argon(seed=seed)
    got = client.compute(s)
    (ref,) = REFERENCE.compute([s])
    assert_over_wire(got, ref, s, REFERENCE)


def one(positions, cell, pbc) -> Structure:
    positions = np.asarray(positions, dtype=float)
    return Structure(numbers=np.full(len(positions), 18), positions=positions,
                     cell=np.asarray(cell, dtype=float), pbc=np.array(pbc))


RNG = np.random.default_rng(0)
BAD_GEOMETRY = {  # the table, rows 1-3, and their neighbours
    "2 atoms 1e6 Å apart (open)": (one([[0, 0, 0], [1e6, 0, 0]], np.zeros((3, 3)), False),
                                   "bad_input"),
    "flat open structure 3000 Å wide": (one([[0, 0, 0], [3000, 3000, 0]], np.zeros((3, 3)),
                                            False), "bad_input"),
    "cell of 1e300 Å": (one([[0, 0, 0]], np.eye(3) * 1e300, True), "bad_input"),
    "cell 12 x 12 x 2e20 Å": (one([[0, 0, 0]], np.diag([12, 12, 2e20]), True), "bad_input"),
    "nearly singular cell": (one([[0, 0, 0]], [[12, 0, 0], [8.6e9, 12, 0], [0, 0, 12]], True),
                             "bad_input"),
    "skewed cell (a face 0.03 Å high)": (one([[1, 1, 1]], [[12, 0, 0], [5e3, 12, 0],
                                                           [0, 0, 12]], True), "bad_input"),
    "1 atom in a 0.05 Å cell": (one([[0, 0, 0]], np.eye(3) * 0.05, True), "bad_input"),
    "1 atom in a 0.001 Å cell": (one([[0, 0, 0]], np.eye(3) * 0.001, True), "bad_input"),
    "1 atom in a 0.5 Å cell": (one([[0, 0, 0]], np.eye(3) * 0.5, True), "too_large"),
    "4000 atoms in a 3 Å box": (one(RNG.uniform(0, 3, (4000, 3)), np.eye(3) * 3, True),
                                "too_large"),
    "overlapping atoms": (one([[0, 0, 0], [0, 0, 0], [3, 3, 3]], np.eye(3) * 10, True),
                          "bad_input"),
    "atom 1e5 cells away": (one([[0, 0, 0], [1e6, 0, 0]], np.eye(3) * 10, True), "bad_input"),
}


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> Gate:
    return Gate(tmp_path_factory.mktemp("gate"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory, gate):
    tmp = tmp_path_factory.mktemp("srv")
    with running_server(["--model", gate.model, "--dtype", "float64",
                         "--zmq", "tcp://127.0.0.1:0", "--stats-every", "0.5"],
                        log=tmp / "serve.log", env=plugin_env(tmp)) as s:
        yield s


@pytest.mark.parametrize("name", list(BAD_GEOMETRY))
def test_bad_geometry_is_refused_and_the_server_keeps_serving(srv, name):
    structure, code = BAD_GEOMETRY[name]
    with Client(srv.address, heartbeat_s=5, timeout_s=60) as c:
        with pytest.raises(MlipdError) as info:
            c.compute(structure)
        assert info.value.code == code, info.value
        answered_correctly(c)
    assert srv.proc.poll() is None


@pytest.mark.parametrize("op", [["compute"], {"op": "ping"}, 3, None, b"ping", True])
def test_op_of_any_type_gets_an_error_reply(srv, op):
    reply = raw(srv.address, msgpack.packb({"v": 1, "id": 11, "op": op}))
    assert reply["ok"] is False
    assert reply["id"] == 11
    assert reply["error"]["code"] == "bad_input"
    with Client(srv.address) as c:
        answered_correctly(c)


@contextlib.contextmanager
def running_and_queued(address: str, gate: Gate):
    """Two connections: request 1 in the engine (held at ``gate``), request 2 queued
    behind it (seen in the server's stats)."""
    with Dealer(address) as running, Dealer(address) as queued:
        running.send(zm.pack_request(1, "compute", [argon(seed=1)]))
        gate.wait_started(1)
        queued.send(zm.pack_request(2, "compute", [argon(seed=2)]))
        with Client(address) as c:
            while c.stats()["queue_depth"] < 1:
                time.sleep(0.01)
        yield running, queued


def test_a_frame_of_nested_empty_maps_is_refused_cheaply(srv):
    before = peak_rss_mb(srv.proc.pid)
    junk = msgpack.packb({"v": 1, "id": 5, "op": "batch",
                          "structures": [[{}] * 4096] * 7300})  # 30 MB of empty maps
    assert len(junk) > 29e6
    with Dealer(srv.address) as d:
        d.send(junk)
        with Client(srv.address) as c:  # another client, served after the junk
            assert c.ping()["pong"] is True
        reply = d.recv()
    assert reply["ok"] is False
    assert reply["error"]["code"] == "protocol"
    # a 30 MB frame is held once by zmq and once by the reader; the maps are not built
    assert peak_rss_mb(srv.proc.pid) - before < 200
    with Client(srv.address) as c:
        answered_correctly(c)


def test_ping_stats_and_info_answered_during_a_long_computation(srv, gate):
    """A >= 10 s computation: pings answered within 1 s throughout, the client (2 s
    heartbeat) keeps waiting and gets the result, computed once."""
    s = argon(seed=3)
    with Client(srv.address) as c:
        calls_before = c.stats()["engine_calls"]
    out: dict = {}
    gate.hold()
    try:
        n0 = gate.started()

        def long_request() -> None:
            try:
                with Client(srv.address, heartbeat_s=2.0, timeout_s=120) as c:
                    out["result"] = c.compute(s)
            except MlipdError as e:  # reported below
                out["error"] = e

        worker = threading.Thread(target=long_request)
        worker.start()
        gate.wait_started(n0 + 1)
        held_since = time.monotonic()
        latencies = []
        with Client(srv.address) as c:
            while time.monotonic() - held_since < 10.5:
                t0 = time.monotonic()
                c.ping()
                latencies.append(time.monotonic() - t0)
                stats = c.stats()
                assert c.info()["model"] == "gated"
                time.sleep(0.2)
            assert stats["engine_busy_s"] > 5
    finally:
        gate.release()
    worker.join(timeout=60)
    assert "error" not in out, out
    (ref,) = REFERENCE.compute([s])
    assert_over_wire(out["result"], ref, s, REFERENCE)
    assert len(latencies) >= 3, latencies  # pings answered while the engine was held
    assert "stats: requests=" in srv.log_text()  # --stats-every: counters in the log
    with Client(srv.address) as c:
        stats = c.stats()
    assert stats["engine_calls"] == calls_before + 1  # resends were never recomputed
    assert stats["requests"]["repeat"] >= 4  # the client resent every 0.5 s meanwhile


def test_a_repeated_id_is_answered_not_recomputed(srv, gate):
    """The issue's row: a client timeout shorter than the computation used to compute
    every retry again. Now a resend (same id, same socket) gets 'pending', then the
    one result."""
    frame = zm.pack_request(77, "compute", [argon(seed=4)])
    with Client(srv.address) as c:
        calls_before = c.stats()["engine_calls"]
    gate.hold()
    try:
        with Dealer(srv.address) as d:
            d.send(frame)
            gate.wait_started(gate.started() + 1)
            for _ in range(5):
                d.send(frame)
                reply = d.recv()
                assert reply["pending"] is True, reply
                assert reply["id"] == 77
                assert reply["value"]["state"] == "computing"
            gate.release()
            final = d.recv()
            assert final["ok"] is True
            assert final["id"] == 77
            d.send(frame)  # after the answer: the same reply again, still no engine call
            again = d.recv()
            assert again == final
            # a client that reuses the id for another structure gets that one computed
            other = argon(seed=5)
            d.send(zm.pack_request(77, "compute", [other]))
            (got,) = zm.unpack_reply(msgpack.packb(d.recv()), expect_id=77).results
    finally:
        gate.release()
    (ref,) = REFERENCE.compute([other])
    assert_over_wire(got, ref, other, REFERENCE)
    with Client(srv.address) as c:
        assert c.stats()["engine_calls"] == calls_before + 2


def test_a_gone_server_is_told_from_a_busy_one(tmp_path, gate):
    """SIGSTOP the server mid-request: the client hears nothing for its heartbeat and
    says the server is gone (not a wait of timeout x retries)."""
    with running_server(["--model", gate.model, "--zmq", "tcp://127.0.0.1:0"],
                        log=tmp_path / "s.log", env=plugin_env(tmp_path)) as s, \
            Client(s.address, heartbeat_s=1.5, timeout_s=600) as c:
        os.kill(s.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(MlipdError, match="gone") as info:
                c.compute(argon())
            assert info.value.code == "unavailable"
            assert time.monotonic() - t0 < 60  # the heartbeat, not the 600 s timeout
        finally:
            os.kill(s.proc.pid, signal.SIGCONT)


def test_requests_over_their_deadline_get_an_error_and_the_server_goes_on(tmp_path):
    gate = Gate(tmp_path / "gate")
    with running_server(["--model", gate.model, "--dtype", "float64", "--zmq",
                         "tcp://127.0.0.1:0", "--request-timeout", "1"],
                        log=tmp_path / "s.log", env=plugin_env(tmp_path)) as s:
        gate.hold()
        try:
            with running_and_queued(s.address, gate) as (running, queued):
                time.sleep(1.2)  # both deadlines pass while the engine is held
                gate.release()
                for d, rid in ((running, 1), (queued, 2)):
                    with pytest.raises(DeadlineExceeded):
                        zm.unpack_reply(msgpack.packb(d.recv()), expect_id=rid)
        finally:
            gate.release()
        with Client(s.address) as c:
            answered_correctly(c)
            stats = c.stats()
        assert stats["errors"]["deadline"] == 2
        assert gate.started() == 2  # the held call and the valid one: the queued never ran


def test_sigterm_answers_the_running_and_100_queued_requests(tmp_path):
    """Issue row 6 and issue 16: the first request is provably inside the engine (the
    gated model counted it), 100 more are queued, SIGTERM, then release: every one is
    answered with its result, one sent after SIGTERM gets 'busy', exit status 0."""
    gate = Gate(tmp_path / "gate")
    with running_server(["--model", gate.model, "--dtype", "float64", "--zmq",
                         "tcp://127.0.0.1:0"],
                        log=tmp_path / "s.log", env=plugin_env(tmp_path)) as s:
        gate.hold()
        dealers = [Dealer(s.address) for _ in range(10)]
        try:
            structures = {}
            dealers[0].send(zm.pack_request(0, "compute", [argon(seed=0)]))
            structures[0] = argon(seed=0)
            gate.wait_started(1)
            for rid in range(1, 101):
                structures[rid] = argon(seed=rid)
                dealers[rid % 10].send(zm.pack_request(rid, "compute", [structures[rid]]))
            with Client(s.address) as c:
                while c.stats()["queue_depth"] < 100:
                    time.sleep(0.01)
            s.proc.send_signal(signal.SIGTERM)
            while "stopping" not in s.log_text():
                time.sleep(0.01)
            late = Dealer(s.address)
            late.send(zm.pack_request(500, "compute", [argon()]))
            late_reply = late.recv()
            late.close()
            gate.release()
            replies = {}
            for k, d in enumerate(dealers):
                for _ in range(11 if k == 0 else 10):  # ids 0..100 went to dealer id % 10
                    msg = d.recv(timeout_s=60)
                    assert msg is not None, f"dealer {k}: a request was never answered"
                    replies[msg["id"]] = msg
        finally:
            gate.release()
            for d in dealers:
                d.close()
        assert s.proc.wait(timeout=60) == 0
    assert late_reply["error"]["code"] == "busy"
    assert sorted(replies) == list(range(101))
    refs = REFERENCE.compute([structures[k] for k in range(101)])
    for rid, ref in enumerate(refs):
        (got,) = zm.unpack_reply(msgpack.packb(replies[rid]), expect_id=rid).results
        assert_over_wire(got, ref, structures[rid], REFERENCE)


def test_a_stopped_rank_is_replaced_within_seconds_and_bad_input_costs_no_restart(tmp_path):
    """Issue row 9 at --ranks 2: overlapping atoms are refused on rank 0 before any
    collective (no restart); a SIGSTOPped rank is killed by the heartbeat monitor and
    the ranks replaced in seconds, not after gloo's 120 s."""
    args = ["--model", "lj", "--dtype", "float64", "--ranks", "2", "--zmq", "tcp://127.0.0.1:0",
            "--rank-heartbeat", "2", "--collective-timeout", "120"]
    with running_server(args, log=tmp_path / "s.log",
                        env=dict(os.environ, OMP_NUM_THREADS="1")) as s, \
            Client(s.address, heartbeat_s=10, timeout_s=170) as c:
        answered_correctly(c)
        bad = argon()
        pos = bad.positions.copy()
        pos[1] = pos[0]
        with pytest.raises(MlipdError) as info:
            c.compute(Structure(numbers=bad.numbers, positions=pos, cell=bad.cell, pbc=True))
        assert info.value.code == "bad_input"
        answered_correctly(c)
        assert c.stats()["rank_restarts"] == 0
        rank = _rank_pid(s.proc.pid)
        os.kill(rank, signal.SIGSTOP)
        t0 = time.monotonic()
        outcome = _outcome(lambda: c.compute(argon(seed=5)))
        if isinstance(outcome, Exception):  # rank 0 sat in a collective with the stopped rank
            assert isinstance(outcome, CalculationFailed), outcome
            assert "heartbeat" in str(outcome), outcome
        answered_correctly(c)  # ranks respawned
        assert time.monotonic() - t0 < 60  # seconds, not the 120 s collective timeout
        assert c.stats()["rank_restarts"] == 1
        assert "sent no heartbeat" in s.log_text()


def _outcome(call):
    try:
        return call()
    except MlipdError as e:
        return e


def _rank_pid(server_pid: int) -> int:
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    for pid in children:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"mlipd.engine.rank_main" in cmd:
            return int(pid)
    raise AssertionError(f"no rank process among {children}")


def test_shutdown_abandons_a_stuck_engine_call_with_answers_and_exit_1(tmp_path):
    """An engine call that outlives --shutdown-timeout: its request and the queued one
    are answered 'unavailable' (not silence) and the exit status says it was abandoned."""
    gate = Gate(tmp_path / "gate")
    with running_server(["--model", gate.model, "--zmq", "tcp://127.0.0.1:0",
                         "--shutdown-timeout", "1"],
                        log=tmp_path / "s.log", env=plugin_env(tmp_path)) as s:
        gate.hold()
        try:
            with running_and_queued(s.address, gate) as (running, queued):
                s.proc.send_signal(signal.SIGTERM)
                codes = [d.recv(timeout_s=60)["error"]["code"] for d in (running, queued)]
            assert s.proc.wait(timeout=60) == 1
        finally:
            gate.release()
    assert codes == ["unavailable", "unavailable"]
    assert "abandon" in s.log_text()
