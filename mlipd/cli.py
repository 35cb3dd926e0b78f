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


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="chgnet",
                   help="model name, or NAME:ARG (e.g. mace:model.pt); see `mlipd models`")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="default: float32 on GPU, float64 on CPU")
    p.add_argument("--ranks", type=int, default=1,
                   help="number of local ranks the structure is partitioned across")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlipd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    from mlipd.driver.cli import add_arguments as add_drive

    drive = sub.add_parser(
        "drive", help="connect to i-PI or ASE socket servers as their force client"
    )
    add_engine_options(drive)
    add_drive(drive)

    from mlipd.server.cli import add_arguments as add_serve

    serve = sub.add_parser("serve", help="long-running server: ZeroMQ and i-PI front ends")
    add_engine_options(serve)
    add_serve(serve)

    sub.add_parser("models", help="list the registered models")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        if args.command == "models":
            from mlipd.models.registry import names

            sys.stdout.write("\n".join(names()) + "\n")
            return 0
        if args.command == "drive":
            from mlipd.driver.cli import run
        else:
            from mlipd.server.cli import run
        return run(args)
    except SetupError as e:
        log.error("%s", e)
        return 2
    except MlipdError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
