"""Every ``mlipd bench`` suite starts and writes its table with every contender, at its
tiny size (the figures themselves are the suites' job, not the tests')."""

from __future__ import annotations

import pytest

from mlipd.bench.suites import SUITES
from mlipd.cli import main

CONTENDERS = {  # columns (or words) each suite's table must hold
    "engine": ["LocalEngine", "DistributedEngine(ranks=1)", "warm step"],
    "sevennet": ["mlipd s/step", "sevenn s/step", "mlipd peak MiB", "sevenn peak MiB",
                 "mlipd halo", "ghosts 1 cutoff", "ghosts 25 Å"],
}
E3NN_SUITES = {"sevennet"}  # sevenn lives in .venv-e3nn (tests/conftest.py)


@pytest.mark.parametrize("suite", [pytest.param(s, marks=pytest.mark.e3nn) if s in E3NN_SUITES
                                   else s for s in SUITES])
def test_suite_writes_its_table(suite, tmp_path, one_torch_thread):
    assert main(["bench", suite, "--size", "tiny", "--device", "cpu", "--out",
                 str(tmp_path)]) == 0
    text = (tmp_path / f"{suite}-cpu.md").read_text()
    for word in ["- commit:", "- machine:", "- command:", *CONTENDERS[suite]]:
        assert word in text, word
    assert "failed" not in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) > len([ln for ln in text.splitlines() if ln.startswith("### ")])
