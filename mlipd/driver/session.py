"""Several connections, one engine: a thread per address, compute under one lock."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mlipd.driver.loop import (
    Compute,
    ConnectionReport,
    SocketTransport,
    Transport,
    serve_connection,
)
from mlipd.driver.socket_io import Address, FramedSocket, connect
from mlipd.driver.template import Template
from mlipd.errors import MlipdError

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One connection's end: ``report`` on success, else ``error`` (a message)."""

    address: str
    report: ConnectionReport | None = None
    error: str | None = None


def locked(compute: Compute) -> Compute:
    """``compute`` made safe to call from several connection threads."""
    lock = threading.Lock()

    def call(structures):
        with lock:
            return compute(structures)

    return call


def drive_address(address: Address, compute: Compute, *, transport: Transport,
                  connect_timeout: float, timeout: float) -> Outcome:
    """Connect to one server and answer it until EXIT; errors become the Outcome."""
    outcome = Outcome(address.text)
    conn = None
    try:
        conn = FramedSocket(connect(address, timeout=connect_timeout), timeout=timeout)
        log.info("%s: connected", address.text)
        outcome.report = serve_connection(conn, compute, transport, name=address.text)
    except (MlipdError, OSError) as e:
        outcome.error = f"{type(e).__name__}: {e}"
        log.error("%s: %s; closing this connection", address.text, outcome.error)
    except Exception as e:  # the one place per connection loop: any bug ends this connection only
        outcome.error = f"{type(e).__name__}: {e}"
        log.exception("%s: unexpected error; closing this connection", address.text)
    finally:
        transport.close()
        if conn is not None:
            conn.close()
    return outcome


def drive_all(addresses: Sequence[Address], compute: Compute, *,
              make_transport: Callable[[Address], Transport],
              connect_timeout: float, timeout: float) -> list[Outcome]:
    """One thread per address; returns when every connection has ended."""
    outcomes: list[Outcome | None] = [None] * len(addresses)
    shared = locked(compute)

    def work(i: int, address: Address) -> None:
        outcomes[i] = drive_address(address, shared, transport=make_transport(address),
                                    connect_timeout=connect_timeout, timeout=timeout)

    if len(addresses) == 1:  # no thread hand-offs on the common single-connection path
        work(0, addresses[0])
        return [outcomes[0] or Outcome(addresses[0].text, error="no outcome")]
    threads = [threading.Thread(target=work, args=(i, a), name=f"ipi-{a.text}", daemon=True)
               for i, a in enumerate(addresses)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o if o is not None else Outcome("?", error="thread died") for o in outcomes]


def socket_transports(template: Template, *, max_atoms: int) -> Callable[[Address], Transport]:
    return lambda _address: SocketTransport(template=template, max_atoms=max_atoms)
