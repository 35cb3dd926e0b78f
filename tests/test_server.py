"""The server: scheduler policy (fake times), engine worker, and `mlipd serve` over real ZeroMQ.

Shutdown, heartbeats and faults are in ``test_server_robustness.py``."""

from __future__ import annotations

import threading
from dataclasses import replace

import msgpack
import numpy as np
import pytest
import zmq
from helpers.float64_bounds import assert_over_wire
from helpers.systems import argon

from mlipd.client import Client
from mlipd.engine import make_engine
from mlipd.errors import Busy, TooLarge, UnknownSpecies, ValidationError
from mlipd.protocols import zmq_msgs as zm
from mlipd.server.scheduler import Scheduler, Ticket, flatten, split
from mlipd.server.testing import running_server
from mlipd.server.worker import EngineWorker
from mlipd.types import Result, Structure

pytestmark = pytest.mark.timeout(120)


def ticket(source, n_atoms=4, arrived=0.0, token=None) -> Ticket:
    s = Structure(numbers=np.full(n_atoms, 18), positions=np.arange(3 * n_atoms, dtype=float)
                  .reshape(n_atoms, 3), cell=np.eye(3) * 30, pbc=np.ones(3, bool))
    return Ticket(source=source, structures=(s,), arrived=arrived, token=token)


# ---------------------------------------------------------------- scheduler (pure, fake times)


def test_ungated_requests_go_at_once_and_pack_together():
    sch = Scheduler(max_atoms=100, max_wait_s=0.002)
    assert sch.take(0.0) == []
    assert sch.deadline() is None
    for k in range(5):
        sch.submit(ticket(f"c{k}", arrived=0.0, token=k))
    assert sch.ready(0.0)
    assert [t.token for t in sch.take(0.0)] == [0, 1, 2, 3, 4]
    assert len(sch) == 0
    assert sch.deadline() is None


def test_size_limit_splits_batches_and_a_big_ticket_runs_alone():
    sch = Scheduler(max_atoms=10, max_wait_s=0.002)
    for k in range(5):
        sch.submit(ticket(f"c{k}", n_atoms=4, token=k))
    assert [t.token for t in sch.take(0.0)] == [0, 1]  # 8 atoms; a third would be 12
    sch.submit(ticket("big", n_atoms=50, token="big"))
    assert [t.token for t in sch.take(0.0)] == [2, 3]
    assert [t.token for t in sch.take(0.0)] == [4]  # the big one does not fit after 4
    assert [t.token for t in sch.take(0.0)] == ["big"]


def test_gated_sources_wait_for_each_other_or_the_bound():
    sch = Scheduler(max_atoms=1000, max_wait_s=0.002)
    for k in range(3):
        sch.add_gated(("ipi", k))
    sch.submit(ticket(("ipi", 0), arrived=1.0, token=0))
    sch.submit(ticket(("ipi", 1), arrived=1.0005, token=1))
    assert not sch.ready(1.001)
    assert sch.take(1.001) == []
    assert sch.deadline() == pytest.approx(1.002)
    sch.submit(ticket(("ipi", 2), arrived=1.0015, token=2))
    assert sch.ready(1.0015)  # every gated source has its bead in: no need to wait
    assert sorted(t.token for t in sch.take(1.0015)) == [0, 1, 2]
    # one connection lags: the bound passes and the others go without it
    sch.submit(ticket(("ipi", 0), arrived=2.0, token=3))
    assert not sch.ready(2.0019)
    assert [t.token for t in sch.take(2.002)] == [3]
    # a source that disconnects no longer holds the others back
    sch.submit(ticket(("ipi", 0), arrived=3.0, token=4))
    sch.submit(ticket(("ipi", 1), arrived=3.0, token=5))
    sch.remove_gated(("ipi", 2))
    assert sorted(t.token for t in sch.take(3.0)) == [4, 5]
    # force (shutdown) ignores the timer
    sch.submit(ticket(("ipi", 0), arrived=4.0, token=6))
    assert sch.take(4.0) == []
    assert [t.token for t in sch.take(4.0, force=True)] == [6]


def test_ungated_ticket_does_not_wait_for_idle_gated_sources():
    sch = Scheduler(max_atoms=1000, max_wait_s=1.0)
    sch.add_gated(("ipi", 0))
    sch.submit(ticket("zmq-client", arrived=5.0, token="z"))
    assert sch.ready(5.0)
    assert [t.token for t in sch.take(5.0)] == ["z"]


def test_size_limit_ends_the_wait():
    sch = Scheduler(max_atoms=8, max_wait_s=10.0)
    sch.add_gated("a")
    sch.add_gated("b")
    sch.add_gated("c")
    sch.submit(ticket("a", n_atoms=4, token=0))
    assert not sch.ready(0.0)
    sch.submit(ticket("b", n_atoms=4, token=1))
    assert sch.ready(0.0)
    assert [t.token for t in sch.take(0.0)] == [0, 1]


def test_round_robin_is_fair_between_sources():
    sch = Scheduler(max_atoms=12, max_wait_s=0.0)
    for k in range(6):
        sch.submit(ticket("greedy", token=("g", k)))
    sch.submit(ticket("polite", token=("p", 0)))
    sch.submit(ticket("other", token=("o", 0)))
    # one per source per round: the greedy client cannot fill the batch alone
    assert [t.token for t in sch.take(0.0)] == [("g", 0), ("p", 0), ("o", 0)]
    # when batches are full, the rotation goes on where the last batch stopped
    sch = Scheduler(max_atoms=8, max_wait_s=0.0)
    for k in range(3):
        for src in "abc":
            sch.submit(ticket(src, token=(src, k)))
    assert [t.token for t in sch.take(0.0)] == [("a", 0), ("b", 0)]
    assert [t.token for t in sch.take(0.0)] == [("c", 0), ("a", 1)]
    assert [t.token for t in sch.take(0.0)] == [("b", 1), ("c", 1)]


def test_queue_is_bounded():
    sch = Scheduler(max_atoms=100, max_wait_s=0.0, max_pending=3)
    for k in range(3):
        sch.submit(ticket(k))
    with pytest.raises(Busy, match="limit 3"):
        sch.submit(ticket(3))
    assert len(sch.take(0.0)) == 3
    assert len(sch) == 0
    sch.submit(ticket(4))


def test_flatten_and_split_restore_the_order():
    a, b = ticket("a"), Ticket(source="b", structures=(argon(), argon(seed=1)), arrived=0.0)
    flat = flatten([a, b])
    assert len(flat) == 3
    assert flat[1] is b.structures[0]
    fake = [Result(energy=float(k), forces=np.zeros((s.n_atoms, 3))) for k, s in enumerate(flat)]
    (ta, ra), (tb, rb) = split([a, b], fake)
    assert ta is a
    assert [r.energy for r in ra] == [0.0]
    assert tb is b
    assert [r.energy for r in rb] == [1.0, 2.0]
    with pytest.raises(ValueError, match="2 results for 3"):
        split([a, b], fake[:2])


# ---------------------------------------------------------------- worker with the real LJ engine


def test_worker_batches_and_isolates_a_failing_structure():
    engine = make_engine("lj", dtype="float64")
    # the batch waits for its four gated sources (an event), not for a timer
    worker = EngineWorker(engine, scheduler=Scheduler(max_atoms=10_000, max_wait_s=60))
    worker.start()
    try:
        good = [argon(seed=k) for k in range(3)]
        # two atoms on top of each other: the geometry guards refuse the structure
        bad_pos = good[0].positions.copy()
        bad_pos[1] = bad_pos[0]
        bad = Structure(numbers=good[0].numbers, positions=bad_pos, cell=good[0].cell,
                        pbc=good[0].pbc)
        for k in range(4):
            worker.add_gated(k)  # hold the batch until all four are in
        futs = [worker.submit(k, [s]) for k, s in enumerate([good[0], bad, good[1], good[2]])]
        with pytest.raises(ValidationError, match="apart"):
            futs[1].result(timeout=30)
        direct = make_engine("lj", dtype="float64")
        for fut, s in zip([futs[0], futs[2], futs[3]], good, strict=True):
            (got,) = fut.result(timeout=30)
            (ref,) = direct.compute([s])
            assert_over_wire(got, ref, s, direct, what="in a shared batch")
        snap = worker.metrics.snapshot()
        # one failed batch of 4, then one engine call per request
        assert snap["engine_calls"] == 3
        assert snap["errors"] == {"bad_input": 1}
    finally:
        worker.close()


# ---------------------------------------------------------------- `mlipd serve` over real sockets


@pytest.fixture(scope="module")
def lj_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("srv") / "serve.log"
    with running_server(["--model", "lj", "--dtype", "float64", "--zmq", "tcp://127.0.0.1:0",
                         "--max-request-atoms", "5000"], log=log) as srv:
        yield srv


def test_sixteen_concurrent_clients_get_their_own_results(lj_server):
    structures = [argon(1 + k % 2, seed=k, a=5.2 + 0.01 * k) for k in range(16)]
    direct = make_engine("lj", dtype="float64")
    refs = direct.compute(structures)
    got: dict[int, list[Result]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def work(k: int) -> None:
        try:
            with Client(lj_server.address, timeout_s=30) as c:
                barrier.wait(timeout=30)
                got[k] = [c.compute(structures[k]) for _ in range(5)]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with Client(lj_server.address) as c:
        calls_before = c.stats()["engine_calls"]
    threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    for k, ref in enumerate(refs):
        for r in got[k]:
            assert r.virial is not None
            assert_over_wire(r, ref, structures[k], direct)
    with Client(lj_server.address) as c:
        calls = c.stats()["engine_calls"] - calls_before
    assert calls < 80  # 80 requests: concurrent ones shared engine calls


def test_batch_op_and_info(lj_server):
    structures = [argon(seed=k) for k in range(3)]
    with Client(lj_server.address) as c:
        info = c.info()
        assert info["model"] == "lj"
        assert info["protocol"] == zm.VERSION
        assert info["units"]["energy"] == "eV"
        assert info["ranks"] == 1
        assert c.ping()["pong"] is True
        got = c.batch(structures, virial=False)
    direct = make_engine("lj", dtype="float64")
    refs = direct.compute(structures)
    assert all(r.virial is None for r in got)
    for r, ref, s in zip(got, refs, structures, strict=True):
        assert_over_wire(r, replace(ref, virial=None), s, direct)


def _raw(address: str, frames: list[bytes], *, timeout_ms: int = 10_000):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms):
            return None
        return msgpack.unpackb(sock.recv())
    finally:
        sock.close(0)
        ctx.term()


def test_bad_frames_get_error_replies_and_the_server_keeps_serving(lj_server):
    addr = lj_server.address
    reply = _raw(addr, [b"\xc1 not msgpack"])
    assert reply["ok"] is False
    assert reply["error"]["code"] == "protocol"
    assert reply["id"] is None
    reply = _raw(addr, [msgpack.packb({"v": 1, "id": 7, "op": "explode"})])
    assert reply["error"]["code"] == "bad_input"
    assert reply["id"] == 7
    # a request claiming 2**28 atoms (a 2 GB header in a tiny frame): refused from the header
    huge = {"v": 1, "id": 8, "op": "compute", "structures": [{
        "numbers": {"dtype": "<i4", "shape": [2**28], "data": b"\0" * 4},
        "positions": {"dtype": "<f8", "shape": [2**28, 3], "data": b""},
        "cell": {"dtype": "<f8", "shape": [3, 3], "data": b"\0" * 72}, "pbc": [True] * 3}]}
    reply = _raw(addr, [msgpack.packb(huge)])
    assert reply["error"]["code"] == "too_large"
    assert reply["id"] == 8
    with Client(addr) as c:
        big = [argon(6)] * 6  # 5184 atoms > --max-request-atoms 5000
        before = c.stats()["requests"]
        with pytest.raises(TooLarge, match="5000"):
            c.batch(big)  # refused from the server's info, before sending (issue 13)
        assert c.stats()["requests"].get("batch") == before.get("batch")
        bad = argon()
        with pytest.raises(ValidationError):
            c.compute(Structure(numbers=bad.numbers, positions=bad.positions * np.nan,
                                cell=bad.cell, pbc=bad.pbc))
        # a frame beyond ZMQ_MAXMSGSIZE: zmq drops that peer; the others are served
        assert _raw(addr, [b"\0" * (40 * 5000 + 512 * 4096 + 70_000)], timeout_ms=500) is None
        assert c.compute(argon()).forces.shape == (4, 3)


def test_client_that_disconnects_mid_request_does_not_hurt_others(lj_server):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(lj_server.address)
    sock.send(zm.pack_request(1, "batch", [argon(3, seed=k) for k in range(20)]))
    sock.close(0)  # gone before the reply
    ctx.term()
    with Client(lj_server.address) as c:
        r = c.compute(argon(seed=3))
        assert np.isfinite(r.energy)
        assert c.stats()["errors"].get("internal", 0) == 0


def test_busy_when_the_queue_is_full(tmp_path):
    # a queue of one request: six large requests at once cannot all wait
    with running_server(["--model", "lj", "--dtype", "float64", "--zmq", "tcp://127.0.0.1:0",
                         "--max-queue", "1"],
                        log=tmp_path / "s.log") as srv:
        ctx = zmq.Context()
        socks = []
        try:
            big = zm.pack_request(1, "compute", [argon(6)])
            for _ in range(6):  # more than the engine can take at once
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(srv.address)
                s.send(big)
                socks.append(s)
            codes = []
            for s in socks:
                assert s.poll(60_000)
                msg = msgpack.unpackb(s.recv())
                codes.append("ok" if msg["ok"] else msg["error"]["code"])
        finally:
            for s in socks:
                s.close(0)
            ctx.term()
        assert "busy" in codes
        assert "ok" in codes
        assert set(codes) <= {"ok", "busy"}
        with Client(srv.address) as c:
            assert c.stats()["errors"]["busy"] == codes.count("busy")


def test_unknown_species_is_refused_before_the_engine():
    from mlipd.engine.single_rank import SingleRankEngine
    from mlipd.models.lj import LennardJones
    from mlipd.server.app import Server

    model = LennardJones()
    model.spec = replace(model.spec, species=frozenset({18}))  # an argon-only potential
    server = Server(SingleRankEngine(model), zmq=["tcp://127.0.0.1:0"])
    (address,) = server.start()
    try:
        with Client(address) as c:
            assert c.info()["species"] == [18]
            s = argon()
            with pytest.raises(UnknownSpecies, match=r"H \(Z=1\)"):
                c.compute(Structure(numbers=np.array([18, 1, 18, 18]), positions=s.positions,
                                    cell=s.cell, pbc=s.pbc))
            assert np.isfinite(c.compute(s).energy)
            assert c.stats()["engine_calls"] == 1
    finally:
        server.close()


def test_req_socket_clients_work_too(lj_server):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(lj_server.address)
        sock.send(zm.pack_request(41, "ping"))
        assert sock.poll(10_000)
        assert zm.unpack_reply(sock.recv(), expect_id=41).value["pong"] is True
    finally:
        sock.close(0)
        ctx.term()
