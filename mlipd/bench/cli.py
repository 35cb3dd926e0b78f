"""``mlipd bench SUITE [SUITE ...]``: run benchmark suites, print and write their tables.

While a suite runs, its progress is logged (``mlipd.bench.progress``): each size and
contender as it starts, and every ``TICK_S`` seconds what it is still doing.

Every suite runs under a deadline: its own budget for the size (``BUDGET_S`` in its
module), shortened when ``--deadline`` bounds the whole run (each suite still to run
then gets its budget's share of the time left). A suite that fails writes its table
with the error and the next one runs; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from mlipd.bench.suites import SUITES

log = logging.getLogger(__name__)
DEFAULT_OUT = Path("benchmarks/results")
DEFAULT_BUDGET_S = {"tiny": 120.0, "quick": 60.0, "full": 3600.0}


def suite_descriptions() -> dict[str, str]:
    """Each suite's ``DESCRIPTION``, read from its source (``--help`` imports no suite:
    they import torch and model packages)."""
    import ast
    from importlib.util import find_spec

    out = {}
    for name in SUITES:
        spec = find_spec(f"mlipd.bench.suites.{name}")
        text = "(no description)"
        if spec is not None and spec.origin:
            tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
            for node in tree.body:
                if isinstance(node, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == "DESCRIPTION"
                        for t in node.targets):
                    text = ast.literal_eval(node.value)
        out[name] = text
    return out


def describe(p: argparse.ArgumentParser) -> None:
    """What ``mlipd bench --help`` says above and below the options."""
    import textwrap

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = textwrap.fill(
        "Measure mlipd against the model packages and other drivers, contenders side by "
        "side in one run: each suite prints its tables and writes them with the machine, "
        "versions, commit and command to OUT/SUITE-DEVICE.md (and a PNG where a curve "
        "says more). Progress is logged while a suite runs.", 79)
    width = max(len(n) for n in SUITES)
    lines = [f"  {n:<{width}}  {d}" for n, d in suite_descriptions().items()]
    p.epilog = ("suites (what each measures):\n" + "\n".join(lines) + "\n\nexamples:\n"
                "  mlipd bench latency --quick          minutes on a laptop CPU\n"
                "  mlipd bench all --size full --device cuda --out results/\n"
                "  mlipd bench ipi beads --size tiny     seconds: is everything installed?")


def add_arguments(p: argparse.ArgumentParser) -> None:
    describe(p)
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
    p.add_argument("--deadline", type=float, default=None, metavar="S",
                   help="finish the whole run within about S seconds: no new size, round "
                        "or case starts after its suite's share (one call in flight may "
                        "overrun by its own time limit)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads of this process and of every contender process "
                        "(default: 1 at tiny and quick, for a shared machine; all cores at "
                        "full)")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                   help="resident memory per contender process on CPU (capacity); "
                        "default: the size's limit, at most 40%% of available memory")


def run(args: argparse.Namespace) -> int:
    import torch

    from mlipd.bench.timing import Deadline
    from mlipd.engine.devices import resolve_device

    device = str(resolve_device(args.device))
    names = available(SUITES) if "all" in args.suites else list(dict.fromkeys(args.suites))
    command = " ".join(["mlipd", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else (
        f"mlipd bench {' '.join(names)} --size {args.size} --device {args.device}")
    overall = Deadline(args.deadline)
    threads = args.threads or (1 if args.size in ("tiny", "quick") else os.cpu_count() or 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_suites(args, names, device, command, overall, threads)
    finally:
        torch.set_num_threads(before)


def available(names) -> list[str]:
    """The suites whose packages (``REQUIRES``) this environment has: SevenNet and eSEN
    live in the e3nn>=0.5 environment, MACE in the other (README, "two environments")."""
    from importlib.util import find_spec

    out = []
    for name in names:
        needs = getattr(importlib.import_module(f"mlipd.bench.suites.{name}"), "REQUIRES", ())
        missing = [p for p in needs if find_spec(p) is None]
        if missing:
            log.warning("skipping suite %s: %s not installed in this environment", name,
                        ", ".join(missing))
        else:
            out.append(name)
    return out


def _budget(suite, size: str, device: str) -> float:
    """A suite's seconds at ``size``: ``GPU_BUDGET_S`` on CUDA where it has one."""
    own = getattr(suite, "BUDGET_S", DEFAULT_BUDGET_S)[size]
    if device.startswith("cuda"):
        return getattr(suite, "GPU_BUDGET_S", {}).get(size, own)
    return own


def _run_suites(args, names, device, command, overall, threads) -> int:
    from mlipd.bench.progress import Progress
    from mlipd.bench.report import Report
    from mlipd.bench.timing import Deadline

    suites = {name: importlib.import_module(f"mlipd.bench.suites.{name}") for name in names}
    budgets = {name: _budget(m, args.size, device) for name, m in suites.items()}
    failures = []
    for i, (name, suite) in enumerate(suites.items()):
        remaining = sum(budgets[n] for n in names[i:])
        share = min(budgets[name], overall.left() * budgets[name] / remaining)
        report = Report(name, device, args.size, command=command, deadline=Deadline(share),
                        memory_limit=args.memory_limit, threads=threads)
        t0 = time.monotonic()
        try:
            with Progress(name, args.size):
                suite.run(report, size=args.size, device=device)
        except Exception as e:  # noqa: BLE001 - one suite's failure must not lose the others
            failures.append(name)
            log.error("suite %s failed: %s", name, e)
            report.note(f"**the suite failed**: {type(e).__name__}: {e}")
            report.note("```\n" + traceback.format_exc()[-3000:] + "```")
        report.note(f"suite time {time.monotonic() - t0:.0f} s (budget {share:.0f} s)")
        sys.stdout.write(report.markdown() + "\n")
        sys.stdout.flush()
        for path in report.write(args.out):
            log.info("wrote %s", path)
    if failures:
        log.error("failed suites: %s", ", ".join(failures))
        return 1
    return 0
