"""Compress, per table: its plan, before any work.  The TT shape (row and dim factors), the ranks the
rank rule gives, the TT-SVD path and the peak memory it is expected to need.

Per table, ``auto`` keeps TensorLy's in-memory TT-SVD (the reference) for tables whose
expected peak (about 5.5x the table in float32: the float copy plus TensorLy's
reshapes and SVD workspace, 4.4x measured for its part) fits comfortably, and streams
the others (:mod:`fpd_convert.tt.streaming`).  Before starting, the expected peak
memory is stated, and ``workers`` is lowered if running that many tables at once
would not fit in the memory available.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

from ..tt import choose_row_factors, factor_dims, factor_rows, parse_suffix_rows, resolve_ranks, streaming_peak_bytes

SVD_PATHS = ("auto", "memory", "stream")
MEMORY_FACTOR = 5.5  # expected peak of the in-memory path / table bytes in float32
MEMORY_PATH_MAX = 2 << 30  # auto: tables whose in-memory peak would exceed this are streamed
# in-memory path: TensorLy's exact (truncated) SVD of the first unfolding costs about m * n * min(m, n)
# multiply-adds; above this the randomized one is used (0.2 s against 10.6 s for a 300k x 64 table in
# the long-first-core layout on one core, relative errors within 0.0004: docs/benchmarks.md)
EXACT_SVD_MAX_FLOPS = 2e9
TOL_MAX_RANK = 256
# what an importance-aware run holds beside the TT-SVD, per table (fitted to measured peaks of streamed
# 2M x 16, 2M x 64 and 10M x 64 tables: docs/benchmarks.md): importance, norms and layouts per row, and
# the moved and exact rows with their copies, a share of the table
IMPORTANCE_BYTES_PER_ROW = 40
STREAM_LAYOUTS = 5  # a streamed table's layouts at most (its exact-row fractions, one row map)
CANDIDATE_EVAL_ROWS = 16_384  # evaluation rows candidates are compared on (convert.search; the chosen: all)
IMPORTANCE_TABLE_SHARE = 0.3


@dataclass
class TablePlan:
    key: str
    name: str
    rows: int
    dim: int
    row_factors: List[int]
    dim_factors: List[int]
    ranks: Optional[List[int]]  # None in tolerance mode
    path: str
    peak_bytes: int
    held_bytes: int = 0  # what its candidates hold until the allocation is done (bases, sketches)


def memory_available() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")  # pragma: no cover


def svd_method(rows: int, dim: int, row_factors: Sequence[int], dim_factors: Sequence[int], svd: str = "auto") -> str:
    """The in-memory path's SVD: ``svd`` unless ``auto``, which takes TensorLy's exact SVD where the first
    (largest) unfolding's SVD is cheap and its randomized SVD elsewhere."""
    if svd != "auto":
        return svd
    m = row_factors[0] * dim_factors[0]
    n = math.prod(row_factors) * dim // m
    return "truncated_svd" if m * n * min(m, n) <= EXACT_SVD_MAX_FLOPS else "randomized_svd"


def plan_table(key: str, name: str, rows: int, dim: int, order: int = 3, rank=None, ratio=None,
               budget_bytes=None, tol=None, svd_path: str = "auto", oversample: int = 10,
               available: Optional[int] = None, dim_factors: Optional[Sequence[int]] = None,
               suffix_rows: Union[str, int, None] = "auto") -> TablePlan:
    """Shape, ranks, path and expected peak memory of one table's TT-SVD.

    ``dim_factors`` (their count sets the order) replaces the most balanced factorization of
    ``dim``; e.g. ``[2, 4, 8]`` for 64 makes CPU lookups ~1.5x faster (docs/benchmarks.md).
    ``suffix_rows``: ``"auto"`` (the byte-neutral long first core at the ranks the choice gives
    on the balanced shape, see :mod:`fpd_convert.tt.layout`; balanced in tolerance mode),
    ``"balanced"``, or the product of the trailing row factors (see :func:`factor_rows`)."""
    if svd_path not in SVD_PATHS:
        raise ValueError(f"svd path should be one of {', '.join(SVD_PATHS)} but got {svd_path!r}")
    if dim_factors is not None:
        df = [int(f) for f in dim_factors]
        if math.prod(df) != dim or min(df) < 1 or not 2 <= len(df) <= 4:
            raise ValueError(f"dim factors {df} should be 2 to 4 positive ints whose product is the dim of "
                             f"table {name} ({dim}) but multiply to {math.prod(df)}")
    else:
        df = factor_dims(dim, order)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # clamped ranks show in the summary
        reference = None
        if parse_suffix_rows(suffix_rows) == "auto" and tol is None and rank is None:
            # ratio or budget: the ranks they give on the balanced shape
            reference = resolve_ranks(rows, dim, factor_rows(rows, len(df)), df, rank, ratio, budget_bytes)
        rf = choose_row_factors(rows, df, rank if rank is not None else reference, suffix_rows)
        ranks = None if tol is not None else resolve_ranks(rows, dim, rf, df, rank, ratio, budget_bytes)
    memory_peak = int(MEMORY_FACTOR * rows * dim * 4)
    stream_rank = max(ranks) if ranks is not None else TOL_MAX_RANK
    stream_peak = streaming_peak_bytes(rows, dim, rf, df, stream_rank, oversample)
    path = svd_path
    if path == "auto":
        limit = MEMORY_PATH_MAX if available is None else min(MEMORY_PATH_MAX, available // 2)
        path = "memory" if memory_peak <= limit or len(rf) < 2 else "stream"
    return TablePlan(key, name, rows, dim, rf, df, ranks, path, memory_peak if path == "memory" else stream_peak)


def with_importance(plans: Sequence[TablePlan]) -> None:
    """Add what row importance holds to each plan's peak (compress with an importance)."""
    for p in plans:
        p.peak_bytes += int(IMPORTANCE_BYTES_PER_ROW * p.rows + IMPORTANCE_TABLE_SHARE * p.rows * p.dim * 4)
        if p.ranks is None:
            continue
        m = p.row_factors[0] * p.dim_factors[0]
        if p.path == "stream":  # its sketch: Q, and a B per layout
            cols = math.prod(p.row_factors[1:]) * (p.dim // p.dim_factors[0])
            width = min(m, cols, max(p.ranks) + 10)
            p.held_bytes = 4 * width * (m + STREAM_LAYOUTS * cols)
        else:  # per layout (two row maps): the first core's basis (the ladder's top rank ~1.5x the plan's),
            # the evaluation rows' positions and weights
            width = min(m, (3 * max(p.ranks)) // 2)
            p.held_bytes = 2 * STREAM_LAYOUTS * (4 * m * width + 16 * min(p.rows, CANDIDATE_EVAL_ROWS))


def affordable_workers(plans: Sequence[TablePlan], workers: int, available: int) -> int:
    """The most tables (<= ``workers``) that can run at once: the largest peaks must fit."""
    peaks = sorted((p.peak_bytes for p in plans), reverse=True)
    n = max(1, min(workers, len(plans)))
    while n > 1 and sum(peaks[:n]) > 0.8 * available:
        n -= 1
    return n


def workers_for_cpus(workers: int, cpus: int) -> tuple:
    """``(workers, note)``: no more workers than CPU threads (each worker's TT-SVD then gets
    ``cpus // workers`` of them); ``note`` says why when fewer than asked."""
    if workers <= cpus:
        return workers, ""
    return max(1, cpus), (f"{workers} workers asked for, {cpus} CPU thread(s) here: more would only share them "
                          f"(--threads to change)")


def planned_peak(plans: Sequence[TablePlan], workers: int) -> int:
    """The memory the run is expected to add at its peak: the ``workers`` largest tables' peaks at once, beside
    what every table's candidates hold until the allocation."""
    return sum(sorted((p.peak_bytes for p in plans), reverse=True)[:workers]) + sum(p.held_bytes for p in plans)


def describe(plans: Sequence[TablePlan], workers: int, available: int, note: str = "") -> str:
    from ..reporting.tables import format_bytes
    streamed = sum(p.path == "stream" for p in plans)
    peak = planned_peak(plans, workers)
    return (f"TT-SVD of {len(plans)} table(s): {streamed} streamed in row chunks, {len(plans) - streamed} in memory\n"
            f"expected peak memory {format_bytes(peak)} with {workers} worker(s) (available: {format_bytes(available)})"
            + (f"\n{note}" if note else ""))
