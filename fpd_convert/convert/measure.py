"""Compress, measuring a TT table against its source: the importance-weighted error on the evaluation
set (what candidates are compared by), the plain error on every row (or a sample of rows, for big
tables) of the chosen TT, and what low-precision cores add."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..checkpoints import TableTensors
from ..layers import TTEmbeddingBag
from ..tt import TTShape
from ..tt.importance import weighted_sq_error
from .importance import Reader, TableEval

EXACT_ERROR_ROWS = 20_000_000  # tables up to this many elements get their plain error on every row


def layer_of(shape: TTShape, table: TableTensors) -> TTEmbeddingBag:
    """A frozen TT layer holding a decoded table."""
    layer = TTEmbeddingBag(shape.num_rows, shape.dim, rank=shape.ranks, row_factors=shape.row_factors,
                           dim_factors=shape.dim_factors, _cores=table.cores)
    layer.load_table(table)
    return layer.requires_grad_(False)


def weighted_error_sq(layer: TTEmbeddingBag, ev: TableEval) -> float:
    """Squared importance-weighted relative error of ``layer`` on the evaluation set."""
    approx = layer.rows(torch.from_numpy(ev.ids)).numpy()
    err, ref = weighted_sq_error(ev.rows, approx, ev.weights)
    return err / ref if ref > 0 else err


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
