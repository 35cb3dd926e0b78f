"""The contenders the suites time, as recipes: ``recipe(case, structure, n_atoms,
device=...)`` returns ``call(k) -> (energy, forces)`` for MD-like call ``k``
(``systems.Jiggle``: the same positions for every contender at the same ``k``).

Like for like: a package's calculator builds its graph in every call, so the mlipd
contender it is compared with rebuilds its neighbour list and topology in every call
too (``skin=0``); ``skin=0.5`` is mlipd's MD step (lists reused within the skin),
which the tables show beside it and name as such. Recipes are module-level functions,
so ``workers.Worker`` can run them in another process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from mlipd.bench.systems import Jiggle, oxide, silicon
from mlipd.bench.timing import ContenderFailed, interleaved
from mlipd.bench.zoo import Case, package_calculator, package_efs

STRUCTURES = {"oxide": oxide, "silicon": silicon}
MD_SKIN = 0.5  # Å, mlipd's default
Call = Callable[[int], tuple[float, np.ndarray]]


@functools.cache
def _model(spec: str):
    from mlipd.models.registry import load_model

    return load_model(spec)


@functools.cache
def _calculator(case: Case, device: str):
    return package_calculator(case, device)


def engine(case: Case, *, skin: float, device: str):
    """A one-rank mlipd engine for ``case`` in float32 (the model loaded once per process)."""
    import torch

    from mlipd.engine.single_rank import SingleRankEngine

    return SingleRankEngine(_model(case.spec), device=device, dtype=torch.float32, skin=skin)


def mlipd_call(case: Case, structure: str, n_atoms: int, *, skin: float, device: str) -> Call:
    """mlipd's engine: energy, forces and virial of one structure per call."""
    eng = engine(case, skin=skin, device=device)
    md = Jiggle(STRUCTURES[structure](n_atoms))

    def call(k: int) -> tuple[float, np.ndarray]:
        (r,) = eng.compute([md.structure(k)], virial=True)
        return r.energy, r.forces

    return call


def package_call(case: Case, structure: str, n_atoms: int, *, device: str) -> Call:
    """The package's own ASE calculator: energy, forces and stress per call."""
    calc = _calculator(case, device)
    md = Jiggle(STRUCTURES[structure](n_atoms))

    def call(k: int) -> tuple[float, np.ndarray]:
        e, f, _ = package_efs(calc, md.atoms(k))
        return e, f

    return call


def rebuilding(case: Case, structure: str, n_atoms: int, *, device: str) -> Call:
    """mlipd rebuilding its lists every call: the package's graph work, like for like."""
    return mlipd_call(case, structure, n_atoms, skin=0.0, device=device)


def md_step(case: Case, structure: str, n_atoms: int, *, device: str) -> Call:
    """mlipd's MD step: lists reused within the Verlet skin."""
    return mlipd_call(case, structure, n_atoms, skin=MD_SKIN, device=device)


def agreement(a: tuple[float, np.ndarray], b: tuple[float, np.ndarray], n_atoms: int) -> str:
    """``|dE|/atom, max |dF|`` between two contenders' results of the same call."""
    de = abs(a[0] - b[0]) / n_atoms
    df = float(np.abs(np.asarray(a[1]) - np.asarray(b[1])).max())
    return f"{de:.1e} eV/atom, {df:.1e} eV/Å"


SIDE_BY_SIDE = ("mlipd MD step", "mlipd rebuilding", "package")


def guarded(fn: Call, device: str) -> Call:
    """``fn`` raising ``ContenderFailed`` when it runs out of memory (cached device
    memory handed back first), so the other contenders go on."""
    from mlipd.bench.workers import is_oom

    def call(k: int):
        try:
            return fn(k)
        except Exception as e:
            if not is_oom(e):
                raise
            if device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            raise ContenderFailed("out of memory") from e

    return call


def side_by_side(case: Case, n_atoms: int, *, device: str, repeats: int, deadline,
                 structure: str = "oxide"):
    """mlipd's MD step, mlipd rebuilding and the package on one structure, in this
    process, interleaved (two warm-ups): ({contender: Timing}, agreement of one call
    between mlipd rebuilding and the package)."""
    calls = {name: guarded(recipe(case, structure, n_atoms, device=device), device)
             for name, recipe in zip(SIDE_BY_SIDE, (md_step, rebuilding, package_call),
                                     strict=True)}
    try:
        same = agreement(calls["mlipd rebuilding"](-100), calls["package"](-100), n_atoms)
    except ContenderFailed as e:
        same = f"not compared ({e})"
    return interleaved(calls, warmup=2, repeats=repeats, deadline=deadline,
                       label=f"{case.name}, {n_atoms} atoms"), same
