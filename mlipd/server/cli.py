"""``mlipd serve``: options and the main loop (signals, readiness line, periodic stats);
``mlipd stats ENDPOINT`` and ``mlipd keygen DIR``.

The one line written to stdout is ``READY <endpoint> ...`` (the bound ZeroMQ
addresses, possibly none), once everything is bound and connected; tests and
scripts wait for it. Everything else goes through logging.

Exit status of ``serve``: 0 after SIGINT/SIGTERM once every queued request was
answered (an "interrupted" line and the summary are logged first); 1 when an engine
call had to be abandoned at shutdown; 2 for setup errors (an address in use among
them, found before the model loads).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mlipd.errors import SetupError

log = logging.getLogger(__name__)

# mlipd.server.worker's default, repeated so that parsing loads no torch (the worker
# imports the engine); tests/test_layers.py checks they agree
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_STATS_EVERY_S = 60.0  # a line a minute: visible progress, 1,440 short lines a day


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mlipd serve`` options (cli.py adds --model, --device, --dtype, --ranks)."""
    p.add_argument("--zmq", action="append", default=[], metavar="ADDRESS",
                   help="ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:5555, tcp://127.0.0.1:0 "
                        "(any free port) or ipc:///tmp/mlipd.sock; repeatable")
    from mlipd.server.drive import add_link_arguments, add_template_arguments, address_form

    p.add_argument("--ipi", action="append", default=[], metavar="ADDRESS",
                   type=address_form,
                   help="i-PI/ASE socket server to serve forces to (unix:NAME, unix:/path, "
                        "shm:NAME for i-PI's shm mode, HOST:PORT); repeatable, once per "
                        "client connection; reconnects when it restarts")
    add_template_arguments(p, required=False)
    add_link_arguments(p)
    p.add_argument("--max-batch-atoms", type=int, default=200_000,
                   help="atoms per engine call (a larger single request runs alone)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a batch waits for the other i-PI connections' beads")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="queued requests before new ones are answered 'busy'")
    from mlipd.engine_options import byte_size

    p.add_argument("--max-queue-bytes", type=byte_size, default=None, metavar="BYTES",
                   help="bytes of queued requests (their frames) before new ones are "
                        "answered 'busy', e.g. 512M (default 1G)")
    p.add_argument("--max-request-atoms", type=int, default=2_000_000,
                   help="atoms in one ZeroMQ request before it is refused 'too_large'")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                   metavar="S",
                   help="a request's deadline from its arrival, in the queue and between the "
                        f"engine's stages (default {DEFAULT_REQUEST_TIMEOUT_S:g})")
    p.add_argument("--shutdown-timeout", type=float, default=60.0, metavar="S",
                   help="on SIGTERM, compute queued requests for up to S s, then answer the "
                        "rest 'busy' (default 60)")
    p.add_argument("--stats-every", type=float, default=DEFAULT_STATS_EVERY_S, metavar="SECONDS",
                   help="log the server counters every SECONDS (default "
                        f"{DEFAULT_STATS_EVERY_S:g}; 0: only at exit)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding a non-loopback ZeroMQ address")
    p.add_argument("--curve", metavar="DIR",
                   help="CURVE authentication and encryption with the keys `mlipd keygen DIR` "
                        "wrote: only clients whose public keys are in DIR/clients are served")
    p.add_argument("--allow-readable-key", action="store_true",
                   help="use a secret key file that group or others can read (refused "
                        "otherwise; fix with chmod 600)")


def _check_addresses(addresses: list[str], allow_remote: bool) -> None:
    """Refuse a malformed, non-loopback or taken address before loading any model."""
    from mlipd.protocols.zmq_address import parse_zmq_address
    from mlipd.server.security import check_free, check_reach

    for a in addresses:
        address = parse_zmq_address(a, bind=True)
        check_reach(address, allow_remote=allow_remote)
        check_free(address)


def run(args: argparse.Namespace) -> int:
    from mlipd.engine_options import engine_from_args
    from mlipd.malloc import keep_freed_memory, limit_arenas
    from mlipd.server.app import Server
    from mlipd.server.signals import Interrupts

    keep_freed_memory()  # per-step buffers reuse their pages (see mlipd.malloc)
    limit_arenas()  # before the server's threads: their free memory in few arenas

    if not args.zmq and not args.ipi:
        raise SetupError("nothing to serve: give --zmq ADDRESS and/or --ipi ADDRESS")
    for name in ("max_batch_atoms", "max_queue", "max_request_atoms"):
        if getattr(args, name) < 1:
            raise SetupError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_wait_ms < 0 or args.stats_every < 0:
        raise SetupError("--max-wait-ms and --stats-every must be >= 0")
    if args.request_timeout <= 0 or args.shutdown_timeout < 0:
        raise SetupError("--request-timeout must be > 0 and --shutdown-timeout >= 0")
    _check_addresses(args.zmq, args.allow_remote)
    options = None
    if args.ipi:
        from mlipd.driver.socket_io import parse_address, resolve
        from mlipd.server.drive import (
            link_options_from_args,
            say_missing_sockets,
            template_from_args,
        )

        if not (args.structure or args.species):
            raise SetupError("--ipi needs --structure FILE or --species SYMBOL "
                             "(i-PI sends no atomic numbers)")
        options = link_options_from_args(args, template_from_args(args), reconnect=True)
        ipi_addresses = [parse_address(a, sockets_prefix=args.sockets_prefix)
                         for a in args.ipi]
        for a in ipi_addresses:
            resolve(a)
        say_missing_sockets(ipi_addresses)
    if args.curve is not None:
        from mlipd.curve import CurveKeys

        CurveKeys(Path(args.curve), allow_readable_secret=args.allow_readable_key
                  ).server_pair()  # a bad or readable key: refused before the model loads

    engine = engine_from_args(args)  # Ctrl-C while it loads: KeyboardInterrupt, exit 130
    try:
        if options is not None:
            options.template.check_species(engine.spec)  # before any connection
        server = Server(engine, zmq=args.zmq, ipi=ipi_addresses if args.ipi else (),
                        max_batch_atoms=args.max_batch_atoms,
                        max_wait_s=args.max_wait_ms / 1e3, max_pending=args.max_queue,
                        max_request_atoms=args.max_request_atoms, ipi_options=options,
                        request_timeout_s=args.request_timeout,
                        shutdown_timeout_s=args.shutdown_timeout,
                        allow_remote=args.allow_remote, curve=args.curve,
                        allow_readable_key=args.allow_readable_key,
                        max_queue_bytes=args.max_queue_bytes)
    except BaseException:
        engine.close()
        raise
    interrupts = Interrupts()
    with interrupts:
        clean = False
        try:
            addresses = server.start()
            sys.stdout.write(" ".join(["READY", *addresses]) + "\n")
            sys.stdout.flush()
            log.info("serving model %s on %s", engine.spec.name,
                     " ".join(addresses + args.ipi))
            # short waits keep the signal handler prompt; stats are logged when due
            period = args.stats_every if args.stats_every > 0 else float("inf")
            next_stats = time.monotonic() + period
            while not interrupts.event.wait(0.25):
                if time.monotonic() >= next_stats:
                    log.info("stats: %s", server.metrics.summary())
                    next_stats += period
            log.warning("interrupted by %s: stopping: no new requests; answering the queued ones",
                        interrupts.name)
        finally:
            clean = server.close()
    return 0 if clean else 1


# ---------------------------------------------------------------- mlipd stats, mlipd keygen


def add_stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("endpoint", help="the server's ZeroMQ address, as printed in its READY line")
    p.add_argument("--curve", metavar="DIR", help="client keys for a server run with --curve")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="give up when the server does not answer within S s (default 10)")


def add_keygen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR",
                   help="where to write server.key(_secret), client.key(_secret) and "
                        "clients/client.key (pyzmq's certificate format)")


def run_tool(args: argparse.Namespace) -> int:
    """``mlipd stats ENDPOINT`` (the counters as JSON on stdout) or ``mlipd keygen DIR``."""
    if args.command == "keygen":
        from mlipd.curve import keygen

        for path in keygen(args.directory):
            sys.stdout.write(f"{path}\n")
        return 0
    from mlipd.client import Client

    with Client(args.endpoint, curve=args.curve,
                connect_timeout_s=args.connect_timeout) as client:
        stats = client.stats()
    sys.stdout.write(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return 0
