"""Find models by name through the ``mlipd.models`` entry-point group.

``--model NAME`` or ``--model NAME:ARG`` loads the entry point NAME (importing only
that one) and calls it with ``ARG`` (e.g. a model file path) when given. Third-party
packages add models by declaring an entry point in the same group.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from mlipd.errors import ModelUnavailable, SetupError, UnknownModel


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group="mlipd.models")}


def names() -> list[str]:
    """Registered model names, without importing any of them."""
    return sorted(_entry_points())


def model_factory(spec: str) -> Any:
    """The class or factory behind ``"name"`` or ``"name:arg"``, imported (its adapter
    module only) but not called: UnknownModel / ModelUnavailable otherwise."""
    name = spec.partition(":")[0]
    ep = _entry_points().get(name)
    if ep is None:
        raise UnknownModel(f"unknown model {name!r}; known: {', '.join(names()) or 'none'}")
    try:
        return ep.load()
    except ImportError as e:
        raise ModelUnavailable(
            f"model {name!r} needs a package that is not installed ({e}); "
            f"try: pip install 'mlipd[{name}]'"
        ) from e


def load_model(spec: str, **options: Any) -> Any:
    """Load ``"name"`` or ``"name:arg"`` (arg is usually a model file path)."""
    factory = model_factory(spec)
    arg = spec.partition(":")[2]
    try:
        return factory(arg, **options) if arg else factory(**options)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise SetupError(f"cannot load model {spec!r}: {e}") from e
