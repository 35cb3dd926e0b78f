"""``mlipd serve``: options and the main loop (signals, readiness line, periodic stats).

The one line written to stdout is ``READY <endpoint> ...`` (the bound ZeroMQ
addresses, possibly none), once everything is bound and connected; tests and
scripts wait for it. Everything else goes through logging.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from mlipd.errors import SetupError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mlipd serve`` options (cli.py adds --model, --device, --dtype, --ranks)."""
    p.add_argument("--zmq", action="append", default=[], metavar="ADDRESS",
                   help="ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:5555, tcp://127.0.0.1:0 "
                        "(any free port) or ipc:///tmp/mlipd.sock; repeatable")
    p.add_argument("--ipi", action="append", default=[], metavar="ADDRESS",
                   help="i-PI/ASE socket server to serve forces to (unix:NAME, unix:/path, "
                        "HOST:PORT); repeatable, once per client connection; reconnects "
                        "when it restarts")
    tmpl = p.add_mutually_exclusive_group()
    tmpl.add_argument("--structure", metavar="FILE",
                      help="for --ipi: template structure (any ase.io format) giving atomic "
                           "numbers and pbc, in the order i-PI sends the atoms")
    tmpl.add_argument("--species", metavar="SYMBOL",
                      help="for --ipi: every atom is this element (periodic in 3D)")
    p.add_argument("--max-batch-atoms", type=int, default=200_000,
                   help="atoms per engine call (a larger single request runs alone)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a batch waits for the other i-PI connections' beads")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="queued requests before new ones are answered 'busy'")
    p.add_argument("--max-request-atoms", type=int, default=2_000_000,
                   help="atoms in one ZeroMQ request before it is refused 'too_large'")
    p.add_argument("--stats-every", type=float, default=0.0, metavar="SECONDS",
                   help="log the server counters every SECONDS (0: only at exit)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding a non-loopback ZeroMQ address")


def _check_loopback(addresses: list[str], allow_remote: bool) -> None:
    for a in addresses:
        if not a.startswith("tcp://") or allow_remote:
            continue
        host = a[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SetupError(f"{a}: binds beyond loopback; pass --allow-remote to mean it")


def run(args: argparse.Namespace) -> int:
    from mlipd.cli import engine_from_args
    from mlipd.malloc import keep_freed_memory
    from mlipd.server.app import Server

    keep_freed_memory()  # per-step buffers reuse their pages (see mlipd.malloc)

    if not args.zmq and not args.ipi:
        raise SetupError("nothing to serve: give --zmq ADDRESS and/or --ipi ADDRESS")
    for name in ("max_batch_atoms", "max_queue", "max_request_atoms"):
        if getattr(args, name) < 1:
            raise SetupError(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_wait_ms < 0 or args.stats_every < 0:
        raise SetupError("--max-wait-ms and --stats-every must be >= 0")
    _check_loopback(args.zmq, args.allow_remote)
    template = None
    if args.ipi:
        from mlipd.driver.template import Template

        if not (args.structure or args.species):
            raise SetupError("--ipi needs --structure FILE or --species SYMBOL "
                             "(i-PI sends no atomic numbers)")
        template = (Template.from_file(args.structure) if args.structure
                    else Template.from_species(args.species))

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    engine = engine_from_args(args)
    server = Server(engine, zmq=args.zmq, ipi=args.ipi, max_batch_atoms=args.max_batch_atoms,
                    max_wait_s=args.max_wait_ms / 1e3, max_pending=args.max_queue,
                    max_request_atoms=args.max_request_atoms, ipi_template=template)
    try:
        addresses = server.start()
        sys.stdout.write(" ".join(["READY", *addresses]) + "\n")
        sys.stdout.flush()
        log.info("serving model %s on %s", engine.spec.name, " ".join(addresses + args.ipi))
        # short waits keep the signal handler prompt; stats are logged when due
        period = args.stats_every if args.stats_every > 0 else float("inf")
        next_stats = time.monotonic() + period
        while not stop.wait(0.25):
            if time.monotonic() >= next_stats:
                log.info("stats: %s", server.metrics.summary())
                next_stats += period
    finally:
        server.close()
    return 0
