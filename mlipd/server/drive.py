"""``mlipd drive``: mlipd as the force client of i-PI or ASE's SocketIOCalculator.

A ``Server`` with i-PI links only (``mlipd.server.ipi_link``) that do not reconnect:
each ends at EXIT or when the server closes. Beads that i-PI sends over several
connections in one step are computed in one engine call (the scheduler's gate); a
single connection calls the engine on its own thread.

Exit status: 0 when every connection ended with EXIT or a clean close by the server,
1 when any connection failed (bad data, unreachable address), 2 for setup errors
(bad options, unknown model), 130 after SIGINT and 143 after SIGTERM (the summary is
logged first, as at a normal end).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from mlipd.driver.progress import DEFAULT_EVERY_S
from mlipd.driver.socket_io import DEFAULT_FRAME_TIMEOUT_S
from mlipd.protocols.ipi import DEFAULT_MAX_ATOMS

log = logging.getLogger(__name__)


def address_form(text: str) -> str:
    """argparse type of ``--address``: the form is checked at parse time (exit 2 with the
    expected forms); the socket file is resolved later, with ``--sockets-prefix``."""
    from mlipd.driver.socket_io import parse_address
    from mlipd.errors import SetupError

    try:
        parse_address(text)
    except SetupError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_template_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--structure`` / ``--species`` / ``--pbc``: what i-PI never sends."""
    tmpl = p.add_mutually_exclusive_group(required=required)
    tmpl.add_argument("--structure", metavar="FILE",
                      help="template structure (any ase.io format): atomic numbers and "
                           "pbc, in the order i-PI sends the atoms")
    tmpl.add_argument("--species", metavar="SYMBOL",
                      help="every atom is this element (periodic in 3D), any atom count")
    p.add_argument("--pbc", choices=["auto", "yes", "no"], default="auto",
                   help="periodicity: auto takes it from --structure (i-PI's xyz counts as "
                        "periodic) and is 'yes' with --species")


MAX_BUSY_POLL_US = 1e6  # a second of spinning per message is already far beyond a step


def add_link_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the i-PI links, shared by ``drive`` and ``serve --ipi``."""
    p.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                   help="give up on a server silent for this long between messages "
                        "(default 3600)")
    p.add_argument("--frame-timeout", type=float, default=DEFAULT_FRAME_TIMEOUT_S,
                   metavar="S",
                   help="a message begun must be complete within S s (default "
                        f"{DEFAULT_FRAME_TIMEOUT_S:g})")
    p.add_argument("--max-atoms", type=int, default=DEFAULT_MAX_ATOMS,
                   help=f"refuse messages with more atoms (default {DEFAULT_MAX_ATOMS})")
    p.add_argument("--sockets-prefix", default="/tmp/ipi_",
                   help="prefix of unix:NAME and shm:NAME socket files (i-PI's "
                        "sockets_prefix)")
    p.add_argument("--busy-poll-us", type=float, default=0.0, metavar="US",
                   help="after each answer, poll for the next message without sleeping for "
                        "up to US microseconds before blocking (default 0). For short MD "
                        "steps (small systems): a sleeping client wakes up late and with "
                        "cold caches; polling costs one busy CPU core while the MD code "
                        f"integrates (at most {MAX_BUSY_POLL_US:g})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", action="append", required=True, metavar="ADDR",
                   type=address_form,
                   help="unix:NAME (socket /tmp/ipi_NAME, as i-PI and ASE name it), "
                        "unix:/path/to/socket, shm:NAME (i-PI's shm mode) or HOST:PORT; "
                        "repeat for several connections sharing one engine")
    add_template_arguments(p, required=True)
    p.add_argument("--mode", choices=["socket", "shm"], default="socket",
                   help="shm: i-PI's shared-memory mode for every address (needs unix: "
                        "addresses; shm:NAME picks it per address)")
    p.add_argument("--connect-timeout", type=float, default=60.0, metavar="S",
                   help="keep retrying to connect for this long (default 60)")
    add_link_arguments(p)
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="with several addresses: how long a force request waits for the "
                        "other connections' beads (default 2)")
    p.add_argument("--progress-every", type=float, default=DEFAULT_EVERY_S, metavar="S",
                   help="log force requests served, structures per second and mean engine "
                        f"time every S seconds (default {DEFAULT_EVERY_S:g}; 0: never)")


def template_from_args(args: argparse.Namespace):
    """The ``Template`` of ``--structure`` / ``--species`` / ``--pbc`` (file read now)."""
    from mlipd.driver.template import Template

    pbc = {"auto": None, "yes": True, "no": False}[getattr(args, "pbc", "auto")]
    return (Template.from_file(args.structure, pbc=pbc) if args.structure
            else Template.from_species(args.species, pbc=pbc is not False))


def check_link_args(args: argparse.Namespace) -> None:
    from mlipd.errors import SetupError

    if args.max_atoms < 1:
        raise SetupError(f"--max-atoms must be >= 1, got {args.max_atoms}")
    if args.timeout <= 0 or args.frame_timeout <= 0:
        raise SetupError("--timeout and --frame-timeout must be > 0")
    if not 0 <= args.busy_poll_us <= MAX_BUSY_POLL_US:
        raise SetupError(f"--busy-poll-us must be within 0..{MAX_BUSY_POLL_US:g}, got "
                         f"{args.busy_poll_us:g}")


def link_options_from_args(args: argparse.Namespace, template, *, reconnect: bool,
                           connect_timeout_s: float = float("inf")):
    """The ``LinkOptions`` of the link options (``add_link_arguments``), checked."""
    from mlipd.server.ipi_link import LinkOptions

    check_link_args(args)
    return LinkOptions(template=template, reconnect=reconnect,
                       connect_timeout_s=connect_timeout_s, idle_timeout_s=args.timeout,
                       frame_timeout_s=args.frame_timeout, max_atoms=args.max_atoms,
                       busy_poll_s=args.busy_poll_us * 1e-6)


def say_missing_sockets(addresses) -> None:
    """At once, before the model loads: which socket files are not there yet."""
    for a in addresses:
        if a.is_unix and not os.path.exists(a.path):
            log.info("%s: the socket file %s is not there yet; waiting for it once the "
                     "model is loaded", a.text, a.path)


def run(args: argparse.Namespace) -> int:
    from mlipd.driver.progress import Counts, Progress, describe
    from mlipd.driver.socket_io import parse_address, resolve, with_shm
    from mlipd.engine_options import engine_from_args
    from mlipd.errors import SetupError
    from mlipd.malloc import keep_freed_memory
    from mlipd.server.app import Server
    from mlipd.server.signals import Interrupts

    keep_freed_memory()  # per-step buffers reuse their pages (see mlipd.malloc)
    # everything that can be checked without the model, before the model loads
    addresses = [parse_address(a, sockets_prefix=args.sockets_prefix) for a in args.address]
    if args.mode == "shm":
        addresses = [with_shm(a) for a in addresses]
    for a in addresses:
        resolve(a)
    template = template_from_args(args)
    options = link_options_from_args(args, template, reconnect=False,
                                     connect_timeout_s=args.connect_timeout)
    if args.progress_every < 0:
        raise SetupError(f"--progress-every must be >= 0, got {args.progress_every}")
    if args.max_wait_ms < 0:
        raise SetupError(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    say_missing_sockets(addresses)
    engine = engine_from_args(args)  # Ctrl-C while it loads: KeyboardInterrupt, exit 130
    t0 = time.monotonic()
    try:
        template.check_species(engine.spec)  # before any connection
        server = Server(engine, ipi=addresses, ipi_options=options,
                        max_wait_s=args.max_wait_ms / 1e3, shutdown_timeout_s=10.0)
    except BaseException:
        engine.close()
        raise
    log.info("connecting to %s (retrying for up to %g s)",
             ", ".join(a.describe() for a in addresses), args.connect_timeout)
    interrupts = Interrupts()
    with interrupts:
        try:
            server.start()
            with Progress(lambda: Counts.from_stats(server.metrics.snapshot()),
                          every_s=args.progress_every):
                server.wait_links(interrupts.event)
        finally:
            if interrupts.signal is not None:
                log.warning("interrupted by %s: closing the connections", interrupts.name)
            server.close()
    outcomes = [link.outcome for link in server.links]
    for o in outcomes:
        for r in o.reports:
            log.info("%s: %s%s", o.address, r.describe(), ", EXIT" if r.exit else "")
    elapsed = time.monotonic() - t0
    log.info("in all, %.0f s: %s", elapsed,
             describe(Counts.from_stats(server.metrics.snapshot()), elapsed))
    if interrupts.signal is not None:
        return 128 + interrupts.signal
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        log.error("%d of %d connections failed: %s", len(failed), len(outcomes),
                  "; ".join(f"{o.address}: {o.error}" for o in failed))
        return 1
    return 0
