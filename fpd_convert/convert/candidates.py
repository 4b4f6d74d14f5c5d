"""Compress, per table: layouts, rank ladders and TTs, each decomposed, stored as it would be written, and
measured (the search under a budget: :mod:`fpd_convert.convert.search`).

A *layout* says which rows are kept exactly (the most important ones) and which are moved to the
leading TT rows (the next most important: the row map).  The table as TT-SVD sees it is the source
table with the row map applied and the exact rows zeroed; it is read through :class:`LayoutReader`,
so big tables still stream.  A *candidate* is a layout plus ranks: its file bytes are counted exactly
(every tensor the table writes, at its dtype) and its importance-weighted error is measured on the
evaluation set (:mod:`fpd_convert.convert.importance`).  Plain TT-SVD is the one layout with neither.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..allocator import return_freed_memory
from ..checkpoints import TableTensors, encode_table
from ..tt import TTDecomposition, TTShape, clamp_ranks, decompose_table, streaming_tt_svd
from ..tt import tt_param_count
from ..tt.core_quant import decode, element_bytes, encode
from ..tt.importance import row_map_moves, top_rows, tt_positions
from .importance import FidelityOptions, Prepared, Reader, TableEval, gather
from .measure import layer_of, weighted_error_sq
from .plan import TOL_MAX_RANK, svd_method

EXACT_FRACTIONS = (0.0, 0.001, 0.003, 0.01, 0.02)


@dataclass
class Layout:
    exact_ids: np.ndarray  # sorted
    hot_ids: np.ndarray  # most important first


@dataclass
class Result:
    layout: Layout
    shape: TTShape
    table: TableTensors  # decoded (what the layer computes with)
    entry: dict  # metadata fields for the table entry
    nbytes: int  # bytes of every file tensor of the table
    weighted_error: Optional[float]  # relative, importance-weighted, on the evaluation set (None: plain)
    weighted_sq: float = 0.0
    plain_error: float = 0.0
    tt_error: float = 0.0  # TT-SVD's own error on the table it saw (float32 cores)
    extra: dict = field(default_factory=dict)
    entry_for_file: Optional[dict] = None  # the table's whole file entry, once chosen and measured


def make_layout(importance: Optional[np.ndarray], exact_count: int, hot_count: int) -> Layout:
    if importance is None or (exact_count == 0 and hot_count == 0):
        return Layout(np.zeros(0, np.int64), np.zeros(0, np.int64))
    exact = np.sort(top_rows(importance, exact_count))
    return Layout(exact, top_rows(importance, hot_count, exclude=exact))


class LayoutReader:
    """Rows of the table TT-SVD sees: the row map applied, exact rows zeroed.  ``writable``: ``reader``
    returns arrays of its own (as :func:`fpd_convert.checkpoints.lazy_tables.row_reader` does), which
    are then changed in place instead of copied (a chunk of the table less at the peak)."""

    def __init__(self, reader: Reader, rows: int, layout: Layout, writable: bool = False):
        self.reader, self.writable = reader, writable
        src, pos = row_map_moves(layout.hot_ids)
        self.src_values = gather(reader, np.sort(src))[np.argsort(np.argsort(src))] if src.size else None
        order = np.argsort(pos)
        self.pos, self.src_order = pos[order], order
        self.zero = np.sort(tt_positions(layout.exact_ids, layout.hot_ids))

    def __call__(self, start: int, stop: int) -> np.ndarray:
        block = self.reader(start, stop)
        a, b = np.searchsorted(self.pos, [start, stop]) if self.pos.size else (0, 0)
        c, e = np.searchsorted(self.zero, [start, stop]) if self.zero.size else (0, 0)
        if (b > a or e > c) and not self.writable:
            block = np.array(block, dtype=np.float32, copy=True)  # never write into the source's rows
        if b > a or e > c:
            if b > a:
                block[self.pos[a:b] - start] = self.src_values[self.src_order[a:b]]
            block[self.zero[c:e] - start] = 0.0
        return block


def decompose(reader, rows: int, dim: int, row_factors: Sequence[int], dim_factors: Sequence[int],
              ranks: Optional[Sequence[int]], tol: Optional[float], path: str, seed: int = 0, svd: str = "auto",
              power_iters: int = 1, progress=None, whole=None, oversample: int = 10) -> TTDecomposition:
    """TT-SVD of the rows ``reader(start, stop)`` gives, in memory (TensorLy; ``whole`` if the
    caller has the table already) or streamed; ``progress(n)`` after each unit of work."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # clamped ranks show in the summary
        if path == "stream":
            return streaming_tt_svd(reader, rows, dim, row_factors, dim_factors, ranks=ranks, tol=tol,
                                    max_rank=TOL_MAX_RANK, oversample=oversample, power_iters=power_iters, seed=seed,
                                    progress=progress)
        table = whole if whole is not None else reader(0, rows)
        method = svd_method(rows, dim, row_factors, dim_factors, svd)
        kwargs = {"tol": tol} if tol is not None else {"rank": list(ranks)}
        dec = decompose_table(table, row_factors=row_factors, dim_factors=dim_factors, svd=method,
                              random_state=seed, **kwargs)
        if progress:
            progress(1)
        return dec


def finish(dec: TTDecomposition, layout: Layout, exact_values: Optional[np.ndarray], options: FidelityOptions,
           method: str, key: str, ev: Optional[TableEval]) -> Result:
    """Quantize, count bytes, measure the weighted error: a decomposition becomes a candidate."""
    shape = dec.shape
    cores = [decode(*encode(torch.from_numpy(np.ascontiguousarray(c)), options.core_dtype, axis=1), axis=1)
             for c in dec.cores]
    features = []
    if options.core_dtype != "float32":
        features.append("core_dtype")
    table = TableTensors(cores)
    if layout.hot_ids.size:
        features.append("row_map")
        table.row_map = torch.from_numpy(layout.hot_ids)
    if layout.exact_ids.size:
        features.append("exact_rows")
        table.exact_ids = torch.from_numpy(layout.exact_ids)
        table.exact_rows = decode(*encode(torch.from_numpy(exact_values), options.exact_dtype, axis=0), axis=0)
    entry = {"features": features, "core_dtype": options.core_dtype, "exact_dtype": options.exact_dtype,
             "importance": method, "row_map_rows": int(layout.hot_ids.size),
             "exact_rows": int(layout.exact_ids.size), "row_factors": shape.row_factors}
    nbytes = sum(t.numel() * t.element_size() for t in encode_table(key, entry, table).values())
    result = Result(layout, shape, table, entry, nbytes, None, tt_error=dec.relative_error)
    if ev is not None:
        result.weighted_sq = weighted_error_sq(layer_of(shape, table), ev)
        result.weighted_error = math.sqrt(result.weighted_sq)
        if options.core_dtype != "float32":  # kept to measure what the low-precision cores add
            result.extra["fp32_cores"] = dec.cores
            result.extra["ev"] = ev
    return result


def layout_of(p: Prepared, exact_fraction: float, hot: int):
    """``(layout, reader of the table TT-SVD sees, the exact rows' source values)`` of a layout of the table."""
    layout = make_layout(p.importance, int(round(exact_fraction * p.plan.rows)), hot)
    reader = (LayoutReader(p.reader, p.plan.rows, layout, writable=True) if layout.hot_ids.size or layout.exact_ids.size
              else p.reader)
    return layout, reader, (gather(p.reader, layout.exact_ids) if layout.exact_ids.size else None)


def fixed_layout_result(p: Prepared, options: FidelityOptions, exact_fraction: float, hot: int, ranks, tol, seed,
                        svd, power_iters, progress=None) -> Result:
    """The table in this layout at ``ranks`` (or ``tol``), measured on the whole evaluation set."""
    plan = p.plan
    layout, reader, exact_values = layout_of(p, exact_fraction, hot)
    whole = reader(0, plan.rows) if plan.path == "memory" else None
    dec = decompose(reader, plan.rows, plan.dim, plan.row_factors, plan.dim_factors, ranks, tol, plan.path, seed, svd,
                    power_iters, progress, whole)
    del whole, reader
    res = finish(dec, layout, exact_values, options, p.method, plan.key, p.ev)
    res.extra.update(exact_fraction=exact_fraction, hot_rows=hot)
    return_freed_memory()
    return res


def fixed_result(p: Prepared, options: FidelityOptions, tol, seed, svd, power_iters, progress=None) -> Result:
    """The table at its plan's ranks (or ``tol``), with the layout the options fix."""
    hot = 0 if p.importance is None else int(round(options.hot_fraction * p.plan.rows))
    exact = 0.0 if p.importance is None else options.exact_fraction or 0.0
    res = fixed_layout_result(p, options, exact, hot, p.plan.ranks, tol, seed, svd, power_iters, progress)
    res.extra["why"] = (f"ranks {','.join(map(str, res.shape.ranks[1:-1]))} as asked" +
                        ("" if p.importance is None else f"; row map of {res.entry['row_map_rows']:,} rows, "
                                                         f"{res.entry['exact_rows']:,} exact rows"))
    return res


def rank_ladder(row_factors, dim_factors, lo_params: int, hi_params: int) -> List[List[int]]:
    """Distinct clamped rank lists, uniform ranks 1..256, whose parameter count lies in [lo, hi]."""
    seen, out = set(), []
    for r in (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256):
        ranks = clamp_ranks(r, row_factors, dim_factors, warn=False)
        key = tuple(ranks)
        if key in seen:
            continue
        seen.add(key)
        if lo_params <= tt_param_count(row_factors, dim_factors, ranks) <= hi_params:
            out.append(ranks)
    return out


def layouts_for(p: Prepared, options: FidelityOptions, share: int):
    """The (exact fraction, hot rows) layouts a table offers under a budget share (a streamed table: its row
    map only; its layouts come from one sketch)."""
    n, d = p.plan.rows, p.plan.dim
    hot = int(round(options.hot_fraction * n))
    if options.exact_fraction is not None:
        fractions = [options.exact_fraction]
    else:
        per_row = 4 + d * element_bytes(options.exact_dtype) + (4 if options.exact_dtype == "int8" else 0)
        fractions = [f for f in EXACT_FRACTIONS if f * n * per_row <= 0.7 * share]
    hots = sorted({0, hot}) if p.plan.path != "stream" else [hot]
    return [(f, h) for f in fractions for h in hots]


def rank_ladder_for(p: Prepared, share: int, options: FidelityOptions):
    eb = element_bytes(options.core_dtype)
    ladder = rank_ladder(p.plan.row_factors, p.plan.dim_factors, share // (16 * eb), 2 * share // eb)
    if not ladder:  # the share is below every rank: offer the smallest
        ladder = rank_ladder(p.plan.row_factors, p.plan.dim_factors, 0, 1 << 62)[:1]
    if p.plan.path == "stream" and len(ladder) > 4:  # each streamed candidate is 4 passes over the table:
        # keep the 4 largest that fit the table's share (the allocation rarely goes far below it)
        fits = [r for r in ladder if tt_param_count(p.plan.row_factors, p.plan.dim_factors, r) * eb <= share]
        ladder = (fits or ladder[:1])[-4:]
    return ladder


class PassLines:
    """``progress(rows)`` for a streamed table when stderr is not a terminal: one line per pass over the
    table (``TT-SVD emb_l.0.weight: pass 3/16 over 10,000,000 rows, 41 s, ETA 3m25s``)."""

    def __init__(self, key: str, rows: int, passes: int):
        import time
        self.key, self.rows, self.passes, self.read, self.done = key, rows, passes, 0, 0
        self.clock, self.started = time.perf_counter, time.perf_counter()

    def __call__(self, n: int) -> None:
        self.read += n
        while self.read >= self.rows * (self.done + 1) and self.done < self.passes:
            self.done += 1
            spent = self.clock() - self.started
            left = spent / self.done * (self.passes - self.done)
            print(f"TT-SVD {self.key}: pass {self.done}/{self.passes} over {self.rows:,} rows, {spent:.0f} s, "
                  f"ETA {int(left // 60)}m{int(left % 60):02d}s", file=sys.stderr, flush=True)


def stream_progress(p: Prepared, decompositions: int, power_iters: int, progress: bool, position: int = 0):
    """What a streamed table reports its passes to: a bar on a terminal, :class:`PassLines` otherwise (None
    when there is no progress to show, or the table is not streamed)."""
    if not progress or p.plan.path != "stream":
        return None
    passes = decompositions * (2 + 2 * power_iters)
    if not sys.stderr.isatty():
        return PassLines(p.plan.key, p.plan.rows, passes)
    return tqdm(total=passes * p.plan.rows, unit="row", unit_scale=True, position=position + 1, leave=False,
                file=sys.stderr, desc=f"{p.plan.name} ({decompositions} streamed TT-SVD)")
