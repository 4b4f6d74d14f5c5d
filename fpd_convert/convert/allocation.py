"""Compress, across tables: one TT per table, at the ranks asked for or the best under the byte budget.

With ``--rank``/``--tol`` (or plain TT-SVD), each table gets its plan's ranks and the layout the
options fix.  With ``--budget`` or ``--ratio`` (a budget of ``dense bytes / ratio``) and an importance,
each table offers candidates (:mod:`fpd_convert.convert.candidates`) around its share of the budget,
and :func:`fpd_convert.tt.allocate.allocate` takes, again and again, the upgrade that lowers the
weighted error most per extra byte.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

from tqdm import tqdm

from ..tt.allocate import allocate
from .candidates import EXACT_FRACTIONS, Result, chosen_result, fixed_result, stream_progress, table_candidates
from .importance import FidelityOptions, Prepared


def _map(fn, items, workers: int):
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # numpy/torch release the GIL in their kernels
        return list(pool.map(fn, items))


def _why(p: Prepared, chosen, candidates, share: int) -> str:
    res, cheapest = chosen.extra["result"], min(candidates, key=lambda x: x.nbytes)
    return (f"{len(candidates)} candidates (row map or not, {len(EXACT_FRACTIONS)} exact-row fractions at most, "
            f"ranks around its size share of {share:,} B); chosen: ranks {','.join(map(str, res.shape.ranks[1:-1]))}, "
            f"{res.entry['row_map_rows']:,} map + {res.entry['exact_rows']:,} exact rows, {chosen.nbytes:,} B, "
            f"weighted error {res.weighted_error:.4f} as compared (the cheapest candidate: {cheapest.nbytes:,} B, "
            f"{cheapest.error ** 0.5:.4f}); the budget went where it lowered the weighted error most per byte")


def choose_results(prepared: Sequence[Prepared], options: FidelityOptions, budget: Optional[int] = None,
                   tol: Optional[float] = None, seed: int = 0, svd: str = "auto", power_iters: int = 1,
                   progress: bool = True, workers: int = 1) -> List[Result]:
    """One result per table: its plan's ranks (or ``tol``) when ``budget`` is None, else the best
    candidates under ``budget`` bytes.  ``workers`` tables are worked on at once."""
    bar = tqdm(total=len(prepared), desc="TT-SVD", unit="table", disable=True if not progress else None,
               file=sys.stderr)

    def fixed(p: Prepared) -> Result:
        passes = stream_progress(p, 1, power_iters, progress)
        res = fixed_result(p, options, tol, seed, svd, power_iters,
                           passes.update if isinstance(passes, tqdm) else passes)
        if isinstance(passes, tqdm):
            passes.close()
        bar.update(1)
        return res

    try:
        if budget is None:
            return _map(fixed, list(prepared), workers)
        sizes = [p.plan.rows * p.plan.dim for p in prepared]
        shares = [int(budget * size / sum(sizes)) for size in sizes]

        done = []

        def offer(i: int):
            started = time.perf_counter()
            out = table_candidates(prepared[i], shares[i], options, seed, svd, power_iters, progress,
                                   i % max(workers, 1))
            bar.update(1)
            done.append(i)
            if progress and bar.disable:  # not a terminal (a batch job's log): one line per table
                plan = prepared[i].plan
                print(f"TT-SVD {len(done)}/{len(prepared)}: {plan.key} ({plan.rows:,} x {plan.dim}), {len(out)} candidates "
                      f"in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            return out
        candidates = _map(offer, list(range(len(prepared))), workers)
        chosen = allocate({p.plan.key: c for p, c in zip(prepared, candidates)}, budget)
        why = [_why(p, chosen[p.plan.key], cands, share) for p, cands, share in zip(prepared, candidates, shares)]
        del candidates  # the tables' candidates hold their layouts: one table's work at a time from here

        def rebuild(i: int) -> Result:
            c = chosen[prepared[i].plan.key]
            res = chosen_result(prepared[i], c, options, seed, svd, power_iters)
            res.extra["why"] = why[i]
            return res
        return _map(rebuild, list(range(len(prepared))), workers)
    finally:
        bar.close()
