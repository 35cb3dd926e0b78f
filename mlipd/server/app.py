"""The long-running server: one engine, one scheduler, ZeroMQ and i-PI front ends.

    ZMQ clients --ROUTER--> ZmqEndpoint --+   (polled by the engine loop thread; its
    i-PI / ASE  <--socket-- IpiLink ------+--> own thread while the engine computes)
                             (a thread each)   EngineWorker: scheduler + engine

``mlipd drive`` is this server with i-PI links only, which do not reconnect. A single
i-PI link with no ZeroMQ endpoint is the only source of work: it calls the engine on
its own thread (``ipi_link.Inline``), with no engine thread in between.

``Server.close()`` stops taking new work, answers what is queued (computed while
``shutdown_timeout_s`` lasts, ``busy`` after), sends every reply, then closes the
front ends and the engine; it returns False only when an engine call had to be
abandoned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import zmq

import mlipd
from mlipd.driver.socket_io import Address, parse_address
from mlipd.errors import SetupError
from mlipd.protocols import zmq_msgs
from mlipd.server.endpoint import ZmqEndpoint
from mlipd.server.metrics import Metrics
from mlipd.server.scheduler import Scheduler
from mlipd.server.worker import DEFAULT_REQUEST_TIMEOUT_S, EngineWorker

log = logging.getLogger(__name__)


def engine_info(engine, *, max_request_atoms: int, max_structures: int,
                request_timeout_s: float, scheduler: Scheduler | None = None
                ) -> dict[str, Any]:
    """The ``info`` op's value: what a client needs to know about the model, units and
    limits (it checks a request's size against them before sending). ``scheduler``: the
    queue's bounds (omitted without one)."""
    spec = engine.spec
    limits = engine.limits
    budget = getattr(engine, "memory_budget", None)  # a whole-structure model has none
    queue = {} if scheduler is None else {"max_queue": int(scheduler.max_pending),
                                          "max_queue_bytes": int(scheduler.max_bytes)}
    return {
        "version": mlipd.__version__,
        "protocol": zmq_msgs.VERSION,
        "model": spec.name,
        "cutoff": float(spec.cutoff),
        "n_layers": int(spec.n_layers),
        "species": None if spec.species is None else sorted(int(z) for z in spec.species),
        "units": {"length": "angstrom", "energy": "eV", "forces": "eV/angstrom",
                  "virial": "eV (-dE/dstrain)"},
        "ranks": int(engine.world_size),
        "device": str(engine.device),
        "devices": list(engine.devices),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "max_request_atoms": max_request_atoms,
        "max_structures": max_structures,
        "max_pairs": float(limits.max_pairs),
        "min_distance": float(limits.min_distance),
        "max_request_memory": None if budget is None else int(budget),
        **queue,
        "request_timeout_s": request_timeout_s,
    }


class Server:
    """Compose the pieces; ``start`` binds and connects, ``close`` drains and stops.

    engine:            a ``mlipd.engine`` engine (closed by ``close``)
    zmq:               addresses to bind (``tcp://127.0.0.1:0`` picks a port)
    ipi:               i-PI/ASE socket addresses to connect to (``Address`` or its text)
    max_batch_atoms:   atoms per engine call (a larger single request runs alone)
    max_wait_s:        how long a batch waits for the other i-PI connections
    max_pending:       queued requests before ``busy``
    max_queue_bytes:   bytes of queued requests before ``busy`` (None: the scheduler's default)
    max_request_atoms: atoms in one ZMQ request before ``too_large``
    ipi_options:       ``mlipd.server.ipi_link.LinkOptions`` of the i-PI links (template,
                       reconnecting or not, timeouts)
    request_timeout_s: each request's deadline (queue and engine)
    shutdown_timeout_s: how long ``close`` computes queued requests before ``busy``
    allow_remote:      bind ZeroMQ beyond loopback
    curve:             a key directory (``mlipd keygen``): CURVE on every ZeroMQ endpoint
    allow_readable_key: accept a secret key file readable by group or others (warned)
    """

    def __init__(self, engine, *, zmq: Sequence[str] = (), ipi: Sequence[str | Address] = (),
                 max_batch_atoms: int = 200_000, max_wait_s: float = 0.002,
                 max_pending: int = 1024,
                 max_request_atoms: int = zmq_msgs.DEFAULT_MAX_ATOMS,
                 ipi_options: Any = None,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                 shutdown_timeout_s: float = 60.0, allow_remote: bool = False,
                 curve: str | None = None, allow_readable_key: bool = False,
                 max_queue_bytes: float | None = None) -> None:
        self.engine = engine
        self.metrics = Metrics()
        self.scheduler = Scheduler(max_atoms=max_batch_atoms, max_wait_s=max_wait_s,
                                   max_pending=max_pending,
                                   **({} if max_queue_bytes is None
                                      else {"max_bytes": int(max_queue_bytes)}))
        self._zmq_addresses = list(zmq)
        self._ipi_addresses = [a if isinstance(a, Address) else parse_address(a) for a in ipi]
        self._max_request_atoms = max_request_atoms
        self._ipi_options = ipi_options
        self._request_timeout_s = request_timeout_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._allow_remote = allow_remote
        self._curve_dir = curve
        self._allow_readable_key = allow_readable_key
        if self._ipi_addresses and ipi_options is None:
            raise SetupError("i-PI links need their options (a template: atomic numbers "
                             "and pbc)")
        self._started = time.monotonic()
        self._context: zmq.Context | None = None
        self._curve = None
        self.worker: EngineWorker | None = None
        self.endpoints: list[ZmqEndpoint] = []
        self.links: list[Any] = []

    def stats(self) -> dict[str, Any]:
        s = self.metrics.snapshot()
        now = time.monotonic()
        s["uptime_s"] = now - self._started
        s["gated_sources"] = len(self.scheduler.gated)
        s["ipi_connected"] = sum(1 for link in self.links if link.connected)
        busy = self.worker.busy_since if self.worker is not None else None
        s["engine_busy_s"] = 0.0 if busy is None else now - busy
        s["rank_restarts"] = int(self.engine.restarts)
        return s

    def start(self) -> list[str]:
        """Bind every ZMQ endpoint and start every i-PI link; returns the bound addresses."""
        self.worker = EngineWorker(self.engine, scheduler=self.scheduler, metrics=self.metrics,
                                   request_timeout_s=self._request_timeout_s)
        info = engine_info(self.engine, max_request_atoms=self._max_request_atoms,
                           max_structures=zmq_msgs.DEFAULT_MAX_STRUCTURES,
                           request_timeout_s=self._request_timeout_s,
                           scheduler=self.scheduler)
        self._context = zmq.Context()
        try:
            if self._curve_dir is not None:
                from mlipd.server.security import CurveServer

                self._curve = CurveServer(self._curve_dir, context=self._context,
                                          allow_readable_secret=self._allow_readable_key)
            for address in self._zmq_addresses:
                self.endpoints.append(ZmqEndpoint(
                    address, worker=self.worker, info=info, stats=self.stats,
                    metrics=self.metrics, context=self._context,
                    species=self.engine.spec.species, max_atoms=self._max_request_atoms,
                    allow_remote=self._allow_remote, curve=self._curve))
        except BaseException:
            self._close_zmq()
            raise
        inline = len(self._ipi_addresses) == 1 and not self.endpoints
        if not inline:
            self.worker.start()
        for ep in self.endpoints:
            ep.start()
        if self._ipi_addresses:
            from mlipd.server.ipi_link import Inline, IpiLink, Scheduled

            for k, address in enumerate(self._ipi_addresses):
                source = ("ipi", k)
                compute = (Inline(self.engine, metrics=self.metrics,
                                  request_timeout_s=self._request_timeout_s) if inline
                           else Scheduled(self.worker, source=source, metrics=self.metrics))
                link = IpiLink(address, compute=compute, options=self._ipi_options,
                               metrics=self.metrics, source=source,
                               worker=None if inline else self.worker)
                self.links.append(link)
                link.start()
        return [ep.address for ep in self.endpoints]

    def wait_links(self, stop) -> bool:
        """Block until every i-PI link has ended (links that do not reconnect) or
        ``stop`` (a ``threading.Event``) is set; True when the links ended."""
        while not stop.is_set():
            if all(link.done for link in self.links):
                return True
            stop.wait(0.05)
        return False

    def close(self) -> bool:
        """Stop taking work, answer what is queued, close front ends and engine; False
        when an engine call had to be abandoned."""
        for ep in self.endpoints:
            ep.stop_accepting()
        for link in self.links:
            link.stop()
        clean = True
        if self.worker is not None:
            clean = self.worker.close(timeout_s=self._shutdown_timeout_s)
        self._close_zmq()
        for link in self.links:
            link.join(timeout_s=max(self._shutdown_timeout_s, 1.0))
        clean = clean and not any(link.running for link in self.links)
        if clean:
            self.engine.close()
        log.info("server stopped%s: %s", "" if clean else " (engine call abandoned)",
                 self.metrics.summary())
        return clean

    def _close_zmq(self) -> None:
        for ep in self.endpoints:
            ep.close()
        if self._curve is not None:
            self._curve.stop()
        if self._context is not None:
            self._context.term()
            self._context = None
