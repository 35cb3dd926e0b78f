"""Any ASE calculator as a single-device mlipd model: ``--model ase:MODULE:NAME[,key=value...]``.

A package that ships an ASE calculator but has no mlipd adapter yet still runs
behind every front end, at one rank. Such a calculator is a *whole-structure*
model: it returns energy, forces and stress itself, so it cannot take part in the
graph / halo-exchange / autograd path of ``SingleRankEngine`` and ``DistributedEngine``.
``make_engine`` sees ``whole_structure = True`` and uses ``mlipd.engine.whole.WholeEngine``
instead, and refuses ``--ranks`` > 1: distributing a model needs an adapter
(docs/models.md).

``NAME`` is a class or factory in ``MODULE`` called with the keyword options, which
are Python literals where they parse as one and strings otherwise, e.g.
``ase:ase.calculators.emt:EMT`` or ``ase:mace.calculators:mace_mp,model=medium,device=cuda``.
The calculator chooses its own device and precision: ``--device``/``--dtype`` do not
reach it. Importing ``MODULE`` runs its code: name only modules you trust.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, ClassVar

from mlipd.model_api import ModelSpec
from mlipd.models.options import literal, parse_options

log = logging.getLogger(__name__)

# The graph engines need a cutoff; a whole-structure calculator hides its own. This
# nominal value only feeds cost estimates (batching); ``cutoff=`` overrides it.
NOMINAL_CUTOFF = 5.0


SYNTAX = "ase:MODULE:NAME[,key=value...]"


def parse_target(arg: str) -> tuple[str, str, dict[str, Any]]:
    """``"pkg.mod:Name,k=v,..."`` -> ("pkg.mod", "Name", {k: v}); values are Python
    literals where they parse as one, strings otherwise."""
    target, options = parse_options(arg, model="ase", syntax=SYNTAX, positional=True,
                                    any_key=literal)
    module, sep, name = (target or "").rpartition(":")
    if not sep or not name.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise ValueError(f"ase: expected {SYNTAX}, got {arg!r}")
    return module, name, options


class ASECalculatorModel:
    """An ASE calculator wrapped as a whole-structure model (one rank only).

    ``ASECalculatorModel("ase.calculators.emt:EMT")`` builds the calculator from the
    CLI argument; ``ASECalculatorModel(calculator=calc)`` wraps an instance. Option
    ``cutoff`` (Å) is taken by mlipd (see ``NOMINAL_CUTOFF``), not passed on.
    """

    # mlipd.model_api.WholeStructureModel: no graph, no partition, WholeEngine at P = 1
    whole_structure: ClassVar[bool] = True

    def __init__(self, arg: str | None = None, *, calculator: Any = None,
                 cutoff: float = NOMINAL_CUTOFF) -> None:
        name = "ase"
        if arg is not None:
            module, attr, options = parse_target(arg)
            cutoff = float(options.pop("cutoff", cutoff))
            try:
                factory = getattr(importlib.import_module(module), attr)
            except ImportError as e:
                raise ValueError(f"ase: cannot import {module!r}: {e}") from e
            except AttributeError as e:
                raise ValueError(f"ase: {module!r} has no {attr!r}") from e
            calculator = factory(**options)
            name = f"ase:{module}:{attr}"
        if calculator is None:
            raise ValueError(f"ase needs a calculator: --model {SYNTAX}")
        if not callable(getattr(calculator, "get_potential_energy", None)):
            raise ValueError(f"ase: {type(calculator).__name__} is not an ASE calculator")
        self.calculator = calculator
        self.spec = ModelSpec(name=name, cutoff=cutoff, species=None, n_layers=0)

