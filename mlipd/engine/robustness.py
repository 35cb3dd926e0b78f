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
    # --- memory budget per request (mlipd.engine.budget; issue 22): a self-contained block
    p.add_argument("--max-request-memory", type=_bytes, default=None, metavar="BYTES",
                   help="refuse (too_large) a request whose estimated memory (atoms, edges "
                        "and angles times the model's bytes per item) exceeds BYTES per "
                        "device, e.g. 8G (default: half the device's free memory at "
                        "start-up; 0 turns it off)")
    p.add_argument("--max-queue-bytes", type=_bytes, default=None, metavar="BYTES",
                   help="bytes of queued requests (their frames) before new ones are "
                        "answered 'busy', e.g. 512M (default 1G)")
    # --- end of the memory budget block
    p.add_argument("--rank-heartbeat", type=float, default=DEFAULT_HEARTBEAT_S, metavar="S",
                   help="with several ranks: restart them when one is silent for S s "
                        "(stopped, hung)")


def limits_from(args: argparse.Namespace) -> Limits:
    try:
        return Limits(max_pairs=args.max_pairs, min_distance=args.min_distance,
                      max_request_memory=getattr(args, "max_request_memory", None))
    except ValueError as e:
        raise SetupError(f"--max-pairs / --min-distance / --max-request-memory: {e}") from None


def _bytes(text: str) -> float:
    """``"8G"``, ``"512M"``, ``"1.5e9"`` -> bytes (K, M, G, T: powers of 1024)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(t[-1:], 1)
    try:
        return float(t[:-1] if t[-1:] in units else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 8G, 512M)"
                                         ) from None
