"""``check_zero_redundancy``: a model split over P ranks does, summed over the ranks,
exactly the work it does on one rank, op by op, forward and backward.

    from mlipd.testing import check_zero_redundancy

    check_zero_redundancy(MyModel, [structure, ...], ranks=(2, 4, 8))

One spawn of max(P) real gloo ranks runs P = 1 and every P (``mlipd.testing.work``).
For each structure and each P it asserts:

* results equal P = 1's within ``mlipd.testing.tolerances.float64`` (two computations
  whose edge vectors are built by other operations: the structure's stiffness measured
  with a float64 engine in this process; ``result_extras_scale`` as ``extras_scale``
  there), or to ``result_rtol`` relative where one is given (energy, forces, virial,
  extras);
* every atom owned once, every edge (r < cutoff) on one rank; a structure of >= 4
  atoms per rank really split (every rank owns atoms and has a halo);
* per aten op, elements and FLOPs summed over ranks equal P = 1's **exactly**, up to
  what the model declares, each with a reason:

  - ``per_rank``: work every rank spends whatever it holds (reading a linear layer's
    weights, e3nn's weight normalisation in every forward), allowed once per extra
    rank: {op: (elements, FLOPs)}, or op names whose amounts are measured on a rank
    that owns no atoms (some run must leave one idle: a cell of fewer atoms than
    ranks); ``per_rank_holding_atoms``: the same, once per extra rank that owns atoms
    (work a model skips on a rank with nothing to do);
  - ``per_counted_row``: {counter: {op: (elements, FLOPs)}} per row of the model's
    own that P ranks hold beyond P = 1's, counted by the model (``model.counters[counter]``
    after the step, e.g. a species table each rank makes of the species it holds: a
    rank's rows are those it holds, so their sum over ranks exceeds P = 1's);
  - ``per_halo_row``: {op: elements} per halo row, for autograd's own sums of the
    gradients of tensors that hold halo rows (the positions, used as senders and
    receivers; an exchanged feature read twice): the gradient of a halo row exists
    because the row does, and is sent home;

  the engine adds its own per-rank constant where the virial is computed
  (``ENGINE_PER_RANK_VIRIAL``: the cell gradient of the edge shifts);
* ``exact``: what must match, ("flops", "elements") by default (FLOPs of all matrix
  ops in sum: torch picks mm or bmm by shape; not where a rank owns a single atom,
  whose one-row products may run element-wise, uncounted); a model whose
  element-wise bookkeeping is not yet free of halo work may be held to its FLOPs
  alone, saying so;
* each rank's ``graph.exchange`` calls equal P = 1's and received exactly (calls) x
  (its halo rows); rows sent = rows received over all ranks; the model's own
  exchanges: none, or per ``model_traffic(works) -> (exchanges per rank, rows received
  summed over ranks)`` (e.g. CHGNet's bond exchanges).

A failure names the structure, P, the op and its excess in elements and FLOPs (and the
excess per halo row, per extra rank, so a declaration can be read off it: declare it
only if the reason above holds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

import mlipd.testing.tolerances as tol
from mlipd.testing.work import Measured, Run, Work, measure_runs
from mlipd.types import Result, Structure

# the backward of the edge shifts (images @ cell) into the cell: its (3, 3) product, once
# on every rank that computes a virial
ENGINE_PER_RANK_VIRIAL = {"mm": (9, 0)}


# where a rank owns a single atom, torch may run its one-row products as matrix-vector,
# dot or element-wise products, and skip layout copies (``contiguous``, ``reshape`` of a
# strided view) its rows do not need: these ops' elements are held in sum, never more
ONE_ROW_KERNELS = frozenset({"mm", "bmm", "addmm", "mv", "addmv", "dot", "vdot", "mul",
                             "clone"})


def _require(condition, what) -> None:
    """``assert``, kept under ``python -O``."""
    if not condition:
        raise AssertionError(what)


def rel(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.abs(a - b).max(initial=0.0)) / max(float(np.abs(b).max(initial=0.0)),
                                                       1e-300)


def assert_results_close(got: Result, ref: Result, *, rtol: float, cell: np.ndarray,
                         what: str = "") -> None:
    """Energy, forces, extras and (when ``ref`` has one) stress within ``rtol`` of the
    quantity's largest magnitude."""
    _require(rel(got.energy, ref.energy) <= rtol, (what, got.energy, ref.energy))
    _require(rel(got.forces, ref.forces) <= rtol, (what, rel(got.forces, ref.forces)))
    _require(set(got.extras) == set(ref.extras), what)
    for k, v in ref.extras.items():
        _require(np.shape(got.extras[k]) == np.shape(v), (what, k))
        _require(rel(got.extras[k], v) <= rtol, (what, k))
    if ref.virial is None:
        _require(got.virial is None, what)
    else:
        _require(got.virial is not None, what)
        _require(rel(got.stress(cell), ref.stress(cell)) <= rtol, (what, rel(got.virial,
                                                                           ref.virial)))


def work_excess(one: Work, many: Sequence[Work], *, per_rank: Mapping[str, tuple[int, int]],
                per_halo_row: Mapping[str, int],
                per_rank_holding_atoms: Mapping[str, tuple[int, int]] | None = None,
                per_counted_row: Mapping[str, Mapping[str, tuple[int, int]]] | None = None
                ) -> dict[str, tuple[int, int]]:
    """{op: (elements, FLOPs)} summed over ``many`` minus ``one`` minus the declared
    constants, for every op where that is not (0, 0)."""
    extra_ranks, halo = len(many) - 1, sum(w.halo for w in many)
    extra_holding = sum(w.owned > 0 for w in many) - 1
    holding = per_rank_holding_atoms or {}
    counted = {}  # op -> (elements, FLOPs) of the model's extra counted rows
    for key, ops_of in (per_counted_row or {}).items():
        rows = sum(w.info[key] for w in many) - one.info[key]
        for op, (e, f) in ops_of.items():
            ce, cf = counted.get(op, (0, 0))
            counted[op] = (ce + rows * e, cf + rows * f)
    ops = (set(one.ops) | {k for w in many for k in w.ops} | set(per_rank) | set(per_halo_row)
           | set(holding) | set(counted))
    out = {}
    for op in sorted(ops):
        base = one.ops.get(op, (0, 0))
        rank_e, rank_f = per_rank.get(op, (0, 0))
        hold_e, hold_f = holding.get(op, (0, 0))
        row_e, row_f = counted.get(op, (0, 0))
        e = (sum(w.ops.get(op, (0, 0))[0] for w in many) - base[0] - extra_ranks * rank_e
             - extra_holding * hold_e - halo * per_halo_row.get(op, 0) - row_e)
        f = (sum(w.ops.get(op, (0, 0))[1] for w in many) - base[1] - extra_ranks * rank_f
             - extra_holding * hold_f - row_f)
        if e or f:
            out[op] = (e, f)
    return out


def _describe(excess: dict[str, tuple[int, int]], many: Sequence[Work]) -> str:
    halo, extra = sum(w.halo for w in many), len(many) - 1
    lines = []
    for op, (e, f) in excess.items():
        lines.append(f"  {op}: {e:+d} elements, {f:+d} FLOPs "
                     f"({e / max(halo, 1):+.3g} elements per halo row, "
                     f"{e / max(extra, 1):+.3g} per extra rank)")
    return "\n".join(lines)


def check_zero_redundancy(make_model: Callable, structures: Sequence[Structure] | Mapping,
                          ranks: Sequence[int] = (2, 4, 8), *,
                          per_rank: Mapping[str, tuple[int, int]] | Sequence[str] = (),
                          per_rank_holding_atoms: Mapping[str, tuple[int, int]] | None = None,
                          exact: Sequence[str] = ("flops", "elements"),
                          per_halo_row: Mapping[str, int] | None = None,
                          per_counted_row: Mapping[str, Mapping[str, tuple[int, int]]]
                          | None = None, reason: str = "",
                          dtype: torch.dtype = torch.float64, method: str = "rcb",
                          model_traffic: Callable[[list[Work]], tuple[int, int]] | None = None,
                          extra_runs: Sequence[Run] = (), result_rtol: float | None = None,
                          result_extras_scale: dict[str, float] | None = None,
                          runs: Mapping[Run, list[Measured]] | None = None,
                          timeout_s: float = 900.0) -> dict[Run, list[Measured]]:
    """Assert zero redundancy of ``make_model()`` at every P in ``ranks`` (module doc).

    make_model: picklable factory (a class, a module-level function, a functools.partial)
    structures: a sequence of ``Structure`` (or ASE Atoms), or a {name: ...} mapping
    per_rank, per_halo_row: declared constants (module doc); ``reason`` says why
    extra_runs: more (P, dtype[, factory]) runs measured in the same spawn (e.g. float32)
    runs: measurements already made (``measure_runs``) holding (1, dtype) and (P, dtype)

    Returns every run's measurements (``mlipd.testing.work.Measured`` per structure).
    """
    if (per_rank or per_halo_row or per_rank_holding_atoms or per_counted_row) and not reason:
        raise ValueError("declared per-rank or per-halo-row work needs a reason")
    names, items = _named(structures)
    base_run = (1, dtype)
    wanted = [base_run, *[(p, dtype) for p in ranks], *extra_runs]
    if runs is None:
        runs = measure_runs(make_model, items, list(dict.fromkeys(wanted)), method=method,
                            timeout_s=timeout_s)
    if not isinstance(per_rank, Mapping):  # from any run of this model and dtype
        per_rank = idle_rank_work([m for run, ms in runs.items() if len(run) == 2
                                   and run[1] == dtype for m in ms], per_rank)
    bounds = [None] * len(items)
    if result_rtol is None:
        engine = tol.float64_engine(make_model)
        bounds = [tol.measured_float64(engine, s, one.result, extras_scale=result_extras_scale,
                                       eps=tol.EPS64 if dtype == torch.float64 else tol.EPS32)
                  for s, one in zip(items, runs[base_run], strict=True)]
    for p in ranks:
        for name, s, one, many, bound in zip(names, items, runs[base_run], runs[(p, dtype)],
                                             bounds, strict=True):
            _check_one(f"{name} at P = {p}", s, one, many, p, per_rank=per_rank,
                       per_halo_row=per_halo_row or {},
                       holding=per_rank_holding_atoms or {}, counted=per_counted_row or {},
                       model_traffic=model_traffic, result_rtol=result_rtol,
                       result_bound=bound, exact=exact)
    return dict(runs)


def idle_rank_work(measured: Sequence[Measured], ops: Sequence[str]
                   ) -> dict[str, tuple[int, int]]:
    """{op: (elements, FLOPs)} of ``ops`` on a rank that owns no atoms (and so has no
    edge and no halo): the work a rank does whatever it holds."""
    idle = [_less_engine_virial(w.ops, m.result.virial is not None)
            for m in measured for w in m.work if w.owned == 0 and w.halo == 0]
    if not idle and ops:
        raise ValueError("per-rank work to measure, but no rank owns nothing: add a "
                         "structure of fewer atoms than the largest P")
    if not idle:
        return {}
    for w in idle[1:]:
        _require(w == idle[0], "ranks that own nothing did different work")
    return {op: idle[0].get(op, (0, 0)) for op in ops}


def _less_engine_virial(ops: Mapping[str, tuple[int, int]], virial: bool
                        ) -> dict[str, tuple[int, int]]:
    """A rank's ops without the engine's own virial work (``ENGINE_PER_RANK_VIRIAL``,
    allowed apart, where the structure is periodic)."""
    if not virial:
        return dict(ops)
    out = {}
    for op, (e, f) in ops.items():
        ve, vf = ENGINE_PER_RANK_VIRIAL.get(op, (0, 0))
        if (e - ve, f - vf) != (0, 0):
            out[op] = (e - ve, f - vf)
    return out


def _named(structures) -> tuple[list[str], list[Structure]]:
    if isinstance(structures, Mapping):
        pairs = list(structures.items())
    else:
        pairs = [(f"structure {k}", s) for k, s in enumerate(structures)]
    return ([k for k, _ in pairs],
            [s if isinstance(s, Structure) else Structure.from_atoms(s) for _, s in pairs])


def _check_one(what: str, s: Structure, one: Measured, many: Measured, p: int, *,
               per_rank, per_halo_row, holding, counted, model_traffic, result_rtol,
               result_bound, exact) -> None:
    if result_bound is None:
        assert_results_close(many.result, one.result, rtol=result_rtol, cell=s.cell, what=what)
    else:
        tol.assert_within(many.result, one.result, s, result_bound, what)
    (w1,) = one.work
    works = many.work
    _require(len(works) == p, what)
    _require(sum(w.owned for w in works) == s.n_atoms == w1.owned, what)
    _require(sum(w.edges for w in works) == w1.edges, (what, "an edge on two ranks or none"))
    if s.n_atoms >= 4 * p:
        _require(all(w.owned > 0 for w in works), (what, [w.owned for w in works]))
        _require(all(w.halo > 0 for w in works) or p == 1, what)
    _require(w1.flops > 0 or w1.elements > 0, f"{what}: no work measured at P = 1")
    constants = dict(per_rank)
    if s.pbc.all():  # the engine's virial
        for op, (e, f) in ENGINE_PER_RANK_VIRIAL.items():
            ce, cf = constants.get(op, (0, 0))
            constants[op] = (ce + e, cf + f)
    excess = work_excess(w1, works, per_rank=constants, per_halo_row=per_halo_row,
                         per_rank_holding_atoms=holding, per_counted_row=counted)
    # FLOPs: torch picks the kernel by shape (a batch of one row runs as mm, not bmm), so
    # the matrix ops' FLOPs are compared in sum; and not at all where a rank owns a single
    # atom: its one-row products may run element-wise, FLOPs torch does not count
    single = any(w.owned == 1 for w in works)
    flops = "flops" in exact and not single
    if flops and sum(f for _, f in excess.values()) == 0:
        flops = False
    excess = {op: (e if "elements" in exact else 0, f if flops else 0)
              for op, (e, f) in excess.items()}
    if single:  # torch runs a one-row product as a dot or an element-wise product, and
        # a one-row tensor needs no copy to be laid out: those ops in sum, never more
        group = [op for op in excess if op in ONE_ROW_KERNELS]
        e = sum(excess.pop(op)[0] for op in group)
        if e > 0:
            excess[" + ".join(group)] = (e, 0)
    excess = {op: v for op, v in excess.items() if v != (0, 0)}
    if excess:
        raise AssertionError(
            f"{what}: work ({', '.join(exact)}) summed over ranks differs from P = 1's "
            f"beyond the declared constants ({sum(w.halo for w in works)} halo rows, "
            f"{p - 1} extra ranks):\n"
            + _describe(excess, works))
    for w in works:
        _require(w.atom_exchanges == w1.atom_exchanges, (what, w.atom_exchanges))
        _require(w.atom_rows_received == w.atom_exchanges * w.halo, (what, w))
    _require(sum(w.atom_rows_sent for w in works) == sum(w.atom_rows_received for w in works), "")
    _require(sum(w.rows_sent for w in works) == sum(w.rows_received for w in works), what)
    if p == 1:
        return
    own_calls, own_rows = (0, 0) if model_traffic is None else model_traffic(works)
    for w in works:
        _require(w.exchanges - w.atom_exchanges == own_calls, (what, w))
    _require(sum(w.rows_received - w.atom_rows_received for w in works) == own_rows, what)
    # the whole step (backward and recomputation included) moves no row twice: at most
    # every forward exchange and its transpose, and the positions' halo gradients home
    step_received = sum(w.step_traffic[1] for w in works)
    _require(step_received <= 2 * sum(w.rows_received for w in works)
             + sum(w.halo for w in works), (what, [w.step_traffic for w in works]))
    _require(sum(w.step_traffic[0] for w in works) == step_received, what)
