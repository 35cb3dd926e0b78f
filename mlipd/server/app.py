"""The long-running server: one engine, one scheduler, ZeroMQ and i-PI front ends.

    ZMQ clients --ROUTER--> ZmqEndpoint --+   (polled by the engine loop thread)
    i-PI / ASE  <--socket-- IpiLink ------+--> EngineWorker: scheduler + engine
                             (a thread each)

``Server.close()`` stops taking new work, answers what is queued, then closes the
front ends and the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import mlipd
from mlipd.protocols import zmq_msgs
from mlipd.server.endpoint import ZmqEndpoint
from mlipd.server.metrics import Metrics
from mlipd.server.scheduler import Scheduler
from mlipd.server.worker import EngineWorker

log = logging.getLogger(__name__)


def engine_info(engine, *, max_request_atoms: int) -> dict[str, Any]:
    """The ``info`` op's value: what a client needs to know about the model and units."""
    spec = engine.spec
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
        "devices": list(getattr(engine, "devices", (str(engine.device),))),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "max_request_atoms": max_request_atoms,
    }


class Server:
    """Compose the pieces; ``start`` binds and connects, ``close`` drains and stops.

    engine:            a ``mlipd.engine`` engine (closed by ``close``)
    zmq:               addresses to bind (``tcp://127.0.0.1:0`` picks a port)
    ipi:               i-PI/ASE socket addresses to connect to (reconnecting)
    max_batch_atoms:   atoms per engine call (a larger single request runs alone)
    max_wait_s:        how long a batch waits for the other i-PI connections
    max_pending:       queued requests before ``busy``
    max_request_atoms: atoms in one ZMQ request before ``too_large``
    ipi_template:      ``mlipd.driver.template.Template`` (numbers, pbc) for the i-PI links
    """

    def __init__(self, engine, *, zmq: Sequence[str] = (), ipi: Sequence[str] = (),
                 max_batch_atoms: int = 200_000, max_wait_s: float = 0.002,
                 max_pending: int = 1024,
                 max_request_atoms: int = zmq_msgs.DEFAULT_MAX_ATOMS,
                 ipi_template: Any = None) -> None:
        self.engine = engine
        self.metrics = Metrics()
        self.scheduler = Scheduler(max_atoms=max_batch_atoms, max_wait_s=max_wait_s,
                                   max_pending=max_pending)
        self._zmq_addresses = list(zmq)
        self._ipi_addresses = list(ipi)
        self._max_request_atoms = max_request_atoms
        self._ipi_template = ipi_template
        if self._ipi_addresses and ipi_template is None:
            from mlipd.errors import SetupError

            raise SetupError("i-PI links need a template (atomic numbers and pbc)")
        self._started = time.monotonic()
        self.worker: EngineWorker | None = None
        self.endpoints: list[ZmqEndpoint] = []
        self.links: list[Any] = []

    def stats(self) -> dict[str, Any]:
        s = self.metrics.snapshot()
        s["uptime_s"] = time.monotonic() - self._started
        s["gated_sources"] = len(self.scheduler.gated)
        s["ipi_connected"] = sum(1 for link in self.links if link.connected)
        return s

    def start(self) -> list[str]:
        """Bind every ZMQ endpoint and start every i-PI link; returns the bound addresses."""
        self.worker = EngineWorker(self.engine, scheduler=self.scheduler, metrics=self.metrics)
        info = engine_info(self.engine, max_request_atoms=self._max_request_atoms)
        for address in self._zmq_addresses:
            ep = ZmqEndpoint(address, worker=self.worker, info=info, stats=self.stats,
                             metrics=self.metrics, species=self.engine.spec.species,
                             max_atoms=self._max_request_atoms)
            self.endpoints.append(ep)
            self.worker.attach(ep)
        self.worker.start()
        if self._ipi_addresses:
            from mlipd.server.ipi_link import IpiLink

            for k, address in enumerate(self._ipi_addresses):
                link = IpiLink(address, worker=self.worker, metrics=self.metrics,
                               template=self._ipi_template, source=("ipi", k))
                self.links.append(link)
                link.start()
        return [ep.address for ep in self.endpoints]

    def close(self) -> None:
        """Stop taking work, answer what is queued, close front ends and engine."""
        for ep in self.endpoints:
            ep.stop_accepting()
        for link in self.links:
            link.stop()
        if self.worker is not None:
            self.worker.close()
        for ep in self.endpoints:
            ep.close()
        for link in self.links:
            link.join()
        self.engine.close()
        log.info("server stopped: %s", self.metrics.summary())
