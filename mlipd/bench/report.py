"""A suite's table, with what a reader needs to trust it: machine, versions, commit,
load and the command that wrote it."""

from __future__ import annotations

import datetime
import logging
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from mlipd.bench.timing import Deadline

log = logging.getLogger(__name__)

PACKAGES = ("mlipd", "torch", "numpy", "ase", "vesin", "chgnet", "mace-torch", "matgl",
            "fairchem-core", "sevenn", "ipi", "pyzmq")


@dataclass
class Table:
    """One table: a title, column names, rows of cells (strings or numbers), notes."""

    title: str
    columns: list[str]
    rows: list[list[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append(list(cells))

    def markdown(self) -> str:
        def fmt(c: object) -> str:
            return f"{c:.4g}" if isinstance(c, float) else str(c)

        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


@dataclass
class Curve:
    """y against x for one contender, for the suite's PNG."""

    label: str
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)

    def add(self, x: float, y: float) -> None:
        self.x.append(x)
        self.y.append(y)


@dataclass
class Plot:
    title: str
    xlabel: str
    ylabel: str
    curves: list[Curve] = field(default_factory=list)
    log: bool = True

    def curve(self, label: str) -> Curve:
        c = Curve(label)
        self.curves.append(c)
        return c


def device_name(device: str) -> str:
    """``cpu`` or the GPU's name, for file names and headers (``nvidia-h200``)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return "cpu"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    gpu = (f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
    return f"{os.cpu_count()} cores ({cpu}){mem}{gpu}; torch threads {torch.get_num_threads()}"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in PACKAGES:
        try:
            out.append(f"{p} {version(p)}")
        except PackageNotFoundError:
            continue
    return ", ".join(out) + f"; Python {platform.python_version()}"


def commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "mlipd"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.strip() + (" (with uncommitted changes in mlipd/)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load unknown"


class Report:
    """What one suite run writes: its tables, plots, and the run's circumstances."""

    def __init__(self, suite: str, device: str, size: str, *, command: str,
                 deadline: Deadline | None = None, memory_limit: float | None = None,
                 threads: int | None = None) -> None:
        self.suite, self.device, self.size, self.command = suite, device, size, command
        self.deadline = deadline or Deadline(None)
        self.memory_limit_gib = memory_limit  # --memory-limit, GiB per contender (CPU)
        self.threads = threads  # torch threads of every process of the suite (None: default)
        self.tables: list[Table] = []
        self.plots: list[Plot] = []
        self.notes: list[str] = []
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_before = load()

    def note(self, text: str) -> None:
        """A line under the header: what a reader needs beyond the tables' own notes."""
        self.notes.append(text)

    def table(self, title: str, columns: list[str]) -> Table:
        t = Table(title, columns)
        self.tables.append(t)
        return t

    def plot(self, title: str, xlabel: str, ylabel: str, *, log_scale: bool = True) -> Plot:
        p = Plot(title, xlabel, ylabel, log=log_scale)
        self.plots.append(p)
        return p

    def markdown(self) -> str:
        head = [f"# `mlipd bench {self.suite}` on {device_name(self.device)} ({self.size})", "",
                f"- command: `{self.command}`",
                f"- commit: {commit()}",
                f"- date: {self.started:%Y-%m-%d %H:%M} UTC",
                f"- machine: {machine()}",
                f"- versions: {versions()}",
                f"- {self.load_before} at the start, {load()} at the end",
                *(f"- {n}" for n in self.notes), ""]
        return "\n".join(head) + "\n".join(t.markdown() for t in self.tables)

    def write(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{self.suite}-{device_name(self.device)}"
        md = out / f"{stem}.md"
        text = self.markdown()
        written = [md]
        for k, p in enumerate(self.plots):
            png = out / (f"{stem}.png" if k == 0 else f"{stem}-{k + 1}.png")
            if _draw(p, png):
                written.append(png)
                text += f"\n![{p.title}]({png.name})\n"
        md.write_text(text)
        return written


def _draw(p: Plot, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: %s not drawn", path.name)
        return False
    curves = [c for c in p.curves if c.x]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in curves:
        ax.plot(c.x, c.y, marker="o", label=c.label)
    if p.log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(p.xlabel)
    ax.set_ylabel(p.ylabel)
    ax.set_title(p.title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
