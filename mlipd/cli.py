"""Command line: ``mlipd drive``, ``mlipd serve``, ``mlipd models``.

Only ``main`` parses arguments and turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from mlipd.errors import MlipdError, SetupError

log = logging.getLogger("mlipd")


def build_parser() -> argparse.ArgumentParser:
    from mlipd import __version__

    parser = argparse.ArgumentParser(prog="mlipd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mlipd {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v: debug); also after the command")
    # -v after the command too (``mlipd drive -v``): its own dest, added to the one before
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("-v", "--verbose", dest="verbose_after", action="count", default=0,
                       help="more log output (-v: debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    from mlipd.engine_options import add_engine_options
    from mlipd.server.drive import add_arguments as add_drive

    drive = sub.add_parser(
        "drive", parents=[after],
        help="connect to i-PI or ASE socket servers as their force client"
    )
    add_engine_options(drive)
    add_drive(drive)

    from mlipd.server.cli import add_arguments as add_serve

    serve = sub.add_parser("serve", parents=[after],
                           help="long-running server: ZeroMQ and i-PI front ends")
    add_engine_options(serve)
    add_serve(serve)

    sub.add_parser("models", parents=[after],
                   help="list every model: syntax, package, cached files")

    from mlipd.server.cli import add_keygen_arguments, add_stats_arguments

    add_stats_arguments(sub.add_parser("stats", help="print a running server's counters"))
    add_keygen_arguments(sub.add_parser("keygen", help="write CURVE keys for serve --curve"))

    from mlipd.bench.cli import add_arguments as add_bench

    add_bench(sub.add_parser("bench", parents=[after],
                             help="run benchmark suites and write their tables"))
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace, *, world=None) -> int:
    """Run a parsed command; ``world``: this process is rank 0 of a torchrun/srun job
    (``mlipd.launch``)."""
    verbose = args.verbose + getattr(args, "verbose_after", 0)
    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args.world = world
    try:
        if args.command == "models":
            from mlipd.models.catalog import listing

            sys.stdout.write(listing())
            return 0
        if args.command == "bench":
            from mlipd.bench.cli import run as run_command
        elif args.command == "drive":
            from mlipd.server.drive import run as run_command
        elif args.command in ("stats", "keygen"):
            from mlipd.server.cli import run_tool as run_command
        else:
            from mlipd.server.cli import run as run_command
        return run_command(args)
    except SetupError as e:
        log.error("%s", e)
        return 2
    except MlipdError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and run, in this process alone (``mlipd.launch.main`` is the ``mlipd``
    command, which also joins torchrun/srun jobs)."""
    return run(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
