"""``mlipd models``: every registered name, its syntax and package, which packages are
missing, and whether published names' files are present. Runs in both environments
(scripts/test.sh), each of which lacks the other's packages."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from mlipd.cli import main
from mlipd.models import caches
from mlipd.models.catalog import ENTRIES


def blocks(text: str) -> dict[str, list[str]]:
    """{model name: its indented lines} from the listing."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and not line.startswith("--model") \
                and not line.startswith("offline="):
            current = line.split()[0]
            out[current] = []
        elif current and line.strip():
            out[current].append(line.strip())
    return out


def test_models_names_every_model_and_missing_packages(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    medium = [f for f in caches.mace_files("mace-mp") if f.name == "medium"]
    for f in medium:  # with mace-torch installed: MACE-MP-0 medium in the cache
        f.path.parent.mkdir(parents=True)
        f.path.touch()
    assert main(["models"]) == 0
    listing = blocks(capsys.readouterr().out)
    registered = {ep.name for ep in entry_points(group="mlipd.models")}
    assert registered <= set(listing), registered - set(listing)
    missing = []
    for entry in ENTRIES:
        lines = listing[entry.name]
        if entry.package is None:
            continue
        (package,) = [ln for ln in lines if ln.startswith("package:")]
        if caches.installed_version(entry.package) is None:
            missing.append(entry.package)
            extra = caches.EXTRA_OF[entry.package]
            assert package == (f"package: {entry.package} NOT INSTALLED: "
                               f"pip install 'mlipd[{extra}]'")
        else:
            assert package == f"package: {entry.package} {caches.installed_version(entry.package)}"
    assert missing, "each test environment lacks the other family's packages"
    mp = listing["mace-mp"]
    if medium:
        assert any(ln.split()[:2] == ["medium", "present"] for ln in mp), mp
        assert any(ln.split()[:2] == ["small", "missing"] for ln in mp), mp
    else:
        assert not any(ln.startswith("medium") for ln in mp)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_each_entry_shows_its_syntax(entry, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"{entry.name:<10} {entry.syntax}" in out


def test_syntax_is_read_from_each_adapter_without_importing_it():
    """Issue 24 item 7: written once, in the adapter (``SYNTAX``); the catalog reads the
    source, so listing imports no model package."""
    import importlib
    import sys

    from mlipd.models.catalog import adapter_syntax

    light = {"lj": "mlipd.models.lj", "reference": "mlipd.models.reference",
             "ase": "mlipd.models.ase_generic"}
    for name, module in light.items():
        assert adapter_syntax(name) == importlib.import_module(module).SYNTAX
    for entry in ENTRIES:
        assert not entry.syntax.endswith("[:ARG]"), entry.name  # each adapter declares one
    heavy = ("chgnet.model", "mace.modules", "matgl", "fairchem.core", "sevenn")
    code = ("import sys; from mlipd.models.catalog import listing; listing(); "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"
