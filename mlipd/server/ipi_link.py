"""One ``--ipi`` connection of the server: the driver's connection loop, fed by the scheduler.

The link connects to an i-PI ``<ffsocket>`` (or ASE's SocketIOCalculator), answers
it with ``mlipd.driver.loop.serve_connection`` and submits every POSDATA (one
structure, or i-PI's batch) to the engine worker as one request. While connected
it is a *gated* source of the scheduler, so the beads that i-PI sends to several
links at once wait for each other and share one engine call. When the MD code
exits or restarts, the link reconnects (until the server stops).
"""

from __future__ import annotations

import contextlib
import logging
import threading

from mlipd.driver.loop import SocketTransport, serve_connection
from mlipd.driver.socket_io import FramedSocket, connect, parse_address
from mlipd.driver.template import Template
from mlipd.errors import MlipdError, ServerUnavailable
from mlipd.server.metrics import Metrics
from mlipd.server.worker import EngineWorker

log = logging.getLogger(__name__)

_CONNECT_TRY_S = 1.0  # one connect() call; the link loops until stopped
_READ_TIMEOUT_S = 3600.0  # an MD code may think for a long time between steps


class IpiLink:
    """A reconnecting i-PI client connection on a thread of its own.

    address:  ``unix:NAME``, ``unix:/path`` or ``HOST:PORT`` (``mlipd.driver.socket_io``)
    template: atomic numbers and pbc, which i-PI never sends
    source:   the scheduler's key for this connection
    """

    def __init__(self, address: str, *, worker: EngineWorker, template: Template,
                 metrics: Metrics, source: object, max_atoms: int = 5_000_000) -> None:
        self.address = parse_address(address)
        self.worker = worker
        self.template = template
        self.metrics = metrics
        self.source = source
        self.max_atoms = max_atoms
        self.connected = False
        self.sessions = 0  # connections made so far
        self._stop = threading.Event()
        self._conn: FramedSocket | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"mlipd-ipi-{address}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No reconnecting from now on (the current exchange may still finish)."""
        self._stop.set()

    def join(self, *, timeout_s: float = 10.0) -> None:
        """Close the connection (i-PI requeues what it had sent) and wait for the thread."""
        self._stop.set()
        with self._lock:
            if self._conn is not None:
                self._conn.close()  # unblocks the reading thread
        self._thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        compute = self.worker.compute_for(self.source)

        def counted(structures):
            self.metrics.on_request("ipi")
            return compute(structures)

        while not self._stop.is_set():
            try:
                sock = connect(self.address, timeout=_CONNECT_TRY_S)
            except ServerUnavailable:
                continue  # not up (yet, or again): keep trying until stopped
            conn = FramedSocket(sock, timeout=_READ_TIMEOUT_S)
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._conn = conn
            self.connected = True
            self.sessions += 1
            self.worker.add_gated(self.source)
            log.info("%s: connected", self.address.text)
            transport = SocketTransport(template=self.template, max_atoms=self.max_atoms)
            try:
                report = serve_connection(conn, counted, transport, name=self.address.text)
                log.info("%s: ended after %d steps%s", self.address.text, report.steps,
                         " (EXIT)" if report.exit else "")
            except (MlipdError, OSError) as e:
                if not self._stop.is_set():
                    log.warning("%s: %s; reconnecting", self.address.text, e)
                    self.metrics.on_error(getattr(e, "code", "closed"))
            except Exception:  # the loop's one catch-all: this connection only
                log.exception("%s: unexpected error; reconnecting", self.address.text)
                self.metrics.on_error("internal")
            finally:
                self.worker.remove_gated(self.source)
                self.connected = False
                with self._lock:
                    self._conn = None
                with contextlib.suppress(OSError):
                    conn.close()
            self._stop.wait(0.05)  # do not spin against a server that closes at once
