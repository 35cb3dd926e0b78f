"""The engine's command-line options, shared by every command that runs an engine
(``mlipd drive``, ``mlipd serve``, the benchmarks): model, devices, dtype, ranks,
threads, the geometry guards' budgets and the ranks' heartbeat.

Below every command line (``cli.py``, ``server/drive.py``, ``server/cli.py`` import it,
it imports none of them), and the only argparse code about the engine: ``mlipd.engine``
itself takes plain keyword arguments.
"""

from __future__ import annotations

import argparse
import logging
import time

from mlipd.errors import SetupError

log = logging.getLogger("mlipd")

# the defaults of the guards and the heartbeat, repeated here (and checked equal to the
# engine's in tests/test_engine_options.py) so that building the parser loads no torch
DEFAULT_MAX_PAIRS = 2e8
DEFAULT_MIN_DISTANCE = 0.1
DEFAULT_HEARTBEAT_S = 10.0


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device(s)``, ``--backend``, ``--dtype``, ``--ranks``,
    ``--threads``, ``--collective-timeout``, ``--skin`` and the robustness options."""
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
    p.add_argument("--skin", type=float, default=None, metavar="Å",
                   help="Verlet skin of the reused neighbour list (default 0.5 Å); 0 builds "
                        "a fresh list at every call")
    p.add_argument("--cuda-graphs", choices=["auto", "0", "1"], default="auto",
                   help="replay the warm one-rank step as a captured CUDA graph (auto: on "
                        "CUDA, for models with fixed shapes between rebuilds)")
    p.add_argument("--compile", choices=["0", "1"], default="0",
                   help="1: run the one-rank step (model, forces, virial) as one "
                        "torch.compile'd function: seconds of compiling at the first call, "
                        "then less per-step overhead for small systems with light, "
                        "plain-torch models (LJ; CHGNet and MACE run slower); one rank; a "
                        "model it cannot compile runs eagerly, with a warning")
    add_robustness_options(p)


def add_robustness_options(p: argparse.ArgumentParser) -> None:
    """The geometry guards' budgets (``mlipd.engine.guards``) and the ranks' heartbeat
    (``mlipd.engine.distributed``)."""
    p.add_argument("--max-pairs", type=float, default=DEFAULT_MAX_PAIRS, metavar="N",
                   help="refuse a structure whose bound on atom pairs within cutoff + skin "
                        f"exceeds N (default {DEFAULT_MAX_PAIRS:.0e}; the bound is ~4-8x "
                        "the true count in bulk)")
    p.add_argument("--min-distance", type=float, default=DEFAULT_MIN_DISTANCE, metavar="Å",
                   help="refuse atoms closer than this (default "
                        f"{DEFAULT_MIN_DISTANCE} Å; 0 turns the check off)")
    p.add_argument("--max-request-memory", type=byte_size, default=None, metavar="BYTES",
                   help="refuse (too_large) a request whose estimated memory (atoms, edges "
                        "and angles times the model's bytes per item) exceeds BYTES per "
                        "device, e.g. 8G (default: half the device's free memory at "
                        "start-up; 0 turns it off)")
    p.add_argument("--rank-heartbeat", type=float, default=DEFAULT_HEARTBEAT_S, metavar="S",
                   help="with several ranks: restart them when one is silent for S s "
                        "(stopped, hung)")


def limits_from(args: argparse.Namespace):
    """The guards' ``Limits`` from ``--max-pairs``, ``--min-distance`` and
    ``--max-request-memory``."""
    from mlipd.engine.guards import Limits

    try:
        return Limits(max_pairs=args.max_pairs, min_distance=args.min_distance,
                      max_request_memory=args.max_request_memory)
    except ValueError as e:
        raise SetupError(f"--max-pairs / --min-distance / --max-request-memory: {e}") from None


def engine_from_args(args: argparse.Namespace):
    """The engine the engine options ask for; logs one line with what is in use
    (model, cutoff, device, dtype, ranks, threads, memory)."""
    from mlipd.engine import make_engine
    from mlipd.engine.api import describe

    if getattr(args, "skin", None) is not None and not args.skin >= 0:
        raise SetupError(f"--skin must be >= 0 Å, got {args.skin}")
    t0 = time.perf_counter()
    engine = make_engine(args.model, device=args.device, devices=args.devices,
                         backend=args.backend, dtype=args.dtype, ranks=args.ranks,
                         skin=getattr(args, "skin", None),
                         world=getattr(args, "world", None),
                         timeout_s=args.collective_timeout, threads=args.threads,
                         limits=limits_from(args), rank_heartbeat_s=args.rank_heartbeat,
                         cuda_graphs=args.cuda_graphs, compile=args.compile)
    log.info("engine ready in %.1f s: %s", time.perf_counter() - t0, describe(engine))
    return engine


def byte_size(text: str) -> float:
    """``"8G"``, ``"512M"``, ``"1.5e9"`` -> bytes (K, M, G, T: powers of 1024)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(t[-1:], 1)
    try:
        return float(t[:-1] if t[-1:] in units else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 8G, 512M)"
                                         ) from None
