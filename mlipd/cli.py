"""The ``mlipd`` command line: its parser and ``main``, which turns errors into exit
codes (the text users see is ``DESCRIPTION`` and ``EXAMPLES``)."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence

from mlipd.errors import MlipdError, SetupError

log = logging.getLogger("mlipd")

DESCRIPTION = """\
mlipd computes energies, forces and stresses with machine-learned interatomic
potentials (CHGNet, MACE, TensorNet, eSEN, SevenNet), for one structure or a batch,
on one device or partitioned over several ranks. Simulation codes reach it as an
i-PI / ASE socket client (drive) or through a long-running ZeroMQ server (serve);
Python scripts use mlipd.calculator.MlipdCalculator directly."""

EXAMPLES = """\
examples:
  mlipd models                                  every model name, its package and files
  mlipd drive --address unix:si --structure init.xyz --model chgnet
                                                forces for i-PI listening on /tmp/ipi_si
  mlipd serve --model mace-mp --zmq tcp://127.0.0.1:5555
                                                a server for mlipd.client.Client
  mlipd bench latency --quick                   ms per call, mlipd vs the model package
  mlipd COMMAND --help                          the options of one command

exit status: 0 done, 1 failed while running, 2 bad options or set-up (unknown model,
missing file), 130 interrupted"""


def _para(text: str) -> str:
    """One paragraph wrapped for a help screen (raw formatters keep line breaks)."""
    return textwrap.fill(text, 79)


def build_parser() -> argparse.ArgumentParser:
    from mlipd import __version__

    parser = argparse.ArgumentParser(prog="mlipd", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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

    raw = argparse.RawDescriptionHelpFormatter
    sub.add_parser("models", parents=[after], formatter_class=raw,
                   help="list every model: syntax, package, cached files",
                   description=_para("Every --model name: what it takes (NAME[:ARG][,OPTIONS]), "
                               "the package it needs and whether it is installed, and for "
                               "published names whether each file is where its package "
                               "looks for it. Imports no model package."),
                   epilog="example:\n  mlipd models | less")

    from mlipd.server.cli import add_keygen_arguments, add_stats_arguments

    add_stats_arguments(sub.add_parser(
        "stats", formatter_class=raw, help="print a running server's counters",
        description=_para("Ask a running `mlipd serve` for its counters (requests, errors by "
                    "code, batches, queue, latencies, rank restarts) and print them."),
        epilog="example:\n  mlipd stats tcp://127.0.0.1:5555"))
    add_keygen_arguments(sub.add_parser(
        "keygen", formatter_class=raw, help="write CURVE keys for serve --curve",
        description=_para("Write a server key pair and a client key pair for ZeroMQ's CURVE "
                    "encryption and authentication (serve --curve DIR, Client(curve=DIR))."),
        epilog="example:\n  mlipd keygen keys && mlipd serve --curve keys --zmq "
               "tcp://0.0.0.0:5555"))

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
    from mlipd.quiet import quiet_third_party, show_third_party

    if verbose:  # the model packages' own warnings and log lines, here and in children
        show_third_party()
    quiet_third_party()
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
