"""The i-PI codec: golden bytes from i-PI's and ASE's own code, round trips and
malformed frames (property-based)."""

from __future__ import annotations

import contextlib
import socket
import struct

import numpy as np
import pytest
from ase.calculators.socketio import IPIProtocol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from ipi.interfaces.sockets import Driver, Status

from mlipd.errors import ProtocolError
from mlipd.protocols import ipi
from mlipd.protocols.convert import (
    decode_extras,
    forceready_from_results,
    posdata_from_structures,
    results_from_forceready,
    structures_from_posdata,
)
from mlipd.testing import tolerances as tol
from mlipd.types import Result, Structure
from mlipd.units import BOHR_ANG, FORCE_AU_EV_ANG, HARTREE_EV

pytestmark = pytest.mark.timeout(120)

RNG = np.random.default_rng(7)
# a value divided by a unit on one side and multiplied by the same float64 constant on
# the other (ASE's Ha / Bohr is computed as ours): two roundings, per component
TWO_ROUNDINGS = tol.roundings(2)


def reader(blob: bytes):
    return ipi.BufferReader(blob).read_exact


def triclinic(n=5):
    cell = np.array([[5.0, 0.0, 0.0], [1.2, 4.5, 0.0], [-0.7, 0.9, 6.1]])
    pos = RNG.uniform(0, 5, size=(n, 3))
    return cell, pos


def drain(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk
        out += chunk
    return out


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


# ----------------------------------------------------------------- golden: ASE


def test_ase_posdata_decodes(pair):
    server, client = pair
    cell, pos = triclinic()
    IPIProtocol(server).sendposdata(cell, np.linalg.pinv(cell).T, pos)
    blob = drain(client, 12 + 72 + 72 + 4 + 24 * len(pos))
    r = ipi.BufferReader(blob)
    assert ipi.read_header(r.read_exact) is ipi.Header.POSDATA
    m = ipi.read_posdata(r.read_exact)
    assert r.remaining == 0
    (s,) = structures_from_posdata(m, numbers=np.full(len(pos), 18), pbc=np.ones(3, bool))
    np.testing.assert_allclose(s.cell, cell, rtol=TWO_ROUNDINGS)
    np.testing.assert_allclose(s.positions, pos, rtol=TWO_ROUNDINGS)


def test_our_forceready_decodes_in_ase(pair):
    """Our FORCEREADY read by ASE's server side: eV values come back exactly,
    including a non-symmetric virial (catches a transposition)."""
    server, client = pair
    n = 4
    virial = RNG.normal(size=(3, 3))
    result = Result(energy=-3.25, forces=RNG.normal(size=(n, 3)), virial=virial,
                    extras={"charges": [0.1] * n})
    client.sendall(ipi.encode_forceready(forceready_from_results([result])))
    e, f, v, more = IPIProtocol(server).sendrecv_force()
    assert drain(client, 12) == ipi.Header.GETFORCE.value
    np.testing.assert_allclose(e, result.energy, rtol=TWO_ROUNDINGS)
    np.testing.assert_allclose(f, result.forces, rtol=TWO_ROUNDINGS)
    np.testing.assert_allclose(v, virial, rtol=TWO_ROUNDINGS)
    assert decode_extras(bytes(more)) == {"charges": [0.1] * n}


def test_ase_forceready_and_init_decode(pair):
    """ASE's client sends one NUL extra byte and a one-NUL INIT string."""
    server, client = pair
    n = 3
    forces, virial = RNG.normal(size=(n, 3)), RNG.normal(size=(3, 3))
    proto = IPIProtocol(client)
    proto.sendforce(1.5, forces, virial)
    size = 12 + 8 + 4 + 24 * n + 72 + 4 + 1
    r = ipi.BufferReader(drain(server, size))
    assert ipi.read_header(r.read_exact) is ipi.Header.FORCEREADY
    (got,) = results_from_forceready(ipi.read_forceready(r.read_exact))
    assert r.remaining == 0
    # ASE divides the energy by Ha; it multiplies forces by Bohr / Ha and the virial by
    # 1 / Ha, constants rounded themselves (one more rounding each, and Bohr / Ha is
    # not the inverse of our rounded Ha / Bohr: one more)
    np.testing.assert_allclose(got.energy, 1.5, rtol=TWO_ROUNDINGS)
    np.testing.assert_allclose(got.forces, forces, rtol=tol.roundings(4))
    np.testing.assert_allclose(got.virial, virial, rtol=tol.roundings(3))
    assert got.extras == {}  # b"\0": blank, as i-PI's parse_extra treats it
    IPIProtocol(server).sendinit()
    r = ipi.BufferReader(drain(client, 12 + 4 + 4 + 1))
    assert ipi.read_header(r.read_exact) is ipi.Header.INIT
    init = ipi.read_init(r.read_exact)
    assert (init.bead, init.text, init.batch_size) == (0, b"\0", 1)


# ---------------------------------------------------------------- golden: i-PI


def ipi_driver(sock, *, batch_size=1, status=Status.Up | Status.Ready):
    d = Driver(sock)
    d.batch_size = batch_size
    d.status = status
    return d


def request(h, pos):
    flat = np.ascontiguousarray(pos, np.float64).reshape(-1)
    return {"id": 0, "pars": " ", "pos": flat, "active": np.arange(flat.size),
            "cell": (h, np.linalg.inv(h)), "offset": 0.0}


def test_ipi_unbatched_posdata_decodes(pair):
    server, client = pair
    cell, pos = triclinic()
    h = cell.T / BOHR_ANG  # i-PI's cell: columns are lattice vectors
    d = ipi_driver(server)
    d.sendpos((pos / BOHR_ANG).reshape(-1), (h, np.linalg.inv(h)))
    r = ipi.BufferReader(drain(client, 12 + 148 + 24 * len(pos)))
    assert ipi.read_header(r.read_exact) is ipi.Header.POSDATA
    m = ipi.read_posdata(r.read_exact)
    np.testing.assert_array_equal(m.cells[0], h)
    np.testing.assert_array_equal(m.inverse_cells[0], np.linalg.inv(h))
    (s,) = structures_from_posdata(m, numbers=np.full(len(pos), 14), pbc=np.ones(3, bool))
    np.testing.assert_allclose(s.cell, cell, rtol=TWO_ROUNDINGS)
    np.testing.assert_allclose(s.positions, pos, rtol=TWO_ROUNDINGS, atol=0)
    d.close()


def test_ipi_batched_init_posdata_and_forceready(pair):
    """i-PI 3.3's batched mode: INIT announces batch_size; POSDATA carries the
    batch (padded by repeating the last request); our FORCEREADY is read by i-PI."""
    server, client = pair
    n, batch = 3, 4
    d = ipi_driver(server, batch_size=batch, status=Status.Up | Status.NeedsInit)
    d.initialize(7, " temperature : 300 , ")
    head = drain(client, 12 + 8)
    r = ipi.BufferReader(head + drain(client, struct.unpack("<i", head[16:])[0]))
    assert ipi.read_header(r.read_exact) is ipi.Header.INIT
    init = ipi.read_init(r.read_exact)
    assert init.bead == 7
    assert init.batch_size == batch
    assert ipi.init_params(init.text) == {"temperature": "300", "batch_size": "4"}

    reqs = []
    for _ in range(3):  # 3 real requests, i-PI pads to 4
        cell, pos = triclinic(n)
        reqs.append(request(cell.T / BOHR_ANG, pos / BOHR_ANG))
    d.status = Status.Up | Status.Ready
    assert d.dispatch_send_batch(reqs)
    r = ipi.BufferReader(drain(client, 12 + 4 + batch * (144 + 24 * n) + 12))
    assert ipi.read_header(r.read_exact) is ipi.Header.POSDATA
    m = ipi.read_posdata(r.read_exact, batch_size=batch)
    assert ipi.read_header(r.read_exact) is ipi.Header.GETFORCE
    assert r.remaining == 0
    for b in range(batch):
        src = reqs[min(b, 2)]
        np.testing.assert_array_equal(m.cells[b], src["cell"][0])
        np.testing.assert_array_equal(m.positions[b].reshape(-1), src["pos"])

    results = [Result(energy=float(b), forces=RNG.normal(size=(n, 3)),
                      virial=RNG.normal(size=(3, 3)), extras={"b": b} if b else {})
               for b in range(batch)]
    client.sendall(ipi.encode_forceready(forceready_from_results(results)))
    got = d._recv_forces_bulk_batch(n, 3)
    for res, (pot, f, vir, extra) in zip(results, got, strict=False):
        np.testing.assert_allclose(pot * HARTREE_EV, res.energy, rtol=TWO_ROUNDINGS)
        np.testing.assert_allclose(f.reshape(n, 3) * FORCE_AU_EV_ANG, res.forces,
                                   rtol=TWO_ROUNDINGS)
        np.testing.assert_allclose(vir.T * HARTREE_EV, res.virial, rtol=TWO_ROUNDINGS)
        assert {k: v for k, v in extra.items() if k != "raw"} == dict(res.extras)
    d.close()


def test_ipi_reads_unbatched_forceready_with_empty_extra(pair):
    server, client = pair
    n = 2
    res = Result(energy=0.5, forces=np.ones((n, 3)), virial=None)
    blob = ipi.encode_forceready(forceready_from_results([res]))
    assert blob.endswith(struct.pack("<i", 0))  # no extras: zero bytes, which i-PI accepts
    client.sendall(blob)
    d = ipi_driver(server, status=Status.Up | Status.HasData)
    pot, _forces, vir, extra = d._recv_forces_bulk(n)
    assert pot == 0.5 / HARTREE_EV  # the same division: bit for bit
    np.testing.assert_array_equal(vir, np.zeros((3, 3)))  # no virial: zeros on the wire
    assert extra == {}
    d.close()


# ---------------------------------------------------------------- round trips

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def posdata(draw):
    b = draw(st.integers(1, 4))
    n = draw(st.integers(1, 12))
    return ipi.PosData(cells=draw(arrays(np.float64, (b, 3, 3), elements=finite)),
                       inverse_cells=draw(arrays(np.float64, (b, 3, 3), elements=finite)),
                       positions=draw(arrays(np.float64, (b, n, 3), elements=finite)))


@st.composite
def forceready(draw):
    b = draw(st.integers(1, 4))
    n = draw(st.integers(1, 12))
    return ipi.ForceReady(
        energies=draw(arrays(np.float64, (b,), elements=finite)),
        forces=draw(arrays(np.float64, (b, n, 3), elements=finite)),
        virials=draw(arrays(np.float64, (b, 3, 3), elements=finite)),
        extras=tuple(draw(st.lists(st.binary(max_size=40), min_size=b, max_size=b))))


@given(posdata())
@settings(max_examples=150, deadline=None)
def test_posdata_round_trip_and_truncation(m):
    blob = ipi.encode_posdata(m)
    r = ipi.BufferReader(blob)
    assert ipi.read_header(r.read_exact) is ipi.Header.POSDATA
    got = ipi.read_posdata(r.read_exact, batch_size=m.batch)
    assert r.remaining == 0
    for a, b in [(got.cells, m.cells), (got.inverse_cells, m.inverse_cells),
                 (got.positions, m.positions)]:
        np.testing.assert_array_equal(a, b)
    for cut in {len(blob) - 1, len(blob) // 2, 13}:
        r = ipi.BufferReader(blob[:cut])
        ipi.read_header(r.read_exact)
        with pytest.raises(ProtocolError):
            ipi.read_posdata(r.read_exact, batch_size=m.batch)


@given(forceready())
@settings(max_examples=150, deadline=None)
def test_forceready_round_trip_and_truncation(m):
    blob = ipi.encode_forceready(m)
    r = ipi.BufferReader(blob)
    assert ipi.read_header(r.read_exact) is ipi.Header.FORCEREADY
    got = ipi.read_forceready(r.read_exact, batch_size=m.batch)
    assert r.remaining == 0
    np.testing.assert_array_equal(got.energies, m.energies)
    np.testing.assert_array_equal(got.forces, m.forces)
    np.testing.assert_array_equal(got.virials, m.virials)
    assert got.extras == m.extras
    r = ipi.BufferReader(blob[:-1])
    ipi.read_header(r.read_exact)
    with pytest.raises(ProtocolError):
        ipi.read_forceready(r.read_exact, batch_size=m.batch)


@given(st.binary(max_size=300), st.integers(1, 4))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_garbage_raises_only_protocol_error(blob, batch):
    for read in (lambda r: ipi.read_posdata(r, batch_size=batch, max_atoms=1000),
                 lambda r: ipi.read_forceready(r, batch_size=batch, max_atoms=1000),
                 ipi.read_init, lambda r: ipi.read_shm_posdata(r, first=True),
                 ipi.read_header):
        with contextlib.suppress(ProtocolError):  # anything else fails the test
            read(reader(blob))


def test_structures_round_trip_units():
    cell, pos = triclinic()
    s = Structure(numbers=np.full(len(pos), 18), positions=pos, cell=cell, pbc=True)
    m = ipi.read_posdata(reader(ipi.encode_posdata(posdata_from_structures([s]))[12:]))
    (back,) = structures_from_posdata(m, numbers=s.numbers, pbc=s.pbc)
    np.testing.assert_allclose(back.cell, cell, rtol=TWO_ROUNDINGS)
    np.testing.assert_allclose(back.positions, pos, rtol=TWO_ROUNDINGS)
    np.testing.assert_allclose(m.cells[0] @ m.inverse_cells[0], np.eye(3), atol=1e-14)


# ------------------------------------------------------------------ malformed


def posdata_blob(n_field: int, positions: np.ndarray) -> bytes:
    return (np.eye(3).tobytes() + np.eye(3).tobytes() + struct.pack("<i", n_field)
            + positions.astype("<f8").tobytes())


@pytest.mark.parametrize("n", [0, -1, -(2**31), 2**31 - 1, 1001])
def test_bad_atom_counts(n):
    with pytest.raises(ProtocolError, match="atom count"):
        ipi.read_posdata(reader(posdata_blob(n, np.zeros((1, 3)))), max_atoms=1000)


def test_batched_count_bounds_whole_message():
    blob = struct.pack("<i", 300) + b"\0" * 10
    with pytest.raises(ProtocolError, match=r"atom count 300 outside 1\.\.250"):
        ipi.read_posdata(reader(blob), batch_size=4, max_atoms=1000)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_positions(bad):
    pos = np.zeros((2, 3))
    pos[1, 2] = bad
    with pytest.raises(ProtocolError, match="non-finite value in positions"):
        ipi.read_posdata(reader(posdata_blob(2, pos)))


@pytest.mark.parametrize("raw", [b"POSDATA     "[:-1] + b"X", b"posdata     ", b"\0" * 12,
                                 b"FORCEREADYXX"])
def test_unknown_header(raw):
    with pytest.raises(ProtocolError, match="unknown i-PI message header"):
        ipi.decode_header(raw)


@pytest.mark.parametrize("text", [b"batch_size:0", b"batch_size:x", b"a:1, batch_size:99999"])
def test_bad_batch_size(text):
    with pytest.raises(ProtocolError, match="batch_size"):
        ipi.init_batch_size(text)


def test_bad_string_lengths():
    with pytest.raises(ProtocolError, match="INIT string length -5"):
        ipi.read_init(reader(struct.pack("<ii", 0, -5)))
    huge = struct.pack("<d", 1.0) + struct.pack("<i", 1) + b"\0" * 96 + struct.pack("<i", 2**30)
    with pytest.raises(ProtocolError, match="extra string length"):
        ipi.read_forceready(reader(huge))


def test_shm_posdata_round_trip():
    names = {k: f"ipi_shm_1_2_{k}" for k in ipi.SHM_KINDS}
    for m in (ipi.ShmPosData(5, names), ipi.ShmPosData(5)):
        blob = ipi.encode_shm_posdata(m)
        got = ipi.read_shm_posdata(reader(blob[12:]), first=m.segments is not None)
        assert got == m
    extras = (b"", b"{}")
    r = ipi.BufferReader(ipi.encode_shm_forceready(extras)[12:])
    assert ipi.read_shm_forceready(r.read_exact, batch_size=2) == extras


@settings(max_examples=300, deadline=None)
@given(cells=arrays(np.float64, (2, 3, 3), elements=st.floats(-1e3, 1e3, allow_subnormal=False)),
       n=st.integers(1, 10_000), batch=st.integers(1, 2))
def test_socket_posdata_never_looks_like_shm(cells, n, batch):
    """Any cell i-PI or ASE could send, unbatched or batched, in front of any count."""
    positions = RNG.normal(size=(batch, n if batch == 1 else min(n, 50), 3))
    m = ipi.PosData(cells=cells[:batch], inverse_cells=cells[:batch],
                    positions=positions)
    payload = ipi.encode_posdata(m)[ipi.HEADER_LEN:]
    assert not ipi.looks_like_shm_posdata(payload[:ipi.SHM_PROBE_LEN])


@pytest.mark.parametrize("name", ["ipi_shm_123_4_", "x", "/psm_0a1b2c3d"])
def test_shm_posdata_is_recognised(name):
    names = {k: name + k for k in ipi.SHM_KINDS}
    payload = ipi.encode_shm_posdata(ipi.ShmPosData(192, names))[ipi.HEADER_LEN:]
    assert len(payload) > ipi.SHM_PROBE_LEN  # the probe never waits for absent bytes
    assert ipi.looks_like_shm_posdata(payload[:ipi.SHM_PROBE_LEN])
    # later shm messages carry the count only: never probed (the first one was)
    assert not ipi.looks_like_shm_posdata(struct.pack("<i", 192))
