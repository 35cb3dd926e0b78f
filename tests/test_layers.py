"""The package's layers (DESIGN.md): no import circle, each layer importing only the ones
below it, one place for the engine's options, no argparse in the engine, no command line
imported back by what it runs, the protocols that front ends rely on complete. Read from
the sources (ast), and every module imported once in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mlipd

ROOT = Path(mlipd.__file__).parent


def imports() -> dict[str, set[str]]:
    """module -> every ``mlipd``/stdlib module it imports (top level or in a function)."""
    out: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        out[name] = found
    return out


def under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def top_level_imports() -> dict[str, set[str]]:
    """module -> the mlipd modules it imports when it is imported (module level only),
    each import resolved to the module that defines it."""
    out: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        out[name.removesuffix(".__init__")] = {m for m in found if under(m, "mlipd")}
    return {m: {_defining(d, out) for d in deps} - {m, None} for m, deps in out.items()}


def _defining(name: str, modules) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> str:
    """``mlipd.engine.step`` -> ``mlipd.engine``; a top-level module is its own layer."""
    return ".".join(module.split(".")[:2])


# DESIGN.md's layers, each importing only what this table allows of the package
# (``mlipd.testing`` and ``mlipd.bench`` sit above all of them and may import anything)
BASE = ("mlipd.errors", "mlipd.types", "mlipd.units", "mlipd.model_api", "mlipd.malloc",
        "mlipd.memory", "mlipd.quiet")
ALLOWED = {
    "mlipd.protocols": BASE,
    "mlipd.models": BASE,
    "mlipd.engine": (*BASE, "mlipd.models"),
    "mlipd.driver": (*BASE, "mlipd.protocols"),
    "mlipd.server": (*BASE, "mlipd", "mlipd.protocols", "mlipd.driver", "mlipd.engine",
                     "mlipd.engine_options", "mlipd.curve", "mlipd.client"),
    "mlipd.client": (*BASE, "mlipd.protocols", "mlipd.curve"),
}


def test_no_import_circle():
    """No module imports itself back when it is imported, and no two layers import each
    other even lazily (inside functions): the circle cli <-> driver/cli <-> server/cli
    is gone and stays gone."""
    assert circles(top_level_imports()) == []
    by_layer: dict[str, set[str]] = {}
    for module, found in imports().items():
        mine = by_layer.setdefault(layer(module), set())
        mine |= {layer(m) for m in found if under(m, "mlipd")} - {layer(module)}
    assert circles(by_layer) == []


def test_each_layer_imports_only_the_layers_below_it():
    for module, found in imports().items():
        allowed = ALLOWED.get(layer(module))
        if allowed is None:
            continue
        bad = {m for m in found if under(m, "mlipd") and not under(m, layer(module), *allowed)}
        assert not bad, f"{module} imports {sorted(bad)} (layer {layer(module)})"


def test_every_module_imports_in_a_fresh_interpreter():
    """Each module imports on its own, first thing in a new interpreter's life (one
    interpreter, modules in order); modules of a model package this environment lacks
    may fail only for that package."""
    code = """
import importlib, pkgutil, sys
import mlipd
failed = []
for m in sorted(i.name for i in pkgutil.walk_packages(mlipd.__path__, "mlipd.")):
    if m == "mlipd.__main__":
        continue
    try:
        importlib.import_module(m)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "mlipd":
            failed.append(f"{m}: {e!r}")
    except Exception as e:
        failed.append(f"{m}: {e!r}")
print(*failed, sep=chr(10))
sys.exit(1 if failed else 0)
"""
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]


def test_lower_layers_import_no_command_line_and_no_front_end():
    graph = imports()
    lower = ("mlipd.engine", "mlipd.models", "mlipd.protocols", "mlipd.model_api")
    for module, found in graph.items():
        if not under(module, *lower):
            continue
        bad = {m for m in found if under(m, "mlipd.cli", "mlipd.server", "mlipd.driver",
                                             "mlipd.engine_options", "argparse")}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_no_module_imports_the_command_line_back():
    graph = imports()
    for module, found in graph.items():
        if module in ("mlipd.cli", "mlipd.launch", "mlipd.__main__"):
            continue
        assert "mlipd.cli" not in found, f"{module} imports mlipd.cli"


def test_the_driver_package_is_per_connection_code_only():
    for module, found in imports().items():
        if under(module, "mlipd.driver"):
            bad = {m for m in found if under(m, "mlipd.server", "mlipd.cli", "mlipd.engine")}
            assert not bad, f"{module} imports {sorted(bad)}"


def test_client_and_server_share_the_key_files_module():
    graph = imports()
    assert not {m for m in graph["mlipd.client"] if under(m, "mlipd.server")}
    assert "mlipd.curve" in graph["mlipd.client"]


def test_engine_option_defaults_are_the_engines():
    from mlipd import engine_options
    from mlipd.engine import distributed, guards

    assert engine_options.DEFAULT_MAX_PAIRS == guards.DEFAULT_MAX_PAIRS
    assert engine_options.DEFAULT_MIN_DISTANCE == guards.DEFAULT_MIN_DISTANCE
    assert engine_options.DEFAULT_HEARTBEAT_S == distributed.DEFAULT_HEARTBEAT_S


def test_parsing_a_command_line_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys; from mlipd import cli; cli.parse(['drive', '--address', 'unix:x', "
            "'--species', 'Ar']); cli.parse(['serve', '--zmq', 'tcp://127.0.0.1:0']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "False"


def test_serve_request_timeout_default_is_the_workers():
    from mlipd.server import cli, worker

    assert cli.DEFAULT_REQUEST_TIMEOUT_S == worker.DEFAULT_REQUEST_TIMEOUT_S


def test_engines_satisfy_the_whole_engine_protocol():
    from mlipd.engine import Engine, make_engine
    from mlipd.engine.guards import Limits

    for model in ("lj", "ase:ase.calculators.emt:EMT"):
        engine = make_engine(model, dtype="float64")
        try:
            assert isinstance(engine, Engine)
            assert engine.spec is not None
            assert isinstance(engine.limits, Limits)
            assert engine.devices == ("cpu",)
            assert (engine.backend, engine.restarts) == (None, 0)
            assert engine.threads >= 1
        finally:
            engine.close()


def test_the_distributed_engine_keeps_its_spec_after_close():
    from mlipd.engine import Engine, make_engine

    engine = make_engine("lj", ranks=2, dtype="float64", device="cpu")
    try:
        assert isinstance(engine, Engine)
        assert (engine.devices, engine.backend, engine.restarts) == (("cpu", "cpu"), "gloo", 0)
    finally:
        engine.close()
    assert engine.spec.name == "lj"  # was None once the ranks were gone


def test_the_ase_adapter_declares_the_whole_structure_protocol():
    from ase.calculators.emt import EMT

    from mlipd.model_api import WholeStructureModel, is_whole_structure
    from mlipd.models.ase_generic import ASECalculatorModel

    model = ASECalculatorModel(calculator=EMT())
    assert isinstance(model, WholeStructureModel)
    assert is_whole_structure(ASECalculatorModel)
    from mlipd.models.lj import LennardJones

    assert not is_whole_structure(LennardJones)
