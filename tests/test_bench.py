"""Every ``mlipd bench`` suite starts and writes its table with every contender, at its
tiny size (the figures themselves are the suites' job, not the tests')."""

from __future__ import annotations

import pytest

from mlipd.bench.suites import SUITES
from mlipd.cli import main

CONTENDERS = {  # columns (or words) each suite's table must hold
    "engine": ["LocalEngine", "DistributedEngine(ranks=1)", "warm step"],
    "mace": ["MACECalculator", "mlipd stored", "mlipd chunked", "mlipd recomputed",
             "mlipd recomputed+chunked", "MiB per atom"],
}


@pytest.mark.parametrize("suite", SUITES)
def test_suite_writes_its_table(suite, tmp_path, one_torch_thread):
    assert main(["bench", suite, "--size", "tiny", "--device", "cpu", "--out",
                 str(tmp_path)]) == 0
    text = (tmp_path / f"{suite}-cpu.md").read_text()
    for word in ["- commit:", "- machine:", "- command:", *CONTENDERS[suite]]:
        assert word in text, word
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) > len([ln for ln in text.splitlines() if ln.startswith("### ")])
