"""Issue 25 item 5: the model packages' warnings (TorchScript's UserWarnings, chgnet's,
e3nn's, mace's root-logger lines) stay out of mlipd's output; mlipd's own do not, and
``-v`` / ``verbose=True`` shows them all."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings

import pytest

from mlipd.quiet import MlipdWarning, OwnLogsOnly, quieted

THIRD_PARTY = re.compile(r"\w*Warning\b|\broot (INFO|WARNING)\b|weights_only")


def _run(*args: str, timeout: float) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MLIPD_THIRD_PARTY_WARNINGS"}
    proc = subprocess.run([sys.executable, "-m", "mlipd", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(env, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_mlipd_models_prints_no_third_party_warning():
    out = _run("models", timeout=120)
    assert "chgnet" in out
    assert not THIRD_PARTY.findall(out), out


@pytest.mark.timeout(300)
def test_bench_latency_prints_no_third_party_warning(tmp_path):
    """CHGNet and MACE load and run here (TorchScript compiles, e3nn loads its
    constants): ~20 warning lines before the filter."""
    out = _run("bench", "latency", "--size", "tiny", "--device", "cpu", "--out",
               str(tmp_path), timeout=280)
    assert "| chgnet | 8 |" in out
    assert not [ln for ln in out.splitlines() if THIRD_PARTY.search(ln)], out[-3000:]


def test_only_mlipd_warnings_pass_the_quiet_block():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quieted():
            warnings.warn("a package's note", UserWarning, stacklevel=1)
            warnings.warn("a package's deprecation", FutureWarning, stacklevel=1)
            warnings.warn("mlipd's own", MlipdWarning, stacklevel=1)
        with quieted(False):  # verbose=True, -v
            warnings.warn("shown when verbose", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["mlipd's own", "shown when verbose"]


def test_other_packages_log_lines_pass_only_from_error_up():
    keep = OwnLogsOnly()

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "x", None, None)

    assert keep.filter(record("mlipd.server.cli", logging.INFO))
    assert keep.filter(record("mlipd", logging.DEBUG))
    assert not keep.filter(record("root", logging.WARNING))  # mace: "No dtype selected"
    assert not keep.filter(record("e3nn", logging.INFO))
    assert not keep.filter(record("mlipdx", logging.INFO))
    assert keep.filter(record("root", logging.ERROR))
