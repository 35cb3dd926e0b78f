"""A per-request deadline, checked by the engine between the stages of a step.

Torch work cannot be interrupted from another thread, so a deadline cannot cut a
forward pass short. What bounds the work of each stage is decided up front (the
geometry guards, ``mlipd.engine.guards``, cap the pairs the neighbour list and the
model see); the deadline is then checked where stopping is free and leaves every
rank consistent: before the neighbour list, before the ranks start the step, and
after it (a late result is refused, not delivered as if it were in time).

The caller (the server's engine loop, a driver) sets it for the current thread:

    with deadline(time.monotonic() + 30.0):
        engine.compute(structures)

and the engine calls ``check("stage")``, which raises ``DeadlineExceeded`` once it
has passed. Without a deadline ``check`` costs one context-variable lookup.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

from mlipd.errors import DeadlineExceeded

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("mlipd_deadline",
                                                                        default=None)


@contextlib.contextmanager
def deadline(at: float | None) -> Iterator[None]:
    """Engine calls in this block must finish by ``at`` (``time.monotonic()``); None: never."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check(stage: str) -> None:
    """Raise ``DeadlineExceeded`` if the current deadline has passed (``stage`` names
    where, for the message)."""
    at = _DEADLINE.get()
    if at is not None and time.monotonic() > at:
        late = time.monotonic() - at
        raise DeadlineExceeded(f"request deadline passed {late:.3g} s ago ({stage})")
