"""Issue 22, through a real `mlipd serve` process: a server whose memory is bounded.

Each row of the issue's table (items of ours: 1-3 and 5-7) is a test: the right reply,
the process alive, its peak resident memory (VmHWM from /proc) under a stated bound
where memory is the point, and the next valid request answered correctly. Long
computations come from the ``gated`` test model (LJ held by a file), so "in flight"
and "queued" are events the server reports, not guesses. Sizes are scaled down for a
shared 2-core machine; each keeps what fails without the fix (stated per test).
"""

from __future__ import annotations

import resource
import time
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
from ase.build import bulk
from helpers.float64_bounds import assert_over_wire
from helpers.server import Dealer, Gate, peak_rss_mb, plugin_env, raw
from helpers.systems import argon

from mlipd.client import Client
from mlipd.engine import make_engine
from mlipd.errors import MlipdError
from mlipd.protocols import zmq_msgs as zm
from mlipd.server.testing import running_server
from mlipd.types import Structure

pytestmark = pytest.mark.timeout(240)

REFERENCE = make_engine("lj", dtype="float64")  # the gated model is LJ with LJ's defaults


def answered_correctly(address: str, seed: int = 7) -> None:
    s = argon(seed=seed)
    with Client(address, heartbeat_s=5, timeout_s=120) as c:
        got = c.compute(s)
    (ref,) = REFERENCE.compute([s])
    assert_over_wire(got, ref, s, REFERENCE)


def rss_mb(pid: int) -> float:
    """The process's resident memory now (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stats(address: str) -> dict:
    with Client(address) as c:
        return c.stats()


def wait_for(predicate, *, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def dense_si(n: int = 3, spacing: float = 0.6) -> Structure:
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return Structure(numbers=np.full(n**3, 14), positions=(g * spacing).astype(float),
                     cell=np.eye(3) * n * spacing, pbc=np.ones(3, bool))


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> Gate:
    return Gate(tmp_path_factory.mktemp("gate"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory, gate):
    tmp = tmp_path_factory.mktemp("srv")
    with running_server(["--model", gate.model, "--dtype", "float64",
                         "--zmq", "tcp://127.0.0.1:0", "--max-queue-bytes", "24M",
                         "--max-request-memory", "64M"],
                        log=tmp / "serve.log", env=plugin_env(tmp)) as s:
        yield s


def test_info_reports_the_memory_and_queue_limits(srv):
    """``info`` names the limits a client meets: the memory budget per engine call
    (--max-request-memory 64M), the queue's requests (--max-queue, default 1024) and
    bytes (--max-queue-bytes 24M)."""
    with Client(srv.address) as c:
        info = c.info()
    assert info["max_request_memory"] == 64 << 20
    assert info["max_queue"] == 1024
    assert info["max_queue_bytes"] == 24 << 20


# ---------------------------------------------------------------- row 1: dense structures


def test_dense_structures_are_refused_by_the_memory_budget(srv):
    """27 / 64 / 125 Si atoms 0.6 Å apart in a periodic cell: a ~1-3 KB request that
    passes every geometry guard. With LJ (cutoff 8.5 Å) the edges alone (3.2e5 for 27
    atoms, 512 B each declared) are over the 64 MiB budget: too_large with the estimate
    and the budget."""
    base = peak_rss_mb(srv.proc.pid)
    with Client(srv.address, heartbeat_s=5, timeout_s=120) as c:
        for n in (3, 4, 5):
            with pytest.raises(MlipdError) as info:
                c.compute(dense_si(n))
            assert info.value.code == "too_large", info.value
            assert "estimated memory" in str(info.value)
            assert "budget 0.0625 GiB" in str(info.value)
    answered_correctly(srv.address)
    assert srv.proc.poll() is None
    assert peak_rss_mb(srv.proc.pid) < base + 200  # refused from counts, never computed


@pytest.mark.slow
def test_chgnet_dense_structure_is_refused_quickly(tmp_path):
    """The issue's row 1 with CHGNet itself (went past 10 GB in 28 s before): refused at
    the default budget (half the free memory), RSS barely moves, then a valid request."""
    with running_server(["--model", "chgnet", "--dtype", "float64",
                         "--zmq", "tcp://127.0.0.1:0"], log=tmp_path / "s.log") as s:
        base = rss_mb(s.proc.pid)
        with Client(s.address, heartbeat_s=5, timeout_s=300) as c:
            t0 = time.monotonic()
            with pytest.raises(MlipdError) as info:
                c.compute(dense_si(3))
            assert info.value.code == "too_large", info.value
            assert time.monotonic() - t0 < 60
            si = Structure.from_atoms(bulk("Si", "diamond", a=5.43, cubic=True))
            got = c.compute(si)
        assert np.isfinite(got.energy)
        assert got.forces.shape == (8, 3)
        assert peak_rss_mb(s.proc.pid) < base + 500


def test_an_allocation_failure_is_too_large_and_the_server_goes_on(tmp_path, gate):
    """No budget (``--max-request-memory 0``) and an address-space cap on the server
    (as in the issue's test): the model's allocation fails (LJ on 27 atoms 0.3 Å apart
    in a 0.9 Å cell wants ~1e6 edges of float64 tensors, several GB) and that request
    is too_large, not an internal error; the next one is answered."""
    cap = 3 << 30

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    with running_server(["--model", gate.model, "--dtype", "float64",
                         "--zmq", "tcp://127.0.0.1:0", "--max-request-memory", "0",
                         "--max-pairs", "1e12", "--min-distance", "0.05"],
                        log=tmp_path / "s.log", env=plugin_env(tmp_path),
                        preexec_fn=limit) as s:
        with Client(s.address, heartbeat_s=10, timeout_s=300) as c:
            with pytest.raises(MlipdError) as info:
                c.compute(dense_si(6, 0.3))
            assert info.value.code == "too_large", info.value
            assert "out of memory" in str(info.value)
        answered_correctly(s.address)
        assert s.proc.poll() is None


# ---------------------------------------------------------------- row 2: queue in bytes


def _frame(req_id: int, n_atoms: int, *, bad: bool) -> bytes:
    """A compute frame of ``n_atoms`` Ar atoms spread in a cube (28 bytes per atom);
    ``bad``: one coordinate 1e8 Å from the origin (bad_input, refused in O(N))."""
    rng = np.random.default_rng(req_id)
    side = (n_atoms / 0.02) ** (1 / 3)
    pos = rng.uniform(0, side, (n_atoms, 3))
    if bad:
        pos[0, 0] = 1e8
    s = Structure(numbers=np.full(n_atoms, 18, dtype=np.int32), positions=pos,
                  cell=np.zeros((3, 3)), pbc=np.zeros(3, bool))
    return zm.pack_request(req_id, "compute", [s])


def test_the_queue_is_bounded_in_bytes_and_gives_them_back(srv, gate):
    """Frames of 8.4 MB (300k atoms) while the engine is held: the queue takes 2 of them
    (24 MB limit), the rest are busy at once (without the bound all 5 were queued). Then
    12 such frames, refused bad_input: their memory is given back (collected, heap
    trimmed), so RSS comes back near its baseline: within 120 MB (measured +80 MB: the
    arenas' live remainder; the issue saw 3.1 GB kept after 60 x 27 MB), peak within
    400 MB."""
    answered_correctly(srv.address)
    base = rss_mb(srv.proc.pid)
    gate.hold()
    try:
        with Dealer(srv.address) as running, Dealer(srv.address) as d:
            started = gate.started() + 1  # before sending: the forward may begin at once
            running.send(zm.pack_request(1, "compute", [argon(seed=1)]))
            gate.wait_started(started)
            for k in range(5):
                d.send(_frame(100 + k, 300_000, bad=True))
            replies = [d.recv(60) for _ in range(3)]  # the busy ones answer at once
            assert all(r is not None and r["error"]["code"] == "busy" for r in replies)
            assert "--max-queue-bytes" in replies[0]["error"]["message"]
            st = stats(srv.address)
            assert st["queue_depth"] == 2
            assert st["queue_bytes"] > 16 << 20
            gate.release()
            rest = [d.recv(60) for _ in range(2)]
            assert all(r["error"]["code"] == "bad_input" for r in rest)
            assert running.recv(60)["ok"] is True
            for k in range(12):  # one at a time: within the queue's bytes
                d.send(_frame(200 + k, 300_000, bad=True))
                assert d.recv(60)["error"]["code"] == "bad_input"
    finally:
        gate.release()
    assert stats(srv.address)["queue_bytes"] == 0
    # RSS near its base: the frames released, and the heap given back when idle if it
    # kept more than IDLE_TRIM_MIN_BYTES of them (whether it must depends on what the
    # allocator kept: stats' heap_trims is not asserted; test_memory.py holds the rule)
    wait_for(lambda: rss_mb(srv.proc.pid) < base + 120, timeout_s=30)
    assert peak_rss_mb(srv.proc.pid) < base + 400
    answered_correctly(srv.address)


# ---------------------------------------------------------------- row 4: reused lists


def test_a_pair_pushed_together_on_a_reused_list_is_bad_input(srv):
    """A reference with two atoms 0.45 Å apart, then 0.0002 Å apart with each atom moved
    less than skin / 2 (the list is reused): was ok with E = 5.8e47 eV."""
    at = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2)
    pos = at.positions.copy()
    pos[1] = pos[0] + [0.45, 0, 0]
    ref = Structure(numbers=at.numbers, positions=pos, cell=np.array(at.cell),
                    pbc=np.ones(3, bool))
    close = pos.copy()
    close[0, 0] += 0.2249
    close[1, 0] -= 0.2249
    with Client(srv.address) as c:
        c.compute(ref)  # the reference: its list is built here
        with pytest.raises(MlipdError) as info:
            c.compute(Structure(numbers=at.numbers, positions=close, cell=ref.cell,
                                pbc=ref.pbc))
        assert info.value.code == "bad_input"
        assert "0.0002 Å apart" in str(info.value)
    answered_correctly(srv.address)


# ---------------------------------------------------------------- row 6: resend identity


def forge_crc32(frame: bytes, region: slice, target: int) -> bytes:
    """``frame`` with bits flipped inside ``region`` so that its CRC-32 is ``target``
    (same length): CRC-32 is affine in the bits, so a GF(2) solve over the flips."""
    base = zlib.crc32(frame)
    candidates = []
    for byte in range(region.start, region.stop):
        for bit in range(8):
            b = bytearray(frame)
            b[byte] ^= 1 << bit
            candidates.append(((byte, bit), zlib.crc32(bytes(b)) ^ base))
    rows: dict[int, tuple[int, set]] = {}  # pivot bit -> (vector, flips)
    for flip, vec in candidates:
        flips = {flip}
        for p in sorted(rows, reverse=True):
            if vec >> p & 1:
                vec ^= rows[p][0]
                flips ^= rows[p][1]
        if vec:
            rows[vec.bit_length() - 1] = (vec, flips)
    want, flips = base ^ target, set()
    for p in sorted(rows, reverse=True):
        if want >> p & 1:
            want ^= rows[p][0]
            flips ^= rows[p][1]
    assert want == 0
    out = bytearray(frame)
    for byte, bit in flips:
        out[byte] ^= 1 << bit
    return bytes(out)


def test_a_different_request_forged_to_the_same_length_and_crc_is_computed(srv):
    first = argon(seed=11)
    frame = zm.pack_request(5, "compute", [first])
    moved = first.positions.copy()
    moved[0] += 0.3
    other = zm.pack_request(5, "compute", [Structure(numbers=first.numbers, positions=moved,
                                                     cell=first.cell, pbc=first.pbc)])
    at = other.find(moved.tobytes())
    # flip low mantissa bits of atoms 1-4's coordinates: still finite, a different geometry
    forged = forge_crc32(other, slice(at + 24, at + 24 + 12 * 8, 8), zlib.crc32(frame))
    assert len(forged) == len(frame)
    assert zlib.crc32(forged) == zlib.crc32(frame)
    assert forged != frame
    with Dealer(srv.address) as d:
        d.send(frame)
        assert d.recv()["ok"] is True
        d.send(forged)
        (got,) = zm.unpack_reply(msgpack.packb(d.recv()), expect_id=5).results
    (sent,) = zm.unpack_request(forged).structures
    (ref,) = REFERENCE.compute([sent])
    assert_over_wire(got, ref, sent, REFERENCE)


# ---------------------------------------------------------------- row 7: gone clients


def test_a_cancelled_request_is_not_computed(srv, gate):
    gate.hold()
    try:
        with Dealer(srv.address) as running, Dealer(srv.address) as d:
            started = gate.started() + 1  # before sending: the forward may begin at once
            running.send(zm.pack_request(1, "compute", [argon(seed=1)]))
            gate.wait_started(started)
            d.send(zm.pack_request(2, "compute", [argon(seed=2)]))
            wait_for(lambda: stats(srv.address)["queue_depth"] == 1)
            d.send(zm.pack_request(3, "cancel", target=2))
            replies = {r["id"]: r for r in (d.recv(), d.recv())}
            assert replies[3]["value"] == {"target": 2, "state": "cancelled"}
            assert replies[2]["error"]["code"] == "cancelled"
            d.send(zm.pack_request(4, "cancel", target=99))
            assert d.recv()["value"]["state"] == "unknown"
            gate.release()
            assert running.recv()["ok"] is True
        assert gate.started() == started  # request 2 never reached the model
        assert stats(srv.address)["dropped"].get("cancelled", 0) >= 1
    finally:
        gate.release()
    answered_correctly(srv.address)


def test_requests_of_a_closed_connection_are_dropped_uncomputed(srv, gate):
    """The issue's row: clients that disconnect mid-request (20 x 64k atoms) were still
    computed. Here 5 queued requests of a client that closes its socket."""
    before = stats(srv.address)["dropped"].get("disconnected", 0)
    gate.hold()
    try:
        with Dealer(srv.address) as running:
            started = gate.started() + 1  # before sending: the forward may begin at once
            running.send(zm.pack_request(1, "compute", [argon(seed=1)]))
            gate.wait_started(started)
            gone = Dealer(srv.address)
            for k in range(5):
                gone.send(zm.pack_request(10 + k, "compute", [argon(seed=10 + k)]))
            wait_for(lambda: stats(srv.address)["queue_depth"] == 5)
            gone.close()
            wait_for(lambda: stats(srv.address)["dropped"].get("disconnected", 0)
                     == before + 5)
            assert stats(srv.address)["queue_depth"] == 0
            gate.release()
            assert running.recv()["ok"] is True
        assert gate.started() == started
    finally:
        gate.release()
    answered_correctly(srv.address)


# ---------------------------------------------------------------- row 8: oversized batch


@pytest.mark.parametrize("n", [4097, 9000])
def test_an_oversized_batch_is_too_large(srv, n):
    one = zm.pack_structure(argon())
    reply = raw(srv.address, msgpack.packb({"v": 1, "id": 9, "op": "batch",
                                            "structures": [one] * n}, use_bin_type=True))
    assert reply["ok"] is False
    assert reply["error"]["code"] == "too_large", reply
    assert reply["id"] == (9 if n == 4097 else None)  # beyond 2 x 4096: before the id is read
    answered_correctly(srv.address)
