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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from ..checkpoints.lazy_tables import row_reader
from ..tt import TTDecomposition, TTShape, relative_error, tt_param_count
from ..tt.allocate import Candidate, allocate
from ..tt.decompose import tt_svd_ladder
from ..tt.core_quant import element_bytes
from ..tt.importance import importance_from
from .fidelity import (FidelityOptions, LayoutReader, Result, _gather, evaluation_set, finish, make_layout,
                       rank_ladder, row_norms)
from .svd_runner import TablePlan, decompose

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
             power_iters, progress=None) -> List[Result]:
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
                          seed, svd, power_iters, progress if plan.path == "stream" else None, whole)
                for ranks in (rank_lists if tol is None else [None])]
    out = []
    for dec in decs:
        res = finish(dec, layout, exact_values, options, p.method, plan.key, p.ev)
        res.extra.update(exact_fraction=exact_fraction, hot_rows=hot)
        out.append(res)
    return out


def _ladder(p: Prepared, share: int, options: FidelityOptions):
    eb = element_bytes(options.core_dtype)
    ladder = rank_ladder(p.plan.row_factors, p.plan.dim_factors, share // (16 * eb), 2 * share // eb)
    if not ladder:  # the share is below every rank: offer the smallest
        ladder = rank_ladder(p.plan.row_factors, p.plan.dim_factors, 0, 1 << 62)[:1]
    if p.plan.path == "stream" and len(ladder) > 4:  # each streamed candidate is 4 passes over the table:
        # keep the 4 largest that fit the table's share (the allocation rarely goes far below it)
        fits = [r for r in ladder if tt_param_count(p.plan.row_factors, p.plan.dim_factors, r) * eb <= share]
        ladder = (fits or ladder[:1])[-4:]
    return ladder


def _table_candidates(p: Prepared, share: int, options: FidelityOptions, seed, svd, power_iters,
                      progress: bool = False, position: int = 0) -> List[Candidate]:
    ladder = _ladder(p, share, options)
    layouts = _layouts(p, options, share)
    bar = None
    if progress and p.plan.path == "stream":  # streamed candidates take minutes: show rows and ETA
        bar = tqdm(total=len(layouts) * len(ladder) * p.plan.rows * (2 + 2 * power_iters), unit="row",
                   unit_scale=True, desc=f"{p.plan.name} ({len(layouts) * len(ladder)} streamed candidates)",
                   position=position + 1, leave=False, file=sys.stderr)
    out = []
    for exact_fraction, hot in layouts:
        for ranks, res in zip(ladder, _results(p, options, exact_fraction, hot, ladder, None, seed, svd,
                                               power_iters, bar.update if bar is not None else None)):
            out.append(Candidate({"ranks": ranks, "exact_fraction": exact_fraction, "hot": hot},
                                 res.nbytes, res.weighted_sq, {"result": res}))
    if bar is not None:
        bar.close()
    return out


def _map(fn, items, workers: int):
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # numpy/torch release the GIL in their kernels
        return list(pool.map(fn, items))


def compress_tables(plans: Sequence[TablePlan], weights, mapped: bool, options: FidelityOptions,
                    counts: Dict[str, np.ndarray], budget: Optional[int] = None, tol: Optional[float] = None,
                    seed: int = 0, svd: str = "auto", power_iters: int = 1, progress: bool = True,
                    workers: int = 1) -> List[Result]:
    """One result per plan: fixed ranks (plans carry them) or tol, or the best under ``budget``.
    ``workers`` tables are worked on at once."""
    bar = tqdm(total=len(plans), desc="importance-aware TT-SVD", unit="table",
               disable=True if not progress else None, file=sys.stderr)
    prepared = _map(lambda pw: prepare(pw[0], pw[1], mapped, options, counts.get(pw[0].key)),
                    list(zip(plans, weights)), workers)
    if budget is None:
        def fixed(p):
            res = _results(p, options, options.exact_fraction or 0.0, int(round(options.hot_fraction * p.plan.rows)),
                           [p.plan.ranks], tol, seed, svd, power_iters)[0]
            res.extra["why"] = (f"ranks {','.join(map(str, res.shape.ranks[1:-1]))} as asked; row map of "
                                f"{res.entry['row_map_rows']:,} rows, {res.entry['exact_rows']:,} exact rows")
            bar.update(1)
            return res
        results = _map(fixed, prepared, workers)
    else:
        sizes = [p.plan.rows * p.plan.dim for p in prepared]
        shares = {p.plan.key: int(budget * size / sum(sizes)) for p, size in zip(prepared, sizes)}

        def offer(p):
            out = _table_candidates(p, shares[p.plan.key], options, seed, svd, power_iters, progress,
                                    prepared.index(p) % max(workers, 1))
            bar.update(1)
            return out
        candidates = dict(zip([p.plan.key for p in prepared], _map(offer, prepared, workers)))
        chosen = allocate(candidates, budget)
        results = []
        for p in prepared:
            c = chosen[p.plan.key]
            res = c.extra["result"]
            cheapest = min(candidates[p.plan.key], key=lambda x: x.nbytes)
            res.extra["why"] = (
                f"{len(candidates[p.plan.key])} candidates (row map or not, {len(EXACT_FRACTIONS)} exact-row "
                f"fractions at most, ranks around its size share of {shares[p.plan.key]:,} B); chosen: ranks "
                f"{','.join(map(str, res.shape.ranks[1:-1]))}, {res.entry['row_map_rows']:,} map + "
                f"{res.entry['exact_rows']:,} exact rows, {c.nbytes:,} B, weighted error {res.weighted_error:.4f} "
                f"(the cheapest candidate: {cheapest.nbytes:,} B, {cheapest.error ** 0.5:.4f}); the budget went "
                f"where it lowered the weighted error most per byte")
            results.append(res)
    bar.close()
    return results
