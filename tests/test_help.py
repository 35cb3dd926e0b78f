"""Issue 25 items 9 and 10: help written for users (what a command does, an example),
``bench --help`` says what each suite measures, suites log their progress while they
run, and ``help(MlipdCalculator)`` shows mlipd's own docstring."""

from __future__ import annotations

import logging
import pydoc
import time

import pytest

from mlipd.bench.progress import Progress
from mlipd.bench.suites import SUITES
from mlipd.bench.timing import interleaved
from mlipd.cli import build_parser


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return capsys.readouterr().out


def test_top_level_help_is_for_users(capsys):
    out = help_text(capsys)
    assert "``" not in out  # no docstring markup
    assert "Only" not in out
    assert "machine-learned interatomic" in out
    assert "examples:" in out
    assert "mlipd drive --address" in out
    assert "exit status" in out


@pytest.mark.parametrize("command", ["models", "stats", "keygen", "bench"])
def test_each_tool_says_what_it_does_with_an_example(capsys, command):
    out = help_text(capsys, command)
    assert "example" in out
    assert f"mlipd {command}" in out.split("example", 1)[1]


def test_bench_help_says_what_each_suite_measures(capsys):
    import importlib

    out = help_text(capsys, "bench")
    for name in SUITES:
        described = importlib.import_module(f"mlipd.bench.suites.{name}").DESCRIPTION
        assert any(ln.split()[:1] == [name] and described in ln for ln in out.splitlines()), name


def test_a_suite_that_is_busy_says_so_every_tick(caplog):
    caplog.set_level(logging.INFO, logger="mlipd")
    with Progress("demo", "tiny", tick_s=0.2):
        logging.getLogger("mlipd.bench.demo").info("timing chgnet, 8 atoms")
        time.sleep(1.0)  # silent work longer than the tick
    text = caplog.text
    assert "bench demo (tiny): started" in text
    assert "still at: timing chgnet, 8 atoms" in text
    assert "bench demo (tiny): done after" in text


def test_interleaved_logs_each_round_with_its_label(caplog):
    caplog.set_level(logging.INFO, logger="mlipd")
    interleaved({"a": lambda k: None, "b": lambda k: None}, repeats=3, label="lj, 8 atoms")
    rounds = [r.getMessage() for r in caplog.records if "round" in r.getMessage()]
    assert [m.split(":")[1].strip() for m in rounds] == ["round 1/3", "round 2/3",
                                                         "round 3/3"]
    assert all(m.startswith("lj, 8 atoms: ") and " a " in m + " " for m in rounds)


def test_help_of_the_calculator_is_its_own():
    from mlipd.calculator import MlipdCalculator

    text = pydoc.render_doc(MlipdCalculator, renderer=pydoc.plaintext)
    assert "Basic calculator implementation" not in text  # ASE's, inherited before
    assert 'MlipdCalculator(model="chgnet")' in text
    assert "no ``__main__`` guard needed" in text


def test_server_only_options_are_offered_by_serve_alone(capsys):
    """The queue's byte bound acts in `mlipd serve`'s scheduler; `mlipd drive` has no
    queue. The memory budget acts in both engines."""
    serve, drive = help_text(capsys, "serve"), help_text(capsys, "drive")
    assert "--max-queue-bytes" in serve
    assert "--max-queue-bytes" not in drive
    assert "--max-request-memory" in serve
    assert "--max-request-memory" in drive
