"""Property-based fuzzing of both wire protocols against a running `mlipd serve`
(hypothesis, derandomized and bounded in examples): arbitrary msgpack and bytes on
ZeroMQ, bit flips in the float fields of valid frames on ZeroMQ and on an `--ipi`
link. Every frame gets a typed answer (never ``internal``, never silence) or, on the
i-PI link, a closed connection; after each batch the same process answers a valid
request correctly."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
from helpers.fake_ipi import FakeIpi
from helpers.float64_bounds import assert_over_wire
from helpers.server import Dealer
from helpers.systems import argon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlipd.client import Client
from mlipd.engine import make_engine
from mlipd.errors import MlipdError
from mlipd.protocols import ipi
from mlipd.protocols import zmq_msgs as zm
from mlipd.protocols.convert import structures_from_posdata
from mlipd.server.testing import running_server
from mlipd.types import Result

pytestmark = pytest.mark.timeout(300)

REFERENCE = make_engine("lj", dtype="float64")
CODES = {"protocol", "bad_input", "too_large", "unknown_species", "calculation", "busy",
         "deadline"}
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    sock_dir = Path(tempfile.mkdtemp(prefix="mlipd-", dir="/tmp"))  # a short UNIX path
    fake = FakeIpi(sock_dir / "ipi.sock")
    try:
        with running_server(["--model", "lj", "--dtype", "float64", "--zmq",
                             "tcp://127.0.0.1:0", "--species", "Ar", "--ipi",
                             f"unix:{fake.path}", "--max-request-atoms", "20000"],
                            log=tmp / "serve.log") as srv:
            fake.accept()
            with Dealer(srv.address) as dealer:
                yield srv, dealer, fake
    finally:
        fake.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def still_serving(srv, pid: int) -> None:
    assert srv.proc.poll() is None
    assert srv.proc.pid == pid
    s = argon(seed=99)
    with Client(srv.address) as c:
        got = c.compute(s)
    (ref,) = REFERENCE.compute([s])
    assert_over_wire(got, ref, s, REFERENCE)


def check_reply(reply, rid=None) -> None:
    assert reply is not None, "no reply"
    assert reply["v"] == 1
    if reply["ok"]:
        for r in reply.get("results", []):
            forces = np.frombuffer(r["forces"]["data"], "<f8")
            assert np.isfinite(forces).all()
    else:
        assert reply["error"]["code"] in CODES, reply["error"]
    if rid is not None and reply["id"] is not None:
        assert reply["id"] == rid


# ---------------------------------------------------------------- ZeroMQ

leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70).filter(
    lambda x: -2**63 <= x < 2**64), st.floats(), st.text(max_size=8), st.binary(max_size=64))
trees = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=6)),
    max_leaves=40)
KEYS = ["v", "id", "op", "structures", "virial", "numbers", "positions", "cell", "pbc",
        "dtype", "shape", "data"]


@st.composite
def requests(draw):
    """Request-shaped maps: the real keys with arbitrary values, and arbitrary extras."""
    msg = {k: draw(trees) for k in draw(st.lists(st.sampled_from(KEYS[:5]), max_size=5))}
    if draw(st.booleans()):
        msg["v"], msg["id"] = 1, draw(st.integers(0, 2**40))
    if draw(st.booleans()):
        msg["op"] = draw(st.sampled_from(["compute", "batch", "ping", "info", "stats"]))
    return msg


@FUZZ
@given(st.one_of(requests(), trees, st.binary(max_size=256).map(lambda b: ("raw", b))))
def test_zmq_arbitrary_frames_get_typed_answers(served, frame):
    _, dealer, _ = served
    raw = frame[1] if isinstance(frame, tuple) and frame[:1] == ("raw",) else msgpack.packb(
        frame, use_bin_type=True)
    dealer.send(raw)
    check_reply(dealer.recv(timeout_s=30))


IDS = itertools.count(1_000_000)  # a client gives every request its own id


def _valid_frame(rid: int) -> bytes:
    return zm.pack_request(rid, "batch", [argon(seed=1), argon(seed=2, a=5.4)])


@FUZZ
@given(st.integers(0, 2**31), st.integers(1, 6))
def test_zmq_bit_flips_in_float_fields(served, seed, n_flips):
    _, dealer, _ = served
    rng = np.random.default_rng(seed)
    rid = next(IDS)
    msg = msgpack.unpackb(_valid_frame(rid))
    for _ in range(n_flips):
        st_ = msg["structures"][rng.integers(2)]
        field = st_["positions" if rng.random() < 0.7 else "cell"]
        data = bytearray(field["data"])
        bit = int(rng.integers(8 * len(data)))
        data[bit // 8] ^= 1 << (bit % 8)
        field["data"] = bytes(data)
    dealer.send(msgpack.packb(msg, use_bin_type=True))
    reply = dealer.recv(timeout_s=60)
    check_reply(reply, rid)
    if reply["ok"]:  # what was computed equals a direct evaluation of the same bytes
        structures = zm.unpack_request(msgpack.packb(msg)).structures
        refs = REFERENCE.compute(list(structures))
        for r, ref, s in zip(reply["results"], refs, structures, strict=True):
            forces = np.frombuffer(r["forces"]["data"], "<f8").reshape(-1, 3)
            assert_over_wire(Result(energy=ref.energy, forces=forces),
                             replace(ref, virial=None), s, REFERENCE)


def test_zmq_after_the_batches_the_same_process_answers(served):
    srv, _, _ = served
    still_serving(srv, srv.proc.pid)


# ---------------------------------------------------------------- i-PI link


def _reconnected(fake: FakeIpi) -> None:
    fake.drop()
    fake.accept()


@settings(FUZZ, max_examples=60)  # each closed connection costs a reconnection
@given(st.integers(0, 2**31), st.integers(1, 4))
def test_ipi_bit_flips_in_float_fields(served, seed, n_flips):
    """Flips in h, h^-1 and positions of a valid POSDATA: either forces equal to a
    direct evaluation of the flipped structure, or that connection closed (and the
    link back on its own)."""
    _, _, fake = served
    rng = np.random.default_rng(seed)
    s = argon(seed=seed % 7)
    frame = bytearray(fake.posdata_frame([s]))
    floats = range(ipi.HEADER_LEN, len(frame))  # h, h^-1, then i4 count, positions
    count_at = ipi.HEADER_LEN + 144
    for _ in range(n_flips):
        byte = int(rng.choice([b for b in floats if not count_at <= b < count_at + 4]))
        frame[byte] ^= 1 << int(rng.integers(8))
    try:
        (got,) = fake.step([s], frame=bytes(frame))
    except (ConnectionError, OSError, AssertionError, MlipdError):
        assert fake.closed_by_peer(timeout_s=30)
        _reconnected(fake)
        return
    m = ipi.read_posdata(ipi.BufferReader(bytes(frame[ipi.HEADER_LEN:])).read_exact)
    (flipped,) = structures_from_posdata(m, numbers=s.numbers, pbc=np.ones(3, bool))
    (ref,) = REFERENCE.compute([flipped])
    # the geometry decoded from the same bytes; the results through i-PI's units and back
    assert_over_wire(got, ref, flipped, REFERENCE, output_roundings=2)


@FUZZ
@given(st.sampled_from([h.value for h in ipi.Header] + [b"GARBAGE     "]),
       st.binary(max_size=200))
def test_ipi_random_payloads_close_only_that_connection(served, header, payload):
    """Any header with any bytes after it, then the connection ends (as when i-PI dies
    mid-message): the link handles what it got, reconnects, and the process lives."""
    srv, _, fake = served
    try:
        if fake.status() is ipi.Header.NEEDINIT:
            fake.conn.sendall(ipi.encode_init(ipi.Init(bead=0, text=b"")))
        fake.conn.sendall(header + payload)
    except OSError:  # the link already closed on an earlier byte
        pass
    _reconnected(fake)
    assert srv.proc.poll() is None


def test_ipi_after_the_batches_the_link_and_the_process_answer(served):
    srv, _, fake = served
    _reconnected(fake)
    s = argon(seed=5)
    (got,) = fake.step([s])
    (ref,) = REFERENCE.compute([s])
    assert_over_wire(got, ref, s, REFERENCE, geometry_roundings=2, output_roundings=2)
    still_serving(srv, srv.proc.pid)
