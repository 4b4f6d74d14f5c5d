"""Row importance and the layout it implies: exact rows, and a hot-row map.

A trained table is far from uniform: a few rows are looked up most of the time and
have drifted from their small initialization, most were rarely or never seen.  Plain
TT-SVD spends its capacity on the table in its natural row order; here the most
important rows are either kept exactly, or moved to the leading TT indices (where the
first core's leading slices serve them alone), and errors are weighted by importance.

Importance comes from the data (lookup counts), from the checkpoint's optimizer state
(``optimizer``: the square root of a row's sum of Adagrad's squared-gradient accumulator, or of Adam's
second moment, which only rows that were looked up gather: the root damps the few rows whose gradients
were large, and ranks rows as the sum does), or from the weights alone: ``norm`` (row L2 norm) or ``drift`` (how far a row's norm lies above the bulk of
rows that kept their initialization: robust z-score against the median and MAD).

The row map is a partial permutation stored as the hot ids alone: hot row ``h_k``
goes to TT row ``k``; the rows that were at TT rows ``0..H-1`` and are not hot go,
in order, to the positions the hot rows left (those ``>= H``); every other row stays.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

IMPORTANCE_METHODS = ("data", "optimizer", "norm", "drift")


def drift_scores(norms: np.ndarray) -> np.ndarray:
    """Robust z-score of row norms above the bulk (median, MAD); 0 for rows at or below it."""
    norms = np.asarray(norms, dtype=np.float64)
    med = float(np.median(norms))
    mad = float(np.median(np.abs(norms - med))) * 1.4826
    return np.maximum(norms - med, 0.0) / (mad + 1e-12 * max(med, 1e-30) + 1e-30)


def importance_from(norms: np.ndarray, method: str, counts: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-row importance (>= 0) by ``method``; ``data`` needs ``counts``, ties broken by norm."""
    norms = np.asarray(norms, dtype=np.float64)
    if method == "norm":
        return norms
    if method == "drift":
        return drift_scores(norms)
    if method in ("data", "optimizer"):  # counts: lookup counts, or the optimizer's per-row accumulator
        if counts is None:
            raise ValueError(f"importance {method!r} needs per-row counts")
        counts = np.asarray(counts, dtype=np.float64)
        if method == "optimizer":
            # sum of squared gradients -> its root: at --ratio 50 on our dlrm models (docs/benchmarks.md)
            # Adam -0.0001 AUC instead of -0.0027, Adagrad -0.0000 instead of -0.0004
            counts = np.sqrt(np.maximum(counts, 0.0))
        if counts.shape != norms.shape:
            raise ValueError(f"the {method} counts cover {counts.shape[0]} rows but the table has {norms.shape[0]}")
        # a tiny share of the norm orders rows that were never looked up (or equally often)
        top = max(float(norms.max()), 1e-30)
        return counts + 1e-3 * norms / top
    raise ValueError(f"importance should be one of {', '.join(IMPORTANCE_METHODS)} but got {method!r}")


def top_rows(importance: np.ndarray, count: int, exclude: Optional[np.ndarray] = None) -> np.ndarray:
    """Ids of the ``count`` most important rows, most important first (ties: lower id first)."""
    imp = np.asarray(importance, dtype=np.float64)
    if exclude is not None and len(exclude):
        imp = imp.copy()
        imp[exclude] = -np.inf
    count = int(min(max(count, 0), imp.shape[0] - (0 if exclude is None else len(exclude))))
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-imp, count - 1)[:count]
    return part[np.lexsort((part, -imp[part]))].astype(np.int64)


def row_map_moves(hot_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(rows, positions)``: every row the map moves and the TT row it goes to."""
    hot = np.asarray(hot_ids, dtype=np.int64)
    h = hot.shape[0]
    displaced = np.setdiff1d(np.arange(h, dtype=np.int64), hot)  # sorted
    vacated = np.sort(hot[hot >= h])
    return np.concatenate([hot, displaced]), np.concatenate([np.arange(h, dtype=np.int64), vacated])


def tt_positions(ids: np.ndarray, hot_ids: np.ndarray) -> np.ndarray:
    """TT rows of table rows ``ids`` under the row map of ``hot_ids``."""
    rows, pos = row_map_moves(hot_ids)
    out = np.asarray(ids, dtype=np.int64).copy()
    if rows.size:
        order = np.argsort(rows)
        rows, pos = rows[order], pos[order]
        at = np.clip(np.searchsorted(rows, out), 0, rows.size - 1)
        hit = rows[at] == out
        out[hit] = pos[at[hit]]
    return out


def weighted_sq_error(rows: np.ndarray, approx: np.ndarray, weights: np.ndarray) -> Tuple[float, float]:
    """``(sum_i w_i ||W_i - What_i||^2, sum_i w_i ||W_i||^2)`` over the given rows."""
    w = np.asarray(weights, dtype=np.float64)
    diff = (np.asarray(rows, dtype=np.float64) - np.asarray(approx, dtype=np.float64))
    return float(w @ np.sum(diff ** 2, axis=1)), float(w @ np.sum(np.asarray(rows, dtype=np.float64) ** 2, axis=1))
