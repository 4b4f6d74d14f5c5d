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
from .candidates import EXACT_FRACTIONS, Result, fixed_result, stream_progress
from .search import table_search
from .importance import FidelityOptions, Prepared

REFINE_ROUNDS = 4  # the allocation's choices settle in 2-3 rounds on the demo and the fidelity set


def _map(fn, items, workers: int):
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # numpy/torch release the GIL in their kernels
        return list(pool.map(fn, items))


def _why(p: Prepared, chosen, candidates, share: int) -> str:
    got, cheapest = chosen.extra, min(candidates, key=lambda x: x.nbytes)
    return (f"{len(candidates)} candidates measured (row map or not, {len(EXACT_FRACTIONS)} exact-row fractions at "
            f"most, ranks around its size share of {share:,} B); chosen: ranks {','.join(map(str, got['ranks'][1:-1]))}, "
            f"{got['row_map_rows']:,} map + {got['exact_rows']:,} exact rows, {chosen.nbytes:,} B, "
            f"weighted error {chosen.error ** 0.5:.4f} as compared (the cheapest candidate: {cheapest.nbytes:,} B, "
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
            out = table_search(prepared[i], shares[i], options, seed, svd, power_iters, progress, i % max(workers, 1))
            bar.update(1)
            done.append(i)
            if progress and bar.disable:  # not a terminal (a batch job's log): one line per table
                plan = prepared[i].plan
                print(f"TT-SVD {len(done)}/{len(prepared)}: {plan.key} ({plan.rows:,} x {plan.dim}), "
                      f"{len(out.candidates)} candidates in {time.perf_counter() - started:.1f} s", file=sys.stderr,
                      flush=True)
            return out
        searches = _map(offer, list(range(len(prepared))), workers)
        keys = [p.plan.key for p in prepared]
        chosen = allocate({k: s.candidates for k, s in zip(keys, searches)}, budget)
        for _ in range(REFINE_ROUNDS):  # the rungs around each choice, until the choices settle
            if not sum(_map(lambda i: searches[i].refine(chosen[keys[i]]), list(range(len(prepared))), workers)):
                break
            chosen = allocate({k: s.candidates for k, s in zip(keys, searches)}, budget)
        why = [_why(p, chosen[k], s.candidates, share) for p, k, s, share in zip(prepared, keys, searches, shares)]

        def rebuild(i: int) -> Result:
            res = searches[i].result(chosen[keys[i]])
            searches[i] = None  # its layouts' bases and evaluation rows
            res.extra["why"] = why[i]
            return res
        return _map(rebuild, list(range(len(prepared))), workers)
    finally:
        bar.close()
