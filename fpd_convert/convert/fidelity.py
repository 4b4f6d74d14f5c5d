"""Importance-aware compression of one table: layout, decomposition, exact bytes, errors.

A *layout* says which rows are kept exactly (the most important ones, ``exact``) and
which are moved to the leading TT rows (the next most important, ``hot``: the row
map).  The table as TT-SVD sees it is the source table with the row map applied and
the exact rows zeroed; it is read through :class:`LayoutReader`, so big tables still
stream.  A *candidate* is a layout plus ranks: its file bytes are counted exactly
(every tensor the table writes) and its errors are measured on an evaluation set
(the most important rows plus a uniform sample of the rest, weighted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ..checkpoints import TableTensors, encode_table
from ..layers import TTEmbeddingBag
from ..tt import TTShape, clamp_ranks
from ..tt.core_quant import decode, encode
from ..tt.importance import top_rows, tt_positions, weighted_sq_error

Reader = Callable[[int, int], np.ndarray]
IMPORTANCE_CHOICES = ("none", "auto", "data", "norm", "drift")
EVAL_TOP = 50_000  # most important rows always in the evaluation set
EVAL_SAMPLE = 20_000  # plus a uniform sample of the others
EXACT_ERROR_ROWS = 20_000_000  # tables up to this many elements get their plain error on every row


@dataclass
class FidelityOptions:
    importance: str = "auto"  # none | auto (data if counts are given, else norm) | data | norm | drift
    hot_fraction: float = 0.02  # rows moved to the leading TT rows
    exact_fraction: Optional[float] = None  # rows kept exactly; None: chosen by the budget (0 with --rank/--tol)
    core_dtype: str = "float32"
    exact_dtype: str = "float32"

    def method(self, have_counts: bool) -> str:
        if self.importance not in IMPORTANCE_CHOICES:
            raise ValueError(f"importance should be one of {', '.join(IMPORTANCE_CHOICES)} but got "
                             f"{self.importance!r}")
        if self.importance == "auto":
            return "data" if have_counts else "norm"
        if self.importance == "data" and not have_counts:
            raise ValueError("importance 'data' needs --data (a sample of training data)")
        return self.importance


@dataclass
class Layout:
    exact_ids: np.ndarray  # sorted
    hot_ids: np.ndarray  # most important first


@dataclass
class TableEval:
    """The rows errors are measured on, their weights and their source values."""

    ids: np.ndarray
    weights: np.ndarray
    rows: np.ndarray


@dataclass
class Result:
    layout: Layout
    shape: TTShape
    table: TableTensors  # decoded (what the layer computes with)
    entry: dict  # metadata fields for the table entry
    nbytes: int  # bytes of every file tensor of the table
    weighted_error: float  # relative, importance-weighted, on the evaluation set
    weighted_sq: float = 0.0
    plain_error: float = 0.0
    tt_error: float = 0.0  # TT-SVD's own error on the table it saw (float32 cores)
    extra: dict = field(default_factory=dict)


def row_norms(reader: Reader, rows: int, chunk: int = 1 << 18) -> np.ndarray:
    out = np.empty(rows, dtype=np.float64)
    for s in range(0, rows, chunk):
        out[s:s + chunk] = np.linalg.norm(reader(s, min(rows, s + chunk)).astype(np.float64), axis=1)
    return out


def make_layout(importance: np.ndarray, exact_count: int, hot_count: int) -> Layout:
    exact = np.sort(top_rows(importance, exact_count))
    hot = top_rows(importance, hot_count, exclude=exact)
    return Layout(exact, hot)


def evaluation_set(reader: Reader, importance: np.ndarray, seed: int = 0) -> TableEval:
    n = importance.shape[0]
    top = top_rows(importance, min(n, EVAL_TOP))
    rest = np.setdiff1d(np.arange(n), top)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(rest, size=min(EVAL_SAMPLE, rest.size), replace=False)) if rest.size else rest
    ids = np.concatenate([top, sample]).astype(np.int64)
    weights = np.concatenate([importance[top], importance[sample] * (rest.size / max(sample.size, 1))])
    order = np.argsort(ids)
    ids, weights = ids[order], weights[order]
    rows = _gather(reader, ids)
    return TableEval(ids, weights, rows)


def _gather(reader: Reader, ids: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Rows ``ids`` (sorted) read in contiguous chunks."""
    out = []
    start = 0
    while start < ids.size:
        lo = int(ids[start])
        hi = lo + chunk
        stop = int(np.searchsorted(ids, hi))
        block = reader(lo, min(hi, int(ids[stop - 1]) + 1))
        out.append(block[ids[start:stop] - lo])
        start = stop
    return np.concatenate(out)


class LayoutReader:
    """Rows of the table TT-SVD sees: the row map applied, exact rows zeroed."""

    def __init__(self, reader: Reader, rows: int, layout: Layout):
        from ..tt.importance import row_map_moves
        self.reader = reader
        src, pos = row_map_moves(layout.hot_ids)
        self.src_values = _gather(reader, np.sort(src))[np.argsort(np.argsort(src))] if src.size else None
        order = np.argsort(pos)
        self.pos, self.src_order = pos[order], order
        self.zero = np.sort(tt_positions(layout.exact_ids, layout.hot_ids))

    def __call__(self, start: int, stop: int) -> np.ndarray:
        block = self.reader(start, stop)
        a, b = np.searchsorted(self.pos, [start, stop]) if self.pos.size else (0, 0)
        c, e = np.searchsorted(self.zero, [start, stop]) if self.zero.size else (0, 0)
        if b > a or e > c:
            block = np.array(block, dtype=np.float32, copy=True)  # never write into the source's rows
            if b > a:
                block[self.pos[a:b] - start] = self.src_values[self.src_order[a:b]]
            block[self.zero[c:e] - start] = 0.0
        return block


def finish(dec, layout: Layout, exact_values: Optional[np.ndarray], options: FidelityOptions, method: str,
           key: str, ev: Optional[TableEval], plain: Optional[Tuple[Reader, int]] = None) -> Result:
    """Quantize, count bytes, measure errors: a decomposition becomes a candidate/result."""
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
    files = encode_table(key, entry, table)
    nbytes = sum(t.numel() * t.element_size() for t in files.values())
    layer = layer_of(shape, table)
    result = Result(layout, shape, table, entry, nbytes, 0.0, tt_error=dec.relative_error)
    if ev is not None:
        result.weighted_sq = _weighted(layer, ev)
        result.weighted_error = math.sqrt(result.weighted_sq)
        if options.core_dtype != "float32":  # kept to measure what the low-precision cores add
            result.extra["fp32_cores"] = dec.cores
            result.extra["ev"] = ev
    if plain is not None:
        result.plain_error = plain_error(plain[0], plain[1], layer)
    return result


def _weighted(layer: TTEmbeddingBag, ev: TableEval) -> float:
    approx = layer.rows(torch.from_numpy(ev.ids)).numpy()
    err, ref = weighted_sq_error(ev.rows, approx, ev.weights)
    return err / ref if ref > 0 else err


def core_dtype_added_error(result: Result) -> Optional[float]:
    """Weighted error of the stored (low-precision) cores minus that of the float32 cores."""
    if "fp32_cores" not in result.extra:
        return None
    t = result.table
    fp32 = TableTensors([torch.from_numpy(np.ascontiguousarray(c)).float() for c in result.extra["fp32_cores"]],
                        t.row_map, t.exact_ids, t.exact_rows)
    added = result.weighted_error - math.sqrt(_weighted(layer_of(result.shape, fp32), result.extra["ev"]))
    result.entry["core_dtype_added_weighted_error"] = added
    return added


def layer_of(shape: TTShape, table: TableTensors) -> TTEmbeddingBag:
    """A frozen TT layer holding a decoded table (for measuring errors)."""
    layer = TTEmbeddingBag(shape.num_rows, shape.dim, rank=shape.ranks, row_factors=shape.row_factors,
                           dim_factors=shape.dim_factors, _cores=table.cores)
    layer.load_table(table)
    return layer.requires_grad_(False)


def plain_error(reader: Reader, rows: int, layer: TTEmbeddingBag, chunk: int = 1 << 16, seed: int = 0) -> float:
    """``||W - W_hat|| / ||W||`` on every row (tables up to EXACT_ERROR_ROWS elements) or on a
    uniform sample of rows (bigger tables)."""
    if rows * layer.embedding_dim <= EXACT_ERROR_ROWS:
        starts = [(s, min(rows, s + chunk)) for s in range(0, rows, chunk)]
    else:
        rng = np.random.default_rng(seed)
        starts = [(int(s), min(rows, int(s) + 256)) for s in rng.choice(max(rows - 256, 1), 400, replace=False)]
    num = den = 0.0
    for a, b in starts:
        w = reader(a, b).astype(np.float64)
        approx = layer.rows(torch.arange(a, b)).double().numpy()
        num += float(np.sum((w - approx) ** 2))
        den += float(np.sum(w ** 2))
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def rank_ladder(row_factors, dim_factors, lo_params: int, hi_params: int) -> List[List[int]]:
    """Distinct clamped rank lists, uniform ranks 1..256, whose parameter count lies in [lo, hi]."""
    from ..tt import tt_param_count
    seen, out = set(), []
    for r in (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 256):
        ranks = clamp_ranks(r, row_factors, dim_factors, warn=False)
        key = tuple(ranks)
        if key in seen:
            continue
        seen.add(key)
        p = tt_param_count(row_factors, dim_factors, ranks)
        if lo_params <= p <= hi_params:
            out.append(ranks)
    return out
