"""The mlipd ZeroMQ message envelope, version 1: msgpack maps, arrays as raw bytes.

Pure codec: no sockets, no zmq, no torch. The transport (``mlipd.server.endpoint``,
``mlipd.client``) moves one msgpack frame per request and per reply; a ROUTER
socket adds its routing frames in front, which this module never sees.

Request::

    {"v": 1, "id": <int>, "op": "compute" | "batch" | "info" | "ping" | "stats" | "cancel",
     "structures": [<structure>, ...],      # compute: exactly 1; batch: >= 1
     "virial": <bool>,                      # optional, default true
     "target": <int>}                       # cancel only: the id of the request to drop

    <structure> = {"numbers": <array int>, "positions": <array float, (N, 3) Å>,
                   "cell": <array float, (3, 3) Å, rows>, "pbc": [bool, bool, bool]}
    <array>     = {"dtype": "<f8", "shape": [N, 3], "data": <bin, little-endian>}

Reply::

    {"v": 1, "id": <same id>, "ok": true, "results": [<result>, ...]}   # compute, batch
    {"v": 1, "id": <same id>, "ok": true, "value": {...}}               # info, ping, stats
    {"v": 1, "id": <same id>, "ok": true, "pending": true,              # a repeated id
     "value": {"state": "queued" | "computing", "waited_s": <float>}}   # still at work
    {"v": 1, "id": <same id or null>, "ok": false,
     "error": {"code": <stable code, see mlipd.errors>, "message": <text>}}

    <result> = {"energy": <float eV>, "forces": <array (N, 3) eV/Å>,
                "virial": <array (3, 3) eV> | null, "extras": {...},
                "energies": <array (N,) eV per atom>}   # absent when the model has none

A request sent again with the same id (on the same connection) is never computed
twice: the server answers it from the computation under way (``pending``) or
finished (the same reply again). Clients resend as their heartbeat.

Every field of every op is checked (``check_request``): unknown keys, wrong types and
values are ``bad_input``. Frames are decoded with msgpack's ``max_*_len`` limits and a
budget of containers and elements (``load_request``), so a frame of nested empty maps
fails after a few thousand objects instead of building millions. Sizes are checked
from the headers before any array is built, so a message that claims a huge array
costs nothing (``too_large`` / ``bad_input``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from mlipd.errors import (
    MlipdError,
    ProtocolError,
    TooLarge,
    ValidationError,
    error_from_wire,
    error_to_wire,
)
from mlipd.types import Result, Structure

VERSION = 1
COMPUTE_OPS = frozenset({"compute", "batch"})
OPS = COMPUTE_OPS | frozenset({"info", "ping", "stats", "cancel"})
_REQUEST_KEYS = frozenset({"v", "id", "op", "structures", "virial", "target"})
_INT64 = (-(2**63), 2**63 - 1)
_MAX_STR = 256  # keys, op names, dtype strings: all short

# dtypes accepted per field (little-endian only, STYLE P6): anything else is bad_input
_INT_DTYPES = frozenset({"<i4", "<i8", "|i1", "<i2", "|u1", "<u2", "<u4"})
_FLOAT_DTYPES = frozenset({"<f8", "<f4"})
DEFAULT_MAX_ATOMS = 2_000_000  # per request, all structures together
DEFAULT_MAX_STRUCTURES = 4096  # per request
_DEFAULT_PACK_BUF = 256 * 1024  # msgpack's own default


@dataclass(frozen=True)
class Request:
    """A decoded request. ``structures`` is empty for info/ping/stats."""

    id: int
    op: str
    structures: tuple[Structure, ...] = ()
    virial: bool = True
    target: int | None = None  # cancel: the id of the request to drop

    @property
    def n_atoms(self) -> int:
        return sum(s.n_atoms for s in self.structures)


@dataclass(frozen=True)
class Reply:
    """A decoded successful reply: ``results`` for compute/batch, ``value`` otherwise;
    ``pending``: the server is still at work on this id (``value`` says how)."""

    id: int
    results: tuple[Result, ...] = ()
    value: Mapping[str, Any] = field(default_factory=dict)
    pending: bool = False


class BadRequest(MlipdError):
    """A request that cannot be decoded; carries the id when it could be read."""

    def __init__(self, cause: MlipdError, req_id: int | None) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.req_id = req_id
        self.code = cause.code


# ---------------------------------------------------------------- arrays


def pack_array(a: np.ndarray) -> dict[str, Any]:
    """Any numeric array -> {dtype, shape, data}, little-endian, C order."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    # a byte view, not tobytes(): msgpack copies it into the frame once
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": memoryview(a).cast("B")}


def unpack_array(d: Any, *, name: str, allowed: frozenset[str], shape: tuple[int | None, ...],
                 max_items: int) -> np.ndarray:
    """Check dtype, shape and byte count before viewing ``data``; None in ``shape``: any."""
    if not isinstance(d, Mapping) or set(d) != {"dtype", "shape", "data"}:
        raise ValidationError(f"{name}: expected a map with keys dtype, shape, data")
    dtype, dims, data = d["dtype"], d["shape"], d["data"]
    if not isinstance(dtype, str) or dtype not in allowed:
        raise ValidationError(f"{name}: dtype {dtype!r} not one of {sorted(allowed)}")
    if (not isinstance(dims, list) or len(dims) != len(shape)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in dims)):
        raise ValidationError(f"{name}: shape {dims!r} is not {len(shape)} non-negative ints")
    if any(want is not None and got != want for got, want in zip(dims, shape, strict=True)):
        raise ValidationError(f"{name}: shape {dims} does not match {list(shape)}")
    items = 1
    for x in dims:
        items *= x
    if items > max_items:
        raise TooLarge(f"{name}: {items} items exceed the limit of {max_items}")
    if not isinstance(data, bytes):
        raise ValidationError(f"{name}: data must be binary")
    expected = items * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise ValidationError(
            f"{name}: {len(data)} bytes for shape {dims} {dtype} (need {expected})")
    return np.frombuffer(data, dtype=dtype).reshape(dims)


# ---------------------------------------------------------------- structures and results


def pack_structure(s: Structure) -> dict[str, Any]:
    return {"numbers": pack_array(s.numbers.astype("<i4")), "positions": pack_array(s.positions),
            "cell": pack_array(s.cell), "pbc": [bool(p) for p in s.pbc]}


def unpack_structure(d: Any, *, max_atoms: int) -> Structure:
    if not isinstance(d, Mapping) or set(d) != {"numbers", "positions", "cell", "pbc"}:
        raise ValidationError("structure: expected a map with keys numbers, positions, cell, pbc")
    numbers = unpack_array(d["numbers"], name="numbers", allowed=_INT_DTYPES, shape=(None,),
                           max_items=max_atoms)
    n = int(numbers.shape[0])
    positions = unpack_array(d["positions"], name="positions", allowed=_FLOAT_DTYPES,
                             shape=(n, 3), max_items=3 * max_atoms)
    cell = unpack_array(d["cell"], name="cell", allowed=_FLOAT_DTYPES, shape=(3, 3), max_items=9)
    pbc = d["pbc"]
    if not isinstance(pbc, list) or len(pbc) != 3 or not all(isinstance(p, bool) for p in pbc):
        raise ValidationError("pbc: expected a list of 3 booleans")
    return Structure(numbers=numbers, positions=positions, cell=cell, pbc=np.array(pbc))


def pack_result(r: Result) -> dict[str, Any]:
    d = {"energy": float(r.energy), "forces": pack_array(np.asarray(r.forces, dtype="<f8")),
         "virial": None if r.virial is None else pack_array(np.asarray(r.virial, dtype="<f8")),
         "extras": dict(r.extras)}
    if r.energies is not None:
        d["energies"] = pack_array(np.asarray(r.energies, dtype="<f8"))
    return d


def unpack_result(d: Any) -> Result:
    if not isinstance(d, Mapping) or not {"energy", "forces", "virial"} <= set(d):
        raise ProtocolError("result: expected a map with energy, forces, virial")
    big = 2**40  # a reply comes from the server we asked; its size is not checked here
    forces = unpack_array(d["forces"], name="forces", allowed=_FLOAT_DTYPES, shape=(None, 3),
                          max_items=big)
    virial = None if d["virial"] is None else unpack_array(
        d["virial"], name="virial", allowed=_FLOAT_DTYPES, shape=(3, 3), max_items=9)
    energies = d.get("energies")
    if energies is not None:
        energies = unpack_array(energies, name="energies", allowed=_FLOAT_DTYPES,
                                shape=(forces.shape[0],), max_items=big)
    return Result(energy=float(d["energy"]), forces=forces, virial=virial,
                  extras=dict(d.get("extras") or {}), energies=energies)


# ---------------------------------------------------------------- requests


def pack_request(req_id: int, op: str, structures: Sequence[Structure] = (), *,
                 virial: bool = True, target: int | None = None) -> bytes:
    """One request frame. ``op`` in OPS; ``structures`` only for compute (1) and batch (>= 1);
    ``target`` only for cancel (the id of the request to drop)."""
    if op not in OPS:
        raise ValidationError(f"unknown op {op!r}; known: {', '.join(sorted(OPS))}")
    msg: dict[str, Any] = {"v": VERSION, "id": int(req_id), "op": op}
    if op == "cancel":
        if target is None:
            raise ValidationError("cancel needs the target request's id")
        msg["target"] = int(target)
    if op in COMPUTE_OPS:
        msg["structures"] = [pack_structure(s) for s in structures]
        msg["virial"] = bool(virial)
    return _packb(msg, sum(s.positions.nbytes + 4 * s.n_atoms for s in structures))


def _packb(msg: Any, payload_bytes: int) -> bytes:
    """msgpack.packb with the buffer sized for the arrays up front: packb starts at
    256 KiB and doubles, so a 65k-atom frame paid four reallocations and copies; one
    buffer of the right size is allocated once."""
    size = max(payload_bytes + 4096 * (1 + payload_bytes // 1_000_000), _DEFAULT_PACK_BUF)
    return msgpack.Packer(use_bin_type=True, buf_size=size).pack(msg)


def _loads(raw: bytes | memoryview) -> Any:
    # unpackb bounds every length by the frame size: a header claiming 2 GB fails, unallocated
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"not a msgpack message: {e}") from e


def load_request(raw: bytes | memoryview, *,
                 max_structures: int = DEFAULT_MAX_STRUCTURES) -> Any:
    """msgpack -> Python objects for a request frame, bounded: strings, maps and arrays
    no longer than a request can need, and at most a request's worth of containers and
    elements in all (``ProtocolError`` otherwise, before more is built; ``TooLarge`` for
    a list of more structures than allowed)."""
    budget = [64 + 16 * max_structures, 256 + 64 * max_structures]  # containers, elements

    def spend(obj: Any) -> Any:
        budget[0] -= 1
        budget[1] -= len(obj)
        if budget[0] < 0 or budget[1] < 0:
            raise ProtocolError("request nests more maps and arrays than any request has")
        return obj

    try:
        # twice what is allowed: a batch of up to 2 max_structures is decoded (within the
        # budget above) and refused by ``check_request`` with its id (too_large); a longer
        # list fails at its header here, also too_large (the id unread)
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=_MAX_STR,
                               max_array_len=max(2 * max_structures, 16), max_map_len=16,
                               max_ext_len=0, list_hook=spend, object_hook=spend)
    except ProtocolError:
        raise
    except ValueError as e:
        if "max_array_len" in str(e):  # msgpack's message for a list over the limit
            raise TooLarge(f"a list longer than {max(2 * max_structures, 16)} items (at "
                           f"most {max_structures} structures per request)") from e
        raise ProtocolError(f"not a msgpack request: {type(e).__name__}: {e}") from e
    except (TypeError, msgpack.UnpackException, RecursionError) as e:
        raise ProtocolError(f"not a msgpack request: {type(e).__name__}: {e}") from e


def request_id(msg: Any) -> int | None:
    """The id of a loaded request, when it has a valid one."""
    rid = msg.get("id") if isinstance(msg, Mapping) else None
    if isinstance(rid, int) and not isinstance(rid, bool) and _INT64[0] <= rid <= _INT64[1]:
        return rid
    return None


def unpack_request(raw: bytes | memoryview | Mapping, *, max_atoms: int = DEFAULT_MAX_ATOMS,
                   max_structures: int = DEFAULT_MAX_STRUCTURES) -> Request:
    """Decode and check one request; raises ``BadRequest`` (with the id when known)."""
    msg = (load_request(raw, max_structures=max_structures)
           if isinstance(raw, bytes | bytearray | memoryview) else raw)
    return check_request(msg, max_atoms=max_atoms, max_structures=max_structures)


def check_request(msg: Any, *, max_atoms: int = DEFAULT_MAX_ATOMS,
                  max_structures: int = DEFAULT_MAX_STRUCTURES) -> Request:
    """Check every field of a loaded request; raises ``BadRequest`` (with the id when known)."""
    req_id = request_id(msg)
    try:
        return _check_request(msg, req_id, max_atoms=max_atoms, max_structures=max_structures)
    except MlipdError as e:
        raise BadRequest(e, req_id) from e


def _check_request(msg: Any, req_id: int | None, *, max_atoms: int,
                   max_structures: int) -> Request:
    if not isinstance(msg, Mapping):
        raise ValidationError("request must be a msgpack map")
    v = msg.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v != VERSION:
        raise ValidationError(f"protocol version {v!r} not supported (server speaks {VERSION})")
    if req_id is None:
        raise ValidationError("request needs an integer 'id' (64-bit)")
    unknown = set(msg) - _REQUEST_KEYS
    if unknown:
        raise ValidationError(f"unknown request keys {sorted(map(str, unknown))}; "
                              f"known: {', '.join(sorted(_REQUEST_KEYS))}")
    op = msg.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ValidationError(f"unknown op {op!r}; known: {', '.join(sorted(OPS))}")
    if op not in COMPUTE_OPS:
        extra = ({"structures", "virial"} | ({"target"} if op != "cancel" else set())) & set(msg)
        if extra:
            raise ValidationError(f"{op} takes no {', '.join(sorted(extra))}")
        if op != "cancel":
            return Request(id=req_id, op=op)
        target = request_id({"id": msg.get("target")})
        if target is None:
            raise ValidationError("cancel needs an integer 'target' (64-bit): the id of the "
                                  "request to drop")
        return Request(id=req_id, op=op, target=target)
    if "target" in msg:
        raise ValidationError(f"{op} takes no target")
    items = msg.get("structures")
    if not isinstance(items, list) or not items:
        raise ValidationError(f"{op}: 'structures' must be a non-empty list")
    if op == "compute" and len(items) != 1:
        raise ValidationError(f"compute takes exactly one structure, got {len(items)} (use batch)")
    if len(items) > max_structures:
        raise TooLarge(f"{len(items)} structures exceed the limit of {max_structures}")
    virial = msg.get("virial", True)
    if not isinstance(virial, bool):
        raise ValidationError("'virial' must be a boolean")
    structures, left = [], max_atoms
    for k, item in enumerate(items):
        try:
            s = unpack_structure(item, max_atoms=left)
        except TooLarge as e:
            raise TooLarge(f"request exceeds {max_atoms} atoms (structure {k}: {e})") from e
        except ValidationError as e:
            raise type(e)(f"structure {k}: {e}") from e
        left -= s.n_atoms
        structures.append(s)
    return Request(id=req_id, op=op, structures=tuple(structures), virial=virial)


# ---------------------------------------------------------------- replies


def pack_results(req_id: int, results: Sequence[Result]) -> bytes:
    return _packb({"v": VERSION, "id": req_id, "ok": True,
                   "results": [pack_result(r) for r in results]},
                  sum(np.asarray(r.forces).nbytes for r in results))


def pack_value(req_id: int, value: Mapping[str, Any]) -> bytes:
    return msgpack.packb({"v": VERSION, "id": req_id, "ok": True, "value": dict(value)},
                         use_bin_type=True)


def pack_pending(req_id: int, *, state: str, waited_s: float) -> bytes:
    """The answer to a repeated id still at work: ``state`` "queued" or "computing"."""
    return msgpack.packb({"v": VERSION, "id": req_id, "ok": True, "pending": True,
                          "value": {"state": state, "waited_s": float(waited_s)}},
                         use_bin_type=True)


def pack_error(req_id: int | None, error: BaseException) -> bytes:
    return msgpack.packb({"v": VERSION, "id": req_id, "ok": False, "error": error_to_wire(error)},
                         use_bin_type=True)


def loads(raw: bytes | memoryview) -> Any:
    """msgpack -> Python objects (ProtocolError if not msgpack); no checks."""
    return _loads(raw)


def reply_id(msg: Any) -> int | None:
    """The id of a loaded reply, or None (not a map, or an error without an id)."""
    rid = msg.get("id") if isinstance(msg, Mapping) else None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


def unpack_reply(raw: bytes | Mapping[str, Any], *, expect_id: int | None = None) -> Reply:
    """Decode a reply (a frame, or one already ``loads``-ed); an error reply raises
    the typed error (``mlipd.errors``)."""
    msg = raw if isinstance(raw, Mapping) else _loads(raw)
    if (not isinstance(msg, Mapping) or msg.get("v") != VERSION
            or not isinstance(msg.get("ok"), bool)):
        raise ProtocolError("reply is not a version-1 mlipd envelope")
    rid = msg.get("id")
    if expect_id is not None and rid is not None and rid != expect_id:
        raise ProtocolError(f"reply id {rid} does not match request id {expect_id}")
    if not msg["ok"]:
        err = msg.get("error")
        raise error_from_wire(err if isinstance(err, Mapping) else {"message": "malformed error"})
    if msg.get("pending") is True:
        value = msg.get("value")
        return Reply(id=rid, value=value if isinstance(value, Mapping) else {}, pending=True)
    if "results" in msg:
        if not isinstance(msg["results"], list):
            raise ProtocolError("reply 'results' must be a list")
        return Reply(id=rid, results=tuple(unpack_result(r) for r in msg["results"]))
    value = msg.get("value")
    if not isinstance(value, Mapping):
        raise ProtocolError("reply has neither results nor value")
    return Reply(id=rid, value=value)
