"""``mlipd models``: every model name, its syntax and options, whether its package is
installed and, for published names, whether the file is where the package keeps it.

Nothing here imports a model package (their imports take 10-20 s): installation comes
from package metadata, files from ``caches``, and each name's syntax from its adapter's
source, read without running it (as i-PI lists its drivers): the module of the name's
entry point declares ``SYNTAX`` (or ``<FACTORY>_SYNTAX`` where one module holds several
names, e.g. ``MACE_MP_SYNTAX`` for ``pretrained:mace_mp``), a string literal or a sum
of literals and names of ``caches``. Names registered in the ``mlipd.models``
entry-point group that mlipd does not describe are listed as plug-ins.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from importlib.util import find_spec

from mlipd.models import caches


@dataclass(frozen=True)
class Entry:
    """One ``--model`` name.

    syntax:   what ``--model`` takes; options after the first comma (from the adapter)
    package:  the distribution it needs (None: torch only)
    what:     one line for a person
    files:    the published names and their files (``caches``), for names that load
              from a package's cache or wheel
    bundled:  names that ship inside the package, for packages without a file table
    """

    name: str
    package: str | None
    what: str
    files: Callable[[], list[caches.PretrainedFile]] | None = None
    bundled: tuple[str, ...] = field(default_factory=tuple)

    @property
    def syntax(self) -> str:
        return adapter_syntax(self.name)


def _registered() -> dict:
    return {ep.name: ep for ep in entry_points(group="mlipd.models")}


@cache
def adapter_syntax(name: str) -> str:
    """The ``--model`` syntax the adapter of ``name`` declares, read from its source;
    ``NAME[:ARG]`` for a name not registered or not declaring one."""
    ep = _registered().get(name)
    if ep is None:
        return f"{name}[:ARG]"
    module, _, attr = ep.value.partition(":")
    found = _module_syntax(module, (f"{attr.strip().upper()}_SYNTAX", "SYNTAX"))
    return found or f"{name}[:ARG]"


def _module_syntax(module: str, names: tuple[str, ...]) -> str | None:
    spec = find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=spec.origin)
    consts: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "mlipd.models.caches":
            for alias in node.names:
                value = getattr(caches, alias.name, None)
                if isinstance(value, str):
                    consts[alias.asname or alias.name] = value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            value = _string(node.value, consts)
            if value is not None:
                consts[node.targets[0].id] = value
    return next((consts[n] for n in names if n in consts), None)


def _string(node: ast.expr, consts: dict[str, str]) -> str | None:
    """A string literal, a name bound to one, ``caches.NAME``, or a sum of these."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return consts.get(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
            and node.value.id == "caches":
        value = getattr(caches, node.attr, None)
        return value if isinstance(value, str) else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string(node.left, consts), _string(node.right, consts)
        return None if left is None or right is None else left + right
    return None


def _mace_mp() -> list[caches.PretrainedFile]:
    return caches.mace_files("mace-mp")


def _mace_off() -> list[caches.PretrainedFile]:
    return caches.mace_files("mace-off")


ENTRIES = (
    Entry("chgnet", "chgnet",
          "CHGNet; pretrained versions ship in the package (default 0.3.0)",
          bundled=("0.3.0", "0.2.0", "r2scan")),
    Entry("mace", "mace-torch", "a MACE / ScaleShiftMACE model file"),
    Entry("mace-mp", "mace-torch",
          f"MACE-MP foundation models from mace's cache (default "
          f"{caches.MACE_DEFAULTS['mace-mp']})", files=_mace_mp),
    Entry("mace-off", "mace-torch",
          f"MACE-OFF23 organic models from mace's cache (default "
          f"{caches.MACE_DEFAULTS['mace-off']})", files=_mace_off),
    Entry("tensornet", "matgl",
          "a matgl TensorNet model directory, or a name of matgl's hub org in its cache",
          files=caches.tensornet_files),
    Entry("esen", "fairchem-core", "a fairchem eSEN checkpoint file, or a registered name in "
          "fairchem's cache", files=caches.esen_files),
    Entry("sevennet", "sevenn",
          "SevenNet; SevenNet-0 (7net-0, default) and others ship in the package",
          files=caches.sevennet_files),
    Entry("reference", None, "a cheap reference message-passing potential (tests, benchmarks)"),
    Entry("lj", None, "Lennard-Jones in torch"),
    Entry("ase", None, "any ASE calculator, evaluated whole on one rank"),
)


def _package_cell(entry: Entry) -> str:
    if entry.package is None:
        return "torch only"
    version = caches.installed_version(entry.package)
    if version is None:
        extra = caches.EXTRA_OF.get(entry.package, entry.package)
        return f"{entry.package} NOT INSTALLED: pip install 'mlipd[{extra}]'"
    return f"{entry.package} {version}"


def _file_lines(entry: Entry) -> list[str]:
    if entry.bundled:
        return [f"    {n}: in the package" for n in entry.bundled]
    if entry.files is None:
        return []
    files = entry.files()
    width = max((len(f.name) for f in files), default=0)
    lines = []
    for f in files:
        where = "in the package" if f.url is None and f.present else (
            "present" if f.present else "missing")
        lines.append(f"    {f.name:<{width}}  {where:<8} {f.path}")
    return lines


def listing() -> str:
    """The text ``mlipd models`` prints."""
    described = {e.name for e in ENTRIES}
    registered = _registered()
    out = ["--model NAME[:ARG]: every model, its package, and the files of published names",
           ""]
    for entry in ENTRIES:
        mark = "" if entry.name in registered else "  (not registered: reinstall mlipd)"
        out.append(f"{entry.name:<10} {entry.syntax}{mark}")
        out.append(f"    {entry.what}")
        out.append(f"    package: {_package_cell(entry)}")
        installed = entry.package is None or caches.installed_version(entry.package)
        if installed:
            out += _file_lines(entry)
        out.append("")
    for name in sorted(set(registered) - described):
        ep = registered[name]
        dist = ep.dist.name if ep.dist is not None else "?"
        out += [f"{name:<10} {name}[:ARG]  (plug-in {ep.value}, from {dist})", ""]
    out.append("offline=1: never download; without it a missing file is downloaded by its "
               "package only when the download host answers within seconds")
    return "\n".join(out) + "\n"
