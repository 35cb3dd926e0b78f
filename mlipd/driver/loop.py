"""One i-PI client connection as an explicit state machine.

The loop owns no model: it receives ``compute(list[Structure]) -> list[Result]``
(``mlipd.server.ipi_link`` passes the engine, inline or through the scheduler).
How positions arrive and forces leave (plain socket or shared memory) is a
``Transport``; the message order is the same for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

import numpy as np

from mlipd.driver.socket_io import FramedSocket
from mlipd.driver.template import Template
from mlipd.errors import CalculationFailed, ProtocolError
from mlipd.protocols import ipi
from mlipd.protocols.convert import forceready_from_results, structures_from_posdata
from mlipd.types import Result, Structure

log = logging.getLogger(__name__)

Compute = Callable[[list[Structure]], list[Result]]


class Phase(Enum):
    NEEDINIT = auto()  # connected, no INIT yet
    READY = auto()  # waiting for POSDATA
    HAVEDATA = auto()  # results computed, waiting for GETFORCE


class Transport(Protocol):
    """Reads one POSDATA payload and encodes one FORCEREADY reply."""

    def read_posdata(self, conn: FramedSocket, *, batch_size: int) -> list[Structure]: ...

    def encode_forceready(self, results: Sequence[Result]) -> bytes: ...

    def close(self) -> None: ...


class SocketTransport:
    """Positions and forces in the socket stream (i-PI ``unix``/``inet``, ASE).

    The atom count is fixed for the life of the connection: the first POSDATA
    sets it (after checking it against the template) and a change is an error.
    """

    def __init__(self, *, template: Template, max_atoms: int = ipi.DEFAULT_MAX_ATOMS) -> None:
        self.template = template
        self.max_atoms = max_atoms
        self.n_atoms: int | None = None

    def read_posdata(self, conn: FramedSocket, *, batch_size: int) -> list[Structure]:
        read = conn.recv_exact
        if self.n_atoms is None:  # the first message: i-PI's shm mode on a plain socket?
            head = bytes(conn.recv_exact(ipi.SHM_PROBE_LEN))
            if ipi.looks_like_shm_posdata(head, max_atoms=self.max_atoms):
                raise ProtocolError("POSDATA looks like i-PI's shm mode (an atom count, then "
                                    "shared-memory names): use --mode shm")
            read = _replaying(head, conn.recv_exact)
        m = ipi.read_posdata(read, batch_size=batch_size, max_atoms=self.max_atoms)
        numbers = self.check_atom_count(m.n_atoms)
        return structures_from_posdata(m, numbers=numbers, pbc=self.template.pbc)

    def check_atom_count(self, n: int) -> np.ndarray:
        if self.n_atoms is not None and n != self.n_atoms:
            raise ProtocolError(f"atom count changed mid-run from {self.n_atoms} to {n}")
        numbers = self.template.numbers_for(n)
        self.n_atoms = n
        return numbers

    def encode_forceready(self, results: Sequence[Result]) -> bytes:
        return ipi.encode_forceready(forceready_from_results(results))

    def close(self) -> None:
        """Nothing to release."""


def _replaying(head: bytes, read_exact: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """``read_exact`` that first returns the bytes of ``head`` already read."""
    pending = bytearray(head)

    def read(n: int) -> bytes:
        if not pending:
            return read_exact(n)
        take = bytes(pending[:n])
        del pending[:n]
        return take + bytes(read_exact(n - len(take))) if len(take) < n else take

    return read


@dataclass
class ConnectionReport:
    """How a connection ended. ``exit``: the server sent EXIT; else it closed.

    requests:   POSDATA messages answered, i.e. force requests: i-PI sends one per bead
                and force evaluation (one per MD step with one bead or in batched mode,
                plus the initial one), ASE one per calculation. The protocol never says
                which MD step a request belongs to, so MD steps are not counted here.
    structures: structures in those requests (beads of batched requests counted apart)
    computed:   structures evaluated (i-PI pads a short batch with copies, computed once)
    """

    requests: int = 0
    structures: int = 0
    computed: int = 0
    exit: bool = False

    def describe(self) -> str:
        return (f"{self.requests} force requests ({self.structures} structures, "
                f"{self.computed} computed)")


def serve_connection(conn: FramedSocket, compute: Compute, transport: Transport, *,
                     name: str = "", report: ConnectionReport | None = None
                     ) -> ConnectionReport:
    """Answer one server until EXIT or a clean close between messages; counts go into
    ``report`` (a new one when None), which the caller keeps when this raises.

    Bad bytes or messages in the wrong order raise ProtocolError; a structure
    that cannot be computed raises ValidationError/CalculationFailed. The
    protocol has no error message, so the caller closes the connection.
    """
    report = ConnectionReport() if report is None else report
    phase, batch_size, reply = Phase.NEEDINIT, 1, b""
    while True:
        raw = conn.recv_exact_or_eof(ipi.HEADER_LEN)
        if raw is None:
            log.info("%s: server closed the connection after %s", name, report.describe())
            return report
        header = ipi.decode_header(raw)
        match header:
            case ipi.Header.STATUS:
                conn.send(ipi.status_reply(initialised=phase is not Phase.NEEDINIT,
                                           has_data=phase is Phase.HAVEDATA))
            case ipi.Header.INIT:
                _expect(header, phase, Phase.NEEDINIT, Phase.READY)
                init = ipi.read_init(conn.recv_exact)
                batch_size = init.batch_size
                log.info("%s: INIT bead %d, batch size %d", name, init.bead, batch_size)
                phase = Phase.READY
            case ipi.Header.POSDATA:
                # NEEDINIT too: ASE's server may skip INIT ("some codes seem to be okay")
                _expect(header, phase, Phase.NEEDINIT, Phase.READY)
                structures = transport.read_posdata(conn, batch_size=batch_size)
                results, unique = compute_padded(compute, structures)
                reply = transport.encode_forceready(results)
                report.requests += 1
                report.structures += len(structures)
                report.computed += unique
                phase = Phase.HAVEDATA
            case ipi.Header.GETFORCE:
                _expect(header, phase, Phase.HAVEDATA)
                conn.send(reply)
                phase = Phase.READY
            case ipi.Header.EXIT:
                log.info("%s: EXIT after %s", name, report.describe())
                report.exit = True
                return report
            case _:
                raise ProtocolError(f"{header.name.strip()} is a client message; "
                                    "the server must not send it")


def _expect(header: ipi.Header, phase: Phase, *allowed: Phase) -> None:
    if phase not in allowed:
        raise ProtocolError(f"{header.name} received in phase {phase.name} "
                            f"(allowed in {', '.join(p.name for p in allowed)})")


def compute_padded(compute: Compute, structures: list[Structure]) -> tuple[list[Result], int]:
    """``compute`` once per distinct structure: i-PI pads a short batch by repeating
    its last structure, and those copies need no second evaluation.

    Returns the results in input order and the number of structures computed.
    """
    unique: list[Structure] = []
    index: list[int] = []
    for s in structures:
        if unique and _same(unique[-1], s):
            index.append(len(unique) - 1)
        else:
            unique.append(s)
            index.append(len(unique) - 1)
    results = compute(unique)
    if len(results) != len(unique):
        raise CalculationFailed(f"compute returned {len(results)} results for "
                                f"{len(unique)} structures")
    return [results[i] for i in index], len(unique)


def _same(a: Structure, b: Structure) -> bool:
    return np.array_equal(a.positions, b.positions) and np.array_equal(a.cell, b.cell)
