"""Command-line options of the engine's robustness: the geometry guards' budgets
(``mlipd.engine.guards``) and the ranks' heartbeat (``mlipd.engine.distributed``),
shared by ``mlipd serve`` and ``mlipd drive``."""

from __future__ import annotations

import argparse

from mlipd.engine.distributed import DEFAULT_HEARTBEAT_S
from mlipd.engine.guards import DEFAULT_MAX_PAIRS, DEFAULT_MIN_DISTANCE, Limits
from mlipd.errors import SetupError


def add_options(p: argparse.ArgumentParser) -> None:
    """The engine options of the guards (``mlipd serve`` and ``mlipd drive``)."""
    p.add_argument("--max-pairs", type=float, default=DEFAULT_MAX_PAIRS, metavar="N",
                   help="refuse a structure whose bound on atom pairs within cutoff + skin "
                        f"exceeds N (default {DEFAULT_MAX_PAIRS:.0e}; the bound is ~4-8x "
                        "the true count in bulk)")
    p.add_argument("--min-distance", type=float, default=DEFAULT_MIN_DISTANCE, metavar="Å",
                   help="refuse atoms closer than this (default "
                        f"{DEFAULT_MIN_DISTANCE} Å; 0 turns the check off)")
    p.add_argument("--rank-heartbeat", type=float, default=DEFAULT_HEARTBEAT_S, metavar="S",
                   help="with several ranks: restart them when one is silent for S s "
                        "(stopped, hung)")


def limits_from(args: argparse.Namespace) -> Limits:
    try:
        return Limits(max_pairs=args.max_pairs, min_distance=args.min_distance)
    except ValueError as e:
        raise SetupError(f"--max-pairs / --min-distance: {e}") from None
