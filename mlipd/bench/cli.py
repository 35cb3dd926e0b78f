"""``mlipd bench SUITE [SUITE ...]``: run benchmark suites, print and write their tables."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from mlipd.bench.suites import SUITES

log = logging.getLogger(__name__)
DEFAULT_OUT = Path("benchmarks/results")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suites", nargs="+", metavar="SUITE", choices=[*SUITES, "all"],
                   help=f"one or more of: {', '.join(SUITES)}, or all")
    p.add_argument("--size", choices=["tiny", "quick", "full"], default="full",
                   help="tiny: seconds (the tests); quick: minutes on a 2-core CPU; "
                        "full: the published tables")
    p.add_argument("--quick", dest="size", action="store_const", const="quick",
                   help="the same as --size quick")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"where tables go (default {DEFAULT_OUT})")


def run(args: argparse.Namespace) -> int:
    from mlipd.bench.report import Report
    from mlipd.engine.devices import resolve_device

    device = str(resolve_device(args.device))
    names = list(SUITES) if "all" in args.suites else args.suites
    command = " ".join(["mlipd", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else (
        f"mlipd bench {' '.join(names)} --size {args.size} --device {args.device}")
    for name in names:
        suite = importlib.import_module(f"mlipd.bench.suites.{name}")
        report = Report(name, device, args.size, command=command)
        suite.run(report, size=args.size, device=device)
        sys.stdout.write(report.markdown() + "\n")
        for path in report.write(args.out):
            log.info("wrote %s", path)
    return 0
