"""``mlipd drive``: mlipd as the force client of i-PI or ASE's SocketIOCalculator.

Exit status: 0 when every connection ended with EXIT or a clean close by the
server, 1 when any connection failed (bad data, unreachable address), 2 for
setup errors (bad options, unknown model).
"""

from __future__ import annotations

import argparse
import logging
import time

from mlipd.driver.progress import DEFAULT_EVERY_S
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", action="append", required=True, metavar="ADDR",
                   type=address_form,
                   help="unix:NAME (socket /tmp/ipi_NAME, as i-PI and ASE name it), "
                        "unix:/path/to/socket, or HOST:PORT; repeat for several "
                        "connections sharing one engine")
    tmpl = p.add_mutually_exclusive_group(required=True)
    tmpl.add_argument("--structure", metavar="FILE",
                      help="template structure (any ase.io format): atomic numbers and "
                           "pbc, in the order i-PI sends the atoms")
    tmpl.add_argument("--species", metavar="SYMBOL",
                      help="every atom is this element (periodic in 3D), any atom count")
    p.add_argument("--pbc", choices=["auto", "yes", "no"], default="auto",
                   help="periodicity: auto takes it from --structure (i-PI's xyz counts as "
                        "periodic) and is 'yes' with --species")
    p.add_argument("--mode", choices=["socket", "shm"], default="socket",
                   help="shm: i-PI's shared-memory mode (needs unix: addresses)")
    p.add_argument("--connect-timeout", type=float, default=60.0, metavar="S",
                   help="keep retrying to connect for this long (default 60)")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                   help="give up on a server silent for this long (default 3600)")
    p.add_argument("--max-atoms", type=int, default=DEFAULT_MAX_ATOMS,
                   help=f"refuse messages with more atoms (default {DEFAULT_MAX_ATOMS})")
    p.add_argument("--sockets-prefix", default="/tmp/ipi_",
                   help="prefix of unix:NAME socket files (i-PI's sockets_prefix)")
    p.add_argument("--progress-every", type=float, default=DEFAULT_EVERY_S, metavar="S",
                   help="log force requests served, structures per second and mean engine "
                        f"time every S seconds (default {DEFAULT_EVERY_S:g}; 0: never)")


def run(args: argparse.Namespace) -> int:
    from mlipd.cli import engine_from_args
    from mlipd.driver.progress import Progress, describe
    from mlipd.driver.session import drive_all, socket_transports
    from mlipd.driver.socket_io import parse_address, resolve
    from mlipd.driver.template import Template
    from mlipd.errors import SetupError
    from mlipd.malloc import keep_freed_memory

    keep_freed_memory()  # per-step buffers reuse their pages (see mlipd.malloc)
    # everything that can be checked without the model, before the model loads
    addresses = [parse_address(a, sockets_prefix=args.sockets_prefix) for a in args.address]
    for a in addresses:
        resolve(a)
    pbc = {"auto": None, "yes": True, "no": False}[args.pbc]
    template = (Template.from_file(args.structure, pbc=pbc) if args.structure
                else Template.from_species(args.species, pbc=pbc is not False))
    if args.max_atoms < 1:
        raise SetupError(f"--max-atoms must be >= 1, got {args.max_atoms}")
    if args.progress_every < 0:
        raise SetupError(f"--progress-every must be >= 0, got {args.progress_every}")
    if args.mode == "shm":
        from mlipd.driver.shm import shm_transports

        if not all(a.is_unix for a in addresses):
            raise SetupError("--mode shm needs unix: addresses (i-PI's shm mode is same-node)")
        make_transport = shm_transports(template, max_atoms=args.max_atoms)
    else:
        make_transport = socket_transports(template, max_atoms=args.max_atoms)
    engine = engine_from_args(args)
    progress = Progress(every_s=args.progress_every)
    t0 = time.monotonic()
    try:
        template.check_species(engine.spec)  # before any connection
        log.info("connecting to %s (retrying for up to %g s)",
                 ", ".join(a.describe() for a in addresses), args.connect_timeout)
        compute = progress.counted(lambda s: engine.compute(s, virial=True))
        with progress:
            outcomes = drive_all(addresses, compute, make_transport=make_transport,
                                 connect_timeout=args.connect_timeout, timeout=args.timeout)
    finally:
        engine.close()
    failed = [o for o in outcomes if o.error is not None]
    for o in outcomes:
        if o.report is not None:
            log.info("%s: %s%s", o.address, o.report.describe(),
                     ", EXIT" if o.report.exit else "")
    log.info("in all, %.0f s: %s", time.monotonic() - t0,
             describe(progress.snapshot(), time.monotonic() - t0))
    if failed:
        log.error("%d of %d connections failed: %s", len(failed), len(outcomes),
                  "; ".join(f"{o.address}: {o.error}" for o in failed))
        return 1
    return 0
