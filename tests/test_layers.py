"""The package's layers (DESIGN.md): one place for the engine's options, no argparse
in the engine, no command line imported back by what it runs, the protocols that
front ends rely on complete. Read from the sources (ast), so nothing is imported."""

from __future__ import annotations

import ast
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
