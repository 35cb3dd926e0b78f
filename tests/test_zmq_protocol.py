"""The ZeroMQ envelope (mlipd.protocols.zmq_msgs): round trips and refusals, no sockets."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlipd.errors import (
    Busy,
    MlipdError,
    ProtocolError,
    TooLarge,
    UnknownSpecies,
    ValidationError,
)
from mlipd.protocols import zmq_msgs as zm
from mlipd.types import Result, Structure

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def structures(draw):
    n = draw(st.integers(1, 12))
    numbers = draw(st.lists(st.integers(1, 118), min_size=n, max_size=n))
    pos = draw(st.lists(finite, min_size=3 * n, max_size=3 * n))
    pbc = draw(st.lists(st.booleans(), min_size=3, max_size=3))
    cell = np.diag(draw(st.lists(st.floats(1.0, 50.0), min_size=3, max_size=3)))
    cell[1, 0] = draw(finite)
    return Structure(numbers=np.array(numbers), positions=np.reshape(pos, (n, 3)),
                     cell=cell, pbc=np.array(pbc))


@st.composite
def results(draw):
    n = draw(st.integers(1, 12))
    forces = np.reshape(draw(st.lists(finite, min_size=3 * n, max_size=3 * n)), (n, 3))
    virial = draw(st.one_of(st.none(), st.lists(finite, min_size=9, max_size=9)))
    return Result(energy=draw(finite), forces=forces,
                  virial=None if virial is None else np.reshape(virial, (3, 3)),
                  extras={"magmoms": draw(st.lists(finite, min_size=n, max_size=n))})


def same_structure(a: Structure, b: Structure) -> None:
    np.testing.assert_array_equal(a.numbers, b.numbers)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.cell, b.cell)
    np.testing.assert_array_equal(a.pbc, b.pbc)


@settings(max_examples=60, deadline=None)
@given(st.lists(structures(), min_size=1, max_size=4), st.integers(0, 2**62), st.booleans())
def test_request_round_trip(ss, rid, virial):
    op = "compute" if len(ss) == 1 else "batch"
    req = zm.unpack_request(zm.pack_request(rid, op, ss, virial=virial))
    assert (req.id, req.op, req.virial, len(req.structures)) == (rid, op, virial, len(ss))
    for a, b in zip(ss, req.structures, strict=True):
        same_structure(a, b)


@settings(max_examples=60, deadline=None)
@given(st.lists(results(), max_size=4), st.integers(0, 2**62))
def test_results_round_trip(rs, rid):
    reply = zm.unpack_reply(zm.pack_results(rid, rs), expect_id=rid)
    assert reply.id == rid
    assert len(reply.results) == len(rs)
    for a, b in zip(rs, reply.results, strict=True):
        assert a.energy == b.energy
        np.testing.assert_array_equal(a.forces, b.forces)
        if a.virial is None:
            assert b.virial is None
        else:
            np.testing.assert_array_equal(a.virial, b.virial)
        assert list(a.extras["magmoms"]) == list(b.extras["magmoms"])


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([Busy("full"), UnknownSpecies("Z=0"), TooLarge("big"),
                        ValidationError("nan"), ProtocolError("junk"), MlipdError("bug")]),
       st.one_of(st.none(), st.integers(0, 2**31)))
def test_error_reply_raises_the_same_type(err, rid):
    with pytest.raises(type(err), match=str(err)) as info:
        zm.unpack_reply(zm.pack_error(rid, err), expect_id=rid)
    assert info.value.code == err.code


def test_value_reply_and_other_ops():
    for op in ("info", "ping", "stats"):
        assert zm.unpack_request(zm.pack_request(5, op)).op == op
    assert zm.unpack_reply(zm.pack_value(3, {"a": 1}), expect_id=3).value == {"a": 1}
    with pytest.raises(ProtocolError, match="does not match"):
        zm.unpack_reply(zm.pack_value(3, {}), expect_id=4)


def test_arrays_travel_as_little_endian_bytes():
    s = Structure(numbers=np.array([1, 8]), positions=np.arange(6.0).reshape(2, 3),
                  cell=np.eye(3) * 5, pbc=np.ones(3, bool))
    msg = msgpack.unpackb(zm.pack_request(1, "compute", [s]))
    pos = msg["structures"][0]["positions"]
    assert pos["dtype"] == "<f8"
    assert pos["shape"] == [2, 3]
    assert pos["data"] == np.arange(6.0).astype("<f8").tobytes()
    big = zm.pack_array(np.arange(4.0).astype(">f8"))  # big-endian input is normalised
    assert big["dtype"] == "<f8"
    assert np.array_equal(np.frombuffer(big["data"], "<f8"), np.arange(4.0))


def _request_with(**overrides):
    s = Structure(numbers=np.array([18, 18]), positions=np.eye(2, 3) * 3,
                  cell=np.eye(3) * 10, pbc=np.ones(3, bool))
    msg = msgpack.unpackb(zm.pack_request(9, "compute", [s]))
    st0 = msg["structures"][0]
    for key, value in overrides.items():
        if key in st0:
            st0[key] = value
        else:
            msg[key] = value
    return msgpack.packb(msg)


@pytest.mark.parametrize(("raw", "code", "pattern"), [
    # a header claiming 2**28 atoms (6 GB of positions) in a frame of a few bytes
    (_request_with(positions={"dtype": "<f8", "shape": [2**28, 3], "data": b"\0" * 48}),
     "bad_input", "does not match"),
    (_request_with(numbers={"dtype": "<i4", "shape": [2**31], "data": b"\0" * 8}),
     "too_large", "exceed"),
    (_request_with(positions={"dtype": "<f8", "shape": [2, 3], "data": b"\0" * 47}),
     "bad_input", "47 bytes"),
    (_request_with(positions={"dtype": ">f8", "shape": [2, 3], "data": b"\0" * 48}),
     "bad_input", "dtype"),
    (_request_with(positions={"dtype": "<f8", "shape": [2, 3],
                              "data": np.full(6, np.nan).tobytes()}), "bad_input", "NaN"),
    (_request_with(pbc=[1, 0, 0]), "bad_input", "pbc"),
    (_request_with(op="explode"), "bad_input", "unknown op"),
    (_request_with(v=2), "bad_input", "version"),
    (_request_with(virial="yes"), "bad_input", "virial"),
    (_request_with(structures=[]), "bad_input", "non-empty"),
])
def test_bad_requests_are_refused_with_a_code_and_the_id(raw, code, pattern):
    with pytest.raises(zm.BadRequest, match=pattern) as info:
        zm.unpack_request(raw)
    assert info.value.code == code
    assert info.value.req_id == 9


def test_limits_and_garbage():
    s = Structure(numbers=np.ones(10, int), positions=np.zeros((10, 3)) + np.arange(10)[:, None],
                  cell=np.eye(3) * 20, pbc=np.ones(3, bool))
    raw = zm.pack_request(1, "batch", [s, s, s])
    assert len(zm.unpack_request(raw, max_atoms=30).structures) == 3
    with pytest.raises(zm.BadRequest, match="exceeds 29 atoms") as info:
        zm.unpack_request(raw, max_atoms=29)
    assert info.value.code == "too_large"
    with pytest.raises(zm.BadRequest, match="structures exceed"):
        zm.unpack_request(raw, max_structures=2)
    with pytest.raises(zm.BadRequest, match="exactly one"):
        zm.unpack_request(msgpack.packb({**msgpack.unpackb(raw), "op": "compute"}))
    with pytest.raises(ProtocolError, match="not a msgpack"):
        zm.unpack_request(b"\xc1\xff garbage")
    # a bin header claiming 2 GB inside a 10-byte frame fails without allocating
    with pytest.raises(ProtocolError):
        zm.unpack_request(b"\xc6\x7f\xff\xff\xff" + b"\0" * 5)
    with pytest.raises(zm.BadRequest, match="integer 'id'") as info:
        zm.unpack_request(msgpack.packb({"v": 1, "op": "ping"}))
    assert info.value.req_id is None
