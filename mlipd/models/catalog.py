"""``mlipd models``: every model name, its syntax and options, whether its package is
installed and, for published names, whether the file is where the package keeps it.

Nothing here imports a model package (their imports take 10-20 s): installation comes
from package metadata, files from ``caches``. Names registered in the ``mlipd.models``
entry-point group that mlipd does not describe are listed as plug-ins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from mlipd.models import caches


@dataclass(frozen=True)
class Entry:
    """One ``--model`` name.

    syntax:   what ``--model`` takes; options after the first comma
    package:  the distribution it needs (None: torch only)
    what:     one line for a person
    files:    the published names and their files (``caches``), for names that load
              from a package's cache or wheel
    bundled:  names that ship inside the package, for packages without a file table
    """

    name: str
    syntax: str
    package: str | None
    what: str
    files: Callable[[], list[caches.PretrainedFile]] | None = None
    bundled: tuple[str, ...] = field(default_factory=tuple)


def _mace_mp() -> list[caches.PretrainedFile]:
    return caches.mace_files("mace-mp")


def _mace_off() -> list[caches.PretrainedFile]:
    return caches.mace_files("mace-off")


ENTRIES = (
    Entry("chgnet", "chgnet[:VERSION|PATH][,recompute=auto|0|1]", "chgnet",
          "CHGNet; pretrained versions ship in the package (default 0.3.0)",
          bundled=("0.3.0", "0.2.0", "r2scan")),
    Entry("mace", "mace:PATH" + caches.MACE_OPTIONS, "mace-torch",
          "a MACE / ScaleShiftMACE model file"),
    Entry("mace-mp", "mace-mp[:NAME]" + caches.MACE_OPTIONS + "[,offline=1]", "mace-torch",
          f"MACE-MP foundation models from mace's cache (default "
          f"{caches.MACE_DEFAULTS['mace-mp']})", files=_mace_mp),
    Entry("mace-off", "mace-off[:NAME]" + caches.MACE_OPTIONS + "[,offline=1]", "mace-torch",
          f"MACE-OFF23 organic models from mace's cache (default "
          f"{caches.MACE_DEFAULTS['mace-off']})", files=_mace_off),
    Entry("tensornet", "tensornet:DIR|NAME[,offline=1]", "matgl",
          "a matgl TensorNet model directory, or a name of matgl's hub org in its cache",
          files=caches.tensornet_files),
    Entry("esen", "esen:PATH|NAME[,task=NAME][,charge=Q][,spin=S][,offline=1]",
          "fairchem-core", "a fairchem eSEN checkpoint file, or a registered name in "
          "fairchem's cache", files=caches.esen_files),
    Entry("sevennet", "sevennet[:NAME|PATH][,modal=NAME][,offline=1]", "sevenn",
          "SevenNet; SevenNet-0 (7net-0, default) and others ship in the package",
          files=caches.sevennet_files),
    Entry("reference", "reference[:layers=,features=,cutoff=,basis=,seed=]", None,
          "a cheap reference message-passing potential (tests, benchmarks)"),
    Entry("lj", "lj[:epsilon=eV,sigma=Å,cutoff=Å]", None, "Lennard-Jones in torch"),
    Entry("ase", "ase:MODULE:NAME[,key=value...]", None,
          "any ASE calculator, evaluated whole on one rank"),
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
    registered = {ep.name: ep for ep in entry_points(group="mlipd.models")}
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
