"""Importance-aware compression of the chosen tables, with ranks chosen under a byte budget.

With ``--rank``/``--tol`` every table gets its layout (row map of ``hot_fraction`` of
its rows, ``exact_fraction`` kept exactly) and those ranks.  With ``--budget`` or
``--ratio`` (a budget of ``dense bytes / ratio``), each table offers candidates —
layouts (row map or not, several exact-row fractions) times a ladder of ranks around
its share of the budget — whose bytes are counted exactly and whose importance-weighted
error is measured; :func:`fpd_convert.tt.allocate.allocate` then picks one per table.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from ..checkpoints.lazy_tables import row_reader
from ..tt import TTDecomposition, TTShape, relative_error
from ..tt.allocate import Candidate, allocate
from ..tt.decompose import tt_svd_ladder
from ..tt.core_quant import element_bytes
from ..tt.importance import importance_from
from .fidelity import (FidelityOptions, LayoutReader, Result, _gather, decompose, evaluation_set, finish,
                       make_layout, rank_ladder, row_norms)
from .svd_runner import TablePlan

EXACT_FRACTIONS = (0.0, 0.005, 0.01, 0.02)


@dataclass
class Prepared:
    plan: TablePlan
    reader: object
    importance: np.ndarray
    method: str
    ev: object


def prepare(plan: TablePlan, weight, mapped: bool, options: FidelityOptions,
            counts: Optional[np.ndarray]) -> Prepared:
    reader = row_reader(weight, mapped)
    method = options.method(counts is not None)
    imp = importance_from(row_norms(reader, plan.rows), method, counts)
    return Prepared(plan, reader, imp, method, evaluation_set(reader, imp))


def _layouts(p: Prepared, options: FidelityOptions, share: Optional[int]):
    n, d = p.plan.rows, p.plan.dim
    hot = int(round(options.hot_fraction * n))
    if options.exact_fraction is not None or share is None:
        fractions = [options.exact_fraction or 0.0]
    else:
        per_row = 4 + d * element_bytes(options.exact_dtype) + (4 if options.exact_dtype == "int8" else 0)
        fractions = [f for f in EXACT_FRACTIONS if f * n * per_row <= 0.7 * share]
        if p.plan.path == "stream":
            fractions = [f for f in fractions if f in (0.0, 0.01)]
    hots = sorted({0, hot}) if share is not None and p.plan.path != "stream" else [hot]
    return [(f, h) for f in fractions for h in hots]


def _layout_inputs(p: Prepared, exact_fraction: float, hot: int):
    layout = make_layout(p.importance, int(round(exact_fraction * p.plan.rows)), hot)
    lreader = LayoutReader(p.reader, p.plan.rows, layout)
    whole = lreader(0, p.plan.rows) if p.plan.path == "memory" else None
    exact_values = _gather(p.reader, layout.exact_ids) if layout.exact_ids.size else None
    return layout, lreader, whole, exact_values


def _results(p: Prepared, options: FidelityOptions, exact_fraction: float, hot: int, rank_lists, tol, seed, svd,
             power_iters) -> List[Result]:
    """One result per rank list (or one for ``tol``) for this layout."""
    layout, lreader, whole, exact_values = _layout_inputs(p, exact_fraction, hot)
    plan = p.plan
    if plan.path == "memory" and tol is None and len(rank_lists) > 1:
        # exact TT-SVD sharing the first unfolding's SVD across the ladder
        decs = [TTDecomposition(TTShape(plan.rows, plan.dim, plan.row_factors, plan.dim_factors,
                                        [1] + [c.shape[3] for c in cores]), cores, relative_error(whole, cores))
                for cores in tt_svd_ladder(whole, plan.row_factors, plan.dim_factors, rank_lists)]
    else:
        decs = [decompose(lreader, plan.rows, plan.dim, plan.row_factors, plan.dim_factors, ranks, tol, plan.path,
                          seed, svd, power_iters, None, whole) for ranks in (rank_lists if tol is None else [None])]
    out = []
    for dec in decs:
        res = finish(dec, layout, exact_values, options, p.method, plan.key, p.ev)
        res.extra.update(exact_fraction=exact_fraction, hot_rows=hot)
        out.append(res)
    return out


def compress_tables(plans: Sequence[TablePlan], weights, mapped: bool, options: FidelityOptions,
                    counts: Dict[str, np.ndarray], budget: Optional[int] = None, tol: Optional[float] = None,
                    seed: int = 0, svd: str = "auto", power_iters: int = 1, progress: bool = True) -> List[Result]:
    """One result per plan: fixed ranks (plans carry them) or tol, or the best under ``budget``."""
    prepared = []
    for plan, weight in zip(plans, weights):
        prepared.append(prepare(plan, weight, mapped, options, counts.get(plan.key)))
    bar = tqdm(total=len(plans), desc="importance-aware TT-SVD", unit="table",
               disable=True if not progress else None, file=sys.stderr)
    results: List[Result] = []
    if budget is None:
        for p in prepared:
            results += _results(p, options, options.exact_fraction or 0.0,
                                int(round(options.hot_fraction * p.plan.rows)), [p.plan.ranks], tol, seed, svd,
                                power_iters)
            bar.update(1)
    else:
        sizes = [p.plan.rows * p.plan.dim for p in prepared]
        candidates: Dict[str, List[Candidate]] = {}
        eb = element_bytes(options.core_dtype)
        for p, size in zip(prepared, sizes):
            share = int(budget * size / sum(sizes))
            options_list = []
            ladder = rank_ladder(p.plan.row_factors, p.plan.dim_factors, share // (16 * eb), 2 * share // eb)
            if not ladder:  # the share is below every rank: offer the smallest
                ladder = rank_ladder(p.plan.row_factors, p.plan.dim_factors, 0, 1 << 62)[:1]
            if p.plan.path == "stream" and len(ladder) > 4:
                ladder = [ladder[i] for i in np.linspace(0, len(ladder) - 1, 4).round().astype(int)]
            for exact_fraction, hot in _layouts(p, options, share):
                for ranks, res in zip(ladder, _results(p, options, exact_fraction, hot, ladder, None, seed, svd,
                                                       power_iters)):
                    options_list.append(Candidate({"ranks": ranks, "exact_fraction": exact_fraction, "hot": hot},
                                                  res.nbytes, res.weighted_sq, {"result": res}))
            candidates[p.plan.key] = options_list
            bar.update(1)
        chosen = allocate(candidates, budget)
        for p in prepared:
            c = chosen[p.plan.key]
            res = c.extra["result"]
            res.extra["why"] = (f"{len(candidates[p.plan.key])} candidates; best weighted error per byte under "
                                f"the budget")
            results.append(res)
    bar.close()
    return results
