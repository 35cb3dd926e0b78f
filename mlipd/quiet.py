"""Third-party warnings kept out of mlipd's output.

Importing and running the model packages prints warnings meant for their developers
(TorchScript's ``UserWarning``s, e3nn's and cuEquivariance's notes on their own
versions, chgnet's and mace's deprecations): ~20 lines before ``mlipd bench``'s
table, and ahead of every ``mace-mp`` error. ``quiet_third_party()`` ignores every warning
but mlipd's own (``MlipdWarning``), in this process; ``-v`` (the commands) or
``MlipdCalculator(..., verbose=True)`` keeps them. mlipd's own warnings (raised from a
module of mlipd, or logged through ``logging``) are never filtered. Processes mlipd
starts (ranks, benchmark contenders) call ``quiet_third_party`` too, and inherit ``-v``
through ``SHOW_ENV``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator


class MlipdWarning(UserWarning):
    """The category of mlipd's own Python warnings (it reports through ``logging``;
    a warning it raises uses this category), never filtered. Others are filtered by
    category, not by the module a warning is attributed to: torch attributes many of
    its own to the caller (``stacklevel``), which is often mlipd's code."""


def _ignore_others() -> None:
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=MlipdWarning)


SHOW_ENV = "MLIPD_THIRD_PARTY_WARNINGS"  # "1": show them, in this process and its children


def show_third_party() -> None:
    """``-v``: keep third-party warnings, here and in the processes started from here
    (ranks, benchmark contenders)."""
    os.environ[SHOW_ENV] = "1"


def quiet_third_party() -> None:
    """Ignore, in this process, every warning but ``MlipdWarning``, and
    other packages' log records below ERROR on the root logger's handlers (call it
    after ``logging.basicConfig``); nothing when ``show_third_party`` was called here
    or in a parent process."""
    if os.environ.get(SHOW_ENV) == "1":
        return
    _ignore_others()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, OwnLogsOnly) for f in handler.filters):
            handler.addFilter(OwnLogsOnly())


class OwnLogsOnly(logging.Filter):
    """On the root handlers: mlipd's loggers pass; other packages' records (mace logs
    "Using CPU" and its dtype choice through the root logger) only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == "mlipd" or record.name.startswith("mlipd.")
        return own or record.levelno >= logging.ERROR


@contextlib.contextmanager
def quieted(enabled: bool = True) -> Iterator[None]:
    """Third-party warnings ignored inside the block only (a library's calls: the
    user's own code outside it keeps its warnings)."""
    if not enabled:
        yield
        return
    with warnings.catch_warnings():
        _ignore_others()
        yield
