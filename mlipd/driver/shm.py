"""i-PI's ``shm`` mode: control messages on a UNIX socket, numbers in shared memory.

i-PI (``SHMDriver`` in ``ipi/interfaces/sockets.py``) owns six float64 segments
sized for a full batch of B structures: ``pos`` (B, 3N), ``h`` and ``ih``
(B, 3, 3), ``pot`` (B,), ``force`` (B, 3N), ``vir`` (B, 3, 3). Their names come
with the first POSDATA. We only attach: i-PI creates and unlinks them. Results
are written into the segments before FORCEREADY is sent, so i-PI never reads a
stale buffer; only the extra strings travel on the socket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from mlipd.driver.loop import SocketTransport, Transport
from mlipd.driver.socket_io import Address, FramedSocket
from mlipd.driver.template import Template
from mlipd.errors import ProtocolError
from mlipd.protocols import ipi
from mlipd.protocols.convert import forceready_from_results, structures_from_posdata
from mlipd.types import Result, Structure


class ShmTransport:
    """Positions from and forces into i-PI's shared-memory segments."""

    def __init__(self, *, template: Template, max_atoms: int = ipi.DEFAULT_MAX_ATOMS) -> None:
        self._atoms = SocketTransport(template=template, max_atoms=max_atoms)  # count checks
        self.max_atoms = max_atoms
        self._handles: dict[str, shared_memory.SharedMemory] = {}
        self._views: dict[str, np.ndarray] = {}
        self._batch = 0

    def read_posdata(self, conn: FramedSocket, *, batch_size: int) -> list[Structure]:
        m = ipi.read_shm_posdata(conn.recv_exact, first=not self._handles,
                                 max_atoms=self.max_atoms)
        numbers = self._atoms.check_atom_count(m.n_atoms)
        if m.segments is not None:
            self._attach(m.segments, batch=batch_size, n_atoms=m.n_atoms)
        elif batch_size != self._batch:
            raise ProtocolError(f"batch size changed from {self._batch} to {batch_size}")
        v = self._views
        posdata = ipi.PosData(cells=v["h"].copy(), inverse_cells=v["ih"].copy(),
                              positions=v["pos"].copy())
        for name, a in (("cell", posdata.cells), ("positions", posdata.positions)):
            if not np.isfinite(a).all():
                raise ProtocolError(f"non-finite value in {name} (shared memory)")
        return structures_from_posdata(posdata, numbers=numbers, pbc=self._atoms.template.pbc)

    def encode_forceready(self, results: Sequence[Result]) -> bytes:
        m = forceready_from_results(results)
        self._views["pot"][:] = m.energies
        self._views["force"][:] = m.forces
        self._views["vir"][:] = m.virials
        return ipi.encode_shm_forceready(m.extras)

    def _attach(self, names: dict[str, str], *, batch: int, n_atoms: int) -> None:
        shapes = {"pos": (batch, n_atoms, 3), "h": (batch, 3, 3), "ih": (batch, 3, 3),
                  "pot": (batch,), "force": (batch, n_atoms, 3), "vir": (batch, 3, 3)}
        for kind in ipi.SHM_KINDS:
            try:
                handle = shared_memory.SharedMemory(name=names[kind])
            except (FileNotFoundError, ValueError, OSError) as e:
                raise ProtocolError(f"cannot attach shared memory {names[kind]!r}: {e}") from e
            # attach only: i-PI owns the segment, our tracker must not unlink it at exit
            resource_tracker.unregister(handle._name, "shared_memory")
            self._handles[kind] = handle
            need = int(np.prod(shapes[kind])) * 8
            if handle.size < need:
                raise ProtocolError(f"shared memory {names[kind]!r} has {handle.size} bytes, "
                                    f"need {need} for {shapes[kind]}")
            self._views[kind] = np.ndarray(shapes[kind], dtype=np.float64, buffer=handle.buf)
        self._batch = batch

    def close(self) -> None:
        self._views.clear()  # views must go before the buffers can be released
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def shm_transports(template: Template, *, max_atoms: int) -> Callable[[Address], Transport]:
    return lambda _address: ShmTransport(template=template, max_atoms=max_atoms)
