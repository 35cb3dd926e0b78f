"""Command line: ``mlipd drive``, ``mlipd serve``, ``mlipd models``.

Only ``main`` parses arguments and turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from mlipd.errors import MlipdError, SetupError

log = logging.getLogger("mlipd")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="chgnet",
                   help="model name, or NAME:ARG (e.g. mace:model.pt); see `mlipd models`")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--devices", type=lambda s: [d for d in s.split(",") if d],
                   metavar="DEV,DEV,...",
                   help="the devices of the ranks, rank r on the r-th (in turn when fewer), "
                        "e.g. cuda:0,cuda:1")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="how ranks talk: nccl needs one GPU per rank; gloo lets ranks share "
                        "a GPU (rows staged through host memory); auto picks")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="the model's features (geometry, sums, forces and virials are "
                        "float64 either way); float64 for reference runs")
    p.add_argument("--ranks", type=int, default=1,
                   help="number of local ranks the structure is partitioned across")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op (torch) threads of each rank (default: one rank keeps "
                        "torch's default; several share the host's cores, cores / ranks)")
    p.add_argument("--collective-timeout", type=float, default=120.0, metavar="S",
                   help="give up on a collective (a rank that stopped answering) after S s")
    p.add_argument("--cuda-graphs", choices=["auto", "0", "1"], default="auto",
                   help="replay the warm one-rank step as a captured CUDA graph (auto: on "
                        "CUDA, for models with fixed shapes between rebuilds)")
    from mlipd.engine.robustness import add_options as add_robustness_options

    add_robustness_options(p)


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

    from mlipd.driver.cli import add_arguments as add_drive

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
            from mlipd.driver.cli import run as run_command
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


def engine_from_args(args: argparse.Namespace):
    """The engine the engine options ask for (``add_engine_options``); logs one line
    with what is in use (model, cutoff, device, dtype, ranks, threads, memory)."""
    from mlipd.engine import make_engine
    from mlipd.engine.api import describe
    from mlipd.engine.robustness import limits_from

    t0 = time.perf_counter()
    engine = make_engine(args.model, device=args.device, devices=args.devices,
                         backend=args.backend, dtype=args.dtype, ranks=args.ranks,
                         world=getattr(args, "world", None),
                         timeout_s=args.collective_timeout, threads=args.threads,
                         limits=limits_from(args), rank_heartbeat_s=args.rank_heartbeat,
                         cuda_graphs=getattr(args, "cuda_graphs", "auto"))
    log.info("engine ready in %.1f s: %s", time.perf_counter() - t0, describe(engine))
    return engine


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and run, in this process alone (``mlipd.launch.main`` is the ``mlipd``
    command, which also joins torchrun/srun jobs)."""
    return run(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
