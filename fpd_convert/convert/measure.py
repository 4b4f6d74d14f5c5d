"""Compress, measuring a TT table against its source: the importance-weighted error on the evaluation
set (what candidates are compared by), the plain error on every row (or a sample of rows, for big
tables) of the chosen TT, and what low-precision cores add."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..checkpoints import TableTensors
from ..layers import TTEmbeddingBag
from ..tt import TTShape
from ..tt.importance import tt_positions, weighted_sq_error
from .importance import Reader, TableEval

EXACT_ERROR_ROWS = 20_000_000  # tables up to this many elements get their plain error on every row
#: candidates' rows: the whole TT table by one matrix product when it has at most this many rows per
#: evaluation row (one GEMM beats as many small products as rows), else row by row
WHOLE_TABLE_PER_ROW = 4


def layer_of(shape: TTShape, table: TableTensors, cls=TTEmbeddingBag) -> TTEmbeddingBag:
    """A frozen TT layer (``cls``: ``TTEmbeddingBag`` or ``TTEmbedding``) holding a decoded table."""
    layer = cls(shape.num_rows, shape.dim, rank=shape.ranks, row_factors=shape.row_factors,
                dim_factors=shape.dim_factors, _cores=table.cores)
    layer.load_table(table)
    return layer.requires_grad_(False)


def weighted_error_sq(layer: TTEmbeddingBag, ev: TableEval) -> float:
    """Squared importance-weighted relative error of ``layer`` on the evaluation set."""
    approx = layer.rows(torch.from_numpy(ev.ids)).numpy()
    err, ref = weighted_sq_error(ev.rows, approx, ev.weights)
    return err / ref if ref > 0 else err


@dataclass
class LayoutEval:
    """The evaluation rows as a layout's candidates are measured on: their TT positions (under the row map),
    their weights in the TT's part (0 for exact rows) and source rows, what the exact rows add (their stored
    values against the source's) and the weighted norm of the source rows."""

    positions: np.ndarray
    weights: np.ndarray
    rows: np.ndarray
    exact_sq: float
    norm_sq: float


def layout_eval(ev: TableEval, hot_ids: np.ndarray, exact_ids: np.ndarray,
                exact_stored: Optional[np.ndarray]) -> LayoutEval:
    """:class:`LayoutEval` of ``ev`` for a row map (``hot_ids``) and exact rows (sorted ``exact_ids``, their
    values as stored, decoded)."""
    is_exact = np.isin(ev.ids, exact_ids)
    weights = np.asarray(ev.weights, dtype=np.float64)
    norm_sq = float(weights @ np.einsum("ij,ij->i", ev.rows, ev.rows, dtype=np.float64))
    exact_sq = 0.0
    if is_exact.any():
        diff = ev.rows[is_exact] - exact_stored[np.searchsorted(exact_ids, ev.ids[is_exact])]
        exact_sq = float(weights[is_exact] @ np.einsum("ij,ij->i", diff, diff, dtype=np.float64))
    # the source rows are the evaluation set's own (one copy for every layout); the exact rows count by
    # exact_sq, so their weight in the TT's part is 0
    return LayoutEval(tt_positions(ev.ids, hot_ids), np.where(is_exact, 0.0, weights), ev.rows, exact_sq, norm_sq)


def tt_rows_at(cores: Sequence[np.ndarray], positions: np.ndarray) -> np.ndarray:
    """Rows at TT ``positions`` of the TT table with cores ``(r_{j-1}, n_j, d_j, r_j)`` (numpy, float32):
    the cores after the first contracted into one ``(n_2..n_k, r_1, d_2..d_k)`` end table, then each row
    the product of its first-core slice and its end-table slice, or all rows at once
    (:data:`WHOLE_TABLE_PER_ROW`)."""
    rf = [c.shape[1] for c in cores]
    d1, r1 = cores[0].shape[2], cores[0].shape[3]
    suffixes = int(np.prod(rf[1:]))
    end = cores[1]
    for c in cores[2:]:  # (r_1, n_2, d_2, ..., n_j, d_j, r_j)
        end = np.tensordot(end, c, axes=([end.ndim - 1], [0]))
    k = len(cores)
    # (r_1, n_2, d_2, ..., n_k, d_k) -> (n_2..n_k, r_1, d_2..d_k)
    perm = [1 + 2 * j for j in range(k - 1)] + [0] + [2 + 2 * j for j in range(k - 1)]
    end = end.reshape([r1] + [x for c in cores[1:] for x in c.shape[1:3]]).transpose(perm)
    first = cores[0].reshape(rf[0], d1, r1)
    i1, s = np.divmod(positions, suffixes)
    if rf[0] * suffixes <= WHOLE_TABLE_PER_ROW * positions.size:
        whole = first.reshape(-1, r1) @ np.ascontiguousarray(end.transpose(
            [k - 1] + list(range(k - 1)) + list(range(k, 2 * k - 1)))).reshape(r1, -1)  # (n_1 d_1, n_2.. d_2..)
        return whole.reshape(rf[0], d1, suffixes, -1)[i1, :, s, :].reshape(positions.size, -1)
    end = np.ascontiguousarray(end).reshape(suffixes, r1, -1)
    return (first[i1] @ end[s]).reshape(positions.size, -1)


def candidate_error_sq(cores: Sequence[np.ndarray], le: LayoutEval) -> float:
    """Squared importance-weighted relative error of a candidate (its cores as stored, decoded) on its
    layout's evaluation rows: what :func:`weighted_error_sq` gives, without building a layer."""
    diff = le.rows - tt_rows_at(cores, le.positions)
    err = float(le.weights @ np.einsum("ij,ij->i", diff, diff, dtype=np.float64)) + le.exact_sq
    return err / le.norm_sq if le.norm_sq > 0 else err


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


def core_dtype_added_error(shape: TTShape, table: TableTensors, fp32_cores, ev: TableEval,
                           weighted_error: float) -> float:
    """Weighted error of the stored (low-precision) cores minus that of the float32 cores."""
    fp32 = TableTensors([torch.from_numpy(np.ascontiguousarray(c)).float() for c in fp32_cores],
                        table.row_map, table.exact_ids, table.exact_rows)
    return weighted_error - math.sqrt(weighted_error_sq(layer_of(shape, fp32), ev))


def final_errors(result, reader: Reader, rows: int) -> Optional[float]:
    """The chosen result's plain error (into ``result.plain_error``) and, for low-precision cores, the
    weighted error they add (into its entry); returns the plain error.  Float32 cores without exact rows
    have TT-SVD's own exact error (a row map only permutes the rows TT-SVD saw), not measured again."""
    if result.layout.exact_ids.size == 0 and result.entry["core_dtype"] == "float32":
        result.plain_error = result.tt_error
    else:
        result.plain_error = plain_error(reader, rows, layer_of(result.shape, result.table))
    if "fp32_cores" in result.extra:
        result.entry["core_dtype_added_weighted_error"] = core_dtype_added_error(
            result.shape, result.table, result.extra["fp32_cores"], result.extra["ev"], result.weighted_error)
    return result.plain_error
