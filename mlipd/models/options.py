"""The one parser of model arguments: ``--model NAME:ARG`` where ARG is
``[POSITIONAL][,key=value...]`` (e.g. ``mace:m.model,head=pbe``,
``reference:layers=2,cutoff=4``, ``chgnet:0.2.0,recompute=1``).

The registry splits off ``NAME``; each adapter calls ``parse_options`` with the keys
it takes and a converter per key, so every model reports unknown keys, missing values
and bad values the same way, naming its syntax.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from typing import Any

# a comma starts a new item only when "key=" follows, so values such as [1, 2] keep theirs
_ITEM = re.compile(r",(?=\s*[A-Za-z_]\w*\s*=)")
_KEY = re.compile(r"\s*[A-Za-z_]\w*\s*=")


def literal(text: str) -> Any:
    """A Python literal where ``text`` parses as one (``3``, ``[1, 2]``, ``True``), else
    the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def choice(*allowed: str) -> Callable[[str], str]:
    """A converter accepting only ``allowed`` values."""

    def convert(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text

    return convert


def flag(text: str) -> bool:
    """``1/0``, ``true/false``, ``yes/no`` (any case)."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1 or 0")


def parse_options(arg: str | None, *, model: str, syntax: str,
                  keys: Mapping[str, Callable[[str], Any]] | None = None,
                  positional: bool = False,
                  any_key: Callable[[str], Any] | None = None) -> tuple[str | None, dict[str, Any]]:
    """``"[POSITIONAL][,key=value...]"`` -> (positional or None, {key: converted value}).

    model:      the model's name, for messages
    syntax:     e.g. ``"mace:PATH[,head=NAME]"``, shown with every error
    keys:       allowed keys and the converter of each (``float``, ``int``, ``choice``...)
    positional: whether a first item without ``=`` is allowed (a path or a version)
    any_key:    accept any key with this converter (options passed through, e.g. to an
                ASE calculator's constructor)
    Raises ``ValueError`` with the model's syntax on any problem.
    """
    keys = dict(keys or {})
    items = _ITEM.split(arg) if arg else []
    first = None
    if items and not _KEY.match(items[0]):
        first = items.pop(0).strip() or None
        if first is not None and not positional:
            raise ValueError(f"{model}: unexpected argument {first!r}; use {syntax}")
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"{model}: option {item!r} is not key=value; use {syntax}")
        convert = keys.get(key, any_key)
        if convert is None:
            known = ", ".join(sorted(keys)) or "none"
            raise ValueError(f"{model}: unknown option {key!r} (known: {known}); use {syntax}")
        if key in out:
            raise ValueError(f"{model}: option {key!r} given twice")
        try:
            out[key] = convert(text.strip())
        except ValueError as e:
            raise ValueError(f"{model}: bad value {text!r} for {key}: {e}; use {syntax}") from e
    return first, out
