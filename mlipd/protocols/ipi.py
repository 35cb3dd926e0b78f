"""The i-PI socket protocol as a pure codec (atomic units, i-PI's array layout).

Every message starts with a 12-byte ASCII header padded with spaces. The server
(i-PI, or ASE's SocketIOCalculator) asks, the client (a force driver) answers:

    server -> client                       client -> server
    STATUS                                 READY | NEEDINIT | HAVEDATA
    INIT     i4 bead, i4 len, bytes        (nothing)
    POSDATA  see below                     (nothing)
    GETFORCE                               FORCEREADY, see below
    EXIT                                   (nothing)

Unbatched POSDATA:  f8[9] h, f8[9] h^-1, i4 n, f8[n*3] positions
Unbatched FORCEREADY: f8 energy, i4 n, f8[n*3] forces, f8[9] virial, i4 len, bytes extra

i-PI >= 3.3 batched mode (``<ffsocket>`` with ``batch_size`` B > 1) announces
``batch_size:B`` in the INIT string; afterwards (``ipi/interfaces/sockets.py``
``dispatch_send_batch`` / ``_recv_forces_bulk_batch``, ``i-pi-py_driver``):

    POSDATA:    i4 n, B x (f8[9] h, f8[9] h^-1), f8[B*n*3] positions
    FORCEREADY: f8[B] energies, i4 n, f8[B*n*3] forces, f8[B*9] virials,
                B x (i4 len, bytes extra)

i-PI's shared-memory mode (``shm``) keeps the control messages on a UNIX socket;
its POSDATA carries only ``i4 n`` plus, on the first exchange, six
``(i4 len, name)`` shared-memory segment names; its FORCEREADY carries only the
B extra strings (numbers travel through the segments).

Arrays are native little-endian. ``h`` is sent as the C-order bytes of i-PI's
cell matrix, whose *columns* are the lattice vectors (ASE sends ``cell.T``); the
virial is i-PI's ``-dE/dstrain`` transposed the same way (ASE sends ``virial.T``).
Decoders take ``read_exact(n) -> bytes-like`` that returns exactly n bytes (or
raises); they copy what they keep, so the reader may reuse its buffer. Atom
counts are checked against ``max_atoms`` (all structures of one message
together) before anything is allocated; NaN or infinity raise ProtocolError.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from mlipd.errors import ProtocolError

HEADER_LEN = 12
DEFAULT_MAX_ATOMS = 5_000_000  # 120 MB of positions: refuse anything larger before allocating
MAX_BATCH = 4096
MAX_STRING_BYTES = 1 << 24  # INIT and extra strings
SHM_KINDS = ("pos", "h", "ih", "pot", "force", "vir")  # segment order of i-PI's SHMDriver

ReadExact = Callable[[int], bytes]

_F8 = np.dtype("<f8")
_I4 = struct.Struct("<i")


class Header(bytes, Enum):
    """The 12-byte message headers."""

    STATUS = b"STATUS".ljust(HEADER_LEN)
    READY = b"READY".ljust(HEADER_LEN)
    NEEDINIT = b"NEEDINIT".ljust(HEADER_LEN)
    HAVEDATA = b"HAVEDATA".ljust(HEADER_LEN)
    INIT = b"INIT".ljust(HEADER_LEN)
    POSDATA = b"POSDATA".ljust(HEADER_LEN)
    GETFORCE = b"GETFORCE".ljust(HEADER_LEN)
    FORCEREADY = b"FORCEREADY".ljust(HEADER_LEN)
    EXIT = b"EXIT".ljust(HEADER_LEN)


_BY_BYTES = {h.value: h for h in Header}


def decode_header(raw: bytes) -> Header:
    """Header from exactly 12 bytes; unknown bytes raise ProtocolError."""
    raw = bytes(raw)
    try:
        return _BY_BYTES[raw]
    except KeyError:
        raise ProtocolError(f"unknown i-PI message header {raw!r}") from None


def read_header(read_exact: ReadExact) -> Header:
    return decode_header(read_exact(HEADER_LEN))


# --------------------------------------------------------------------------- INIT


@dataclass(frozen=True)
class Init:
    """INIT payload: bead (replica) index and the server's parameter string."""

    bead: int
    text: bytes = b""

    @property
    def batch_size(self) -> int:
        return init_batch_size(self.text)


def init_params(text: bytes) -> dict[str, str]:
    """``key:value`` pairs of an INIT string, comma separated (i-PI writes
    ``" k : v , "`` per ``<parameters>`` entry, then ``batch_size:B``).

    Tokens without a colon (ASE's single NUL byte, blanks) are ignored.
    """
    out = {}
    for token in text.decode("utf-8", errors="replace").split(","):
        key, sep, value = token.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def init_batch_size(text: bytes) -> int:
    """The ``batch_size`` announced in an INIT string (1 when absent)."""
    value = init_params(text).get("batch_size")
    if value is None:
        return 1
    try:
        batch = int(value)
    except ValueError:
        raise ProtocolError(f"INIT: batch_size {value!r} is not an integer") from None
    if not 1 <= batch <= MAX_BATCH:
        raise ProtocolError(f"INIT: batch_size {batch} outside 1..{MAX_BATCH}")
    return batch


def read_init(read_exact: ReadExact) -> Init:
    """INIT payload (after the header)."""
    bead = _read_i4(read_exact)
    return Init(bead=bead, text=_read_string(read_exact, "INIT"))


def encode_init(m: Init) -> bytes:
    return Header.INIT.value + _I4.pack(m.bead) + _I4.pack(len(m.text)) + m.text


# ------------------------------------------------------------------------ POSDATA


@dataclass(frozen=True)
class PosData:
    """Structures as i-PI sends them, in Bohr.

    cells:         (B, 3, 3) i-PI's h, lattice vectors are the COLUMNS
    inverse_cells: (B, 3, 3) h^-1 as sent (carried for round trips, else unused)
    positions:     (B, N, 3)
    """

    cells: np.ndarray
    inverse_cells: np.ndarray
    positions: np.ndarray

    @property
    def batch(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[1])


def read_posdata(read_exact: ReadExact, *, batch_size: int = 1,
                 max_atoms: int = DEFAULT_MAX_ATOMS) -> PosData:
    """POSDATA payload (after the header), unbatched for ``batch_size == 1``."""
    if batch_size == 1:
        h = _read_f8(read_exact, 9, "cell")
        ih = _read_f8(read_exact, 9, "inverse cell")
        n = read_atom_count(read_exact, max_atoms=max_atoms, what="POSDATA")
        pos = _read_f8(read_exact, 3 * n, "positions")
        return PosData(h.reshape(1, 3, 3), ih.reshape(1, 3, 3), pos.reshape(1, n, 3))
    n = read_atom_count(read_exact, max_atoms=_per_structure(max_atoms, batch_size),
                        what="POSDATA")
    cells = _read_f8(read_exact, 18 * batch_size, "cells").reshape(batch_size, 2, 3, 3)
    pos = _read_f8(read_exact, 3 * n * batch_size, "positions")
    return PosData(cells[:, 0].copy(), cells[:, 1].copy(), pos.reshape(batch_size, n, 3))


def encode_posdata(m: PosData) -> bytes:
    """POSDATA with header; the batched layout when ``m.batch > 1``."""
    n = _I4.pack(m.n_atoms)
    pos = np.ascontiguousarray(m.positions, _F8).tobytes()
    if m.batch == 1:
        return b"".join([Header.POSDATA.value, _f8_bytes(m.cells), _f8_bytes(m.inverse_cells),
                         n, pos])
    cells = np.stack([m.cells, m.inverse_cells], axis=1)
    return b"".join([Header.POSDATA.value, n, _f8_bytes(cells), pos])


# --------------------------------------------------------------------- FORCEREADY


@dataclass(frozen=True)
class ForceReady:
    """Results as the client sends them, in atomic units.

    energies: (B,) Hartree
    forces:   (B, N, 3) Hartree/Bohr
    virials:  (B, 3, 3) Hartree, -dE/dstrain in i-PI's layout (ASE's virial transposed)
    extras:   B byte strings (i-PI parses JSON; b"" for none)
    """

    energies: np.ndarray
    forces: np.ndarray
    virials: np.ndarray
    extras: tuple[bytes, ...]

    @property
    def batch(self) -> int:
        return int(self.energies.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.forces.shape[1])


def read_forceready(read_exact: ReadExact, *, batch_size: int = 1,
                    max_atoms: int = DEFAULT_MAX_ATOMS) -> ForceReady:
    """FORCEREADY payload (after the header)."""
    energies = _read_f8(read_exact, batch_size, "energy")
    n = read_atom_count(read_exact, max_atoms=_per_structure(max_atoms, batch_size),
                        what="FORCEREADY")
    forces = _read_f8(read_exact, 3 * n * batch_size, "forces").reshape(batch_size, n, 3)
    virials = _read_f8(read_exact, 9 * batch_size, "virial").reshape(batch_size, 3, 3)
    extras = tuple(_read_string(read_exact, "extra") for _ in range(batch_size))
    return ForceReady(energies, forces, virials, extras)


def encode_forceready(m: ForceReady) -> bytes:
    """FORCEREADY with header (batched layout when ``m.batch > 1``), as one blob."""
    if len(m.extras) != m.batch:
        raise ValueError(f"{len(m.extras)} extra strings for a batch of {m.batch}")
    # the unbatched layout is the batched one with B = 1
    parts = [Header.FORCEREADY.value, _f8_bytes(m.energies), _I4.pack(m.n_atoms),
             _f8_bytes(m.forces), _f8_bytes(m.virials)]
    for extra in m.extras:
        parts += [_I4.pack(len(extra)), extra]
    return b"".join(parts)


# ------------------------------------------------------------- shared-memory mode


@dataclass(frozen=True)
class ShmPosData:
    """POSDATA of i-PI's ``shm`` mode: the atom count, and the segment names
    ({kind: name} for ``SHM_KINDS``) on the first exchange only."""

    n_atoms: int
    segments: dict[str, str] | None = None


def read_shm_posdata(read_exact: ReadExact, *, first: bool,
                     max_atoms: int = DEFAULT_MAX_ATOMS) -> ShmPosData:
    n = read_atom_count(read_exact, max_atoms=max_atoms, what="POSDATA")
    if not first:
        return ShmPosData(n)
    names = {}
    for kind in SHM_KINDS:
        raw = _read_string(read_exact, "shared-memory name", limit=255)
        try:
            names[kind] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"POSDATA: shared-memory name {raw!r} is not UTF-8") from None
    return ShmPosData(n, names)


def encode_shm_posdata(m: ShmPosData) -> bytes:
    parts = [Header.POSDATA.value, _I4.pack(m.n_atoms)]
    for kind in SHM_KINDS if m.segments is not None else ():
        name = m.segments[kind].encode("utf-8")
        parts += [_I4.pack(len(name)), name]
    return b"".join(parts)


def encode_shm_forceready(extras: Sequence[bytes]) -> bytes:
    """FORCEREADY of ``shm`` mode: only the B extra strings travel on the socket."""
    parts = [Header.FORCEREADY.value]
    for extra in extras:
        parts += [_I4.pack(len(extra)), extra]
    return b"".join(parts)


def read_shm_forceready(read_exact: ReadExact, *, batch_size: int = 1) -> tuple[bytes, ...]:
    return tuple(_read_string(read_exact, "extra") for _ in range(batch_size))


SHM_PROBE_LEN = 16  # bytes of a first POSDATA payload that ``looks_like_shm_posdata`` reads


def looks_like_shm_posdata(head: bytes, *, max_atoms: int = DEFAULT_MAX_ATOMS) -> bool:
    """Whether the first ``SHM_PROBE_LEN`` bytes of a POSDATA payload are i-PI's ``shm``
    layout (i4 atom count, i4 length of the first segment name, its first characters),
    which a client in socket mode would misread as a cell.

    Safe for both socket layouts: unbatched, the bytes are the double h[0, 0], whose
    high word is >= 2**20 for any non-zero cell (never a name length of 1..255);
    batched, they are the atom count and the low word of h[0, 0] followed by binary
    doubles, not 8 printable characters. Every first POSDATA of any mode is longer than
    the probe, so reading it never waits for bytes that will not come.
    """
    if len(head) < SHM_PROBE_LEN:
        return False
    n, length = struct.unpack_from("<ii", head)
    if not (1 <= n <= max_atoms and 1 <= length <= 255):
        return False
    name = head[8:8 + min(length, SHM_PROBE_LEN - 8)]
    return all(32 < b < 127 for b in name)


# ------------------------------------------------------------------------ helpers


def read_atom_count(read_exact: ReadExact, *, max_atoms: int, what: str) -> int:
    n = _read_i4(read_exact)
    if not 1 <= n <= max_atoms:
        raise ProtocolError(f"{what}: atom count {n} outside 1..{max_atoms}")
    return n


def _per_structure(max_atoms: int, batch_size: int) -> int:
    """``max_atoms`` bounds a whole message, all structures of a batch together."""
    return max(max_atoms // batch_size, 1)


def _read_i4(read_exact: ReadExact) -> int:
    return _I4.unpack(bytes(read_exact(4)))[0]


def _read_f8(read_exact: ReadExact, count: int, what: str) -> np.ndarray:
    """``count`` float64 values, copied out of the reader's buffer; NaN/inf rejected."""
    a = np.frombuffer(read_exact(8 * count), dtype=_F8, count=count).astype(np.float64)
    if not np.isfinite(a).all():
        raise ProtocolError(f"non-finite value in {what}")
    return a


def _read_string(read_exact: ReadExact, what: str, *, limit: int = MAX_STRING_BYTES) -> bytes:
    n = _read_i4(read_exact)
    if not 0 <= n <= limit:
        raise ProtocolError(f"{what} string length {n} outside 0..{limit}")
    return bytes(read_exact(n)) if n else b""


def _f8_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype=_F8).tobytes()


def status_reply(*, initialised: bool, has_data: bool) -> bytes:
    """The client's answer to STATUS."""
    if has_data:
        return Header.HAVEDATA.value
    return Header.READY.value if initialised else Header.NEEDINIT.value


class BufferReader:
    """``read_exact`` over an in-memory blob (tests, fuzzing); short data raises."""

    def __init__(self, blob: bytes) -> None:
        self._view = memoryview(blob)
        self.pos = 0

    def read_exact(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self._view):
            raise ProtocolError(f"truncated message: wanted {n} bytes, "
                                f"{len(self._view) - self.pos} left")
        out = self._view[self.pos:self.pos + n]
        self.pos += n
        return out

    @property
    def remaining(self) -> int:
        return len(self._view) - self.pos
