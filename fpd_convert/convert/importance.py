"""Compress, per table: how much each row matters, and the rows its errors are measured on.

Importance comes from lookup counts in a data sample (``data``) or from the weights alone (``norm``,
``drift``; :mod:`fpd_convert.tt.importance`); ``none`` is plain TT-SVD in natural row order.  The
*evaluation set* is the most important rows plus a uniform sample of the rest, weighted so that
its weighted squared error estimates the whole table's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..checkpoints import CheckpointError
from ..checkpoints.lazy_tables import row_reader
from ..tt.importance import importance_from, top_rows
from .plan import TablePlan

Reader = Callable[[int, int], np.ndarray]
IMPORTANCE_CHOICES = ("none", "auto", "data", "optimizer", "norm", "drift")
EVAL_TOP = 50_000  # most important rows always in the evaluation set
EVAL_SAMPLE = 20_000  # plus a uniform sample of the others


@dataclass
class FidelityOptions:
    importance: str = "auto"  # none | auto (data, else the optimizer's state, else norm) | data | optimizer | norm | drift
    hot_fraction: float = 0.02  # rows moved to the leading TT rows
    exact_fraction: Optional[float] = None  # rows kept exactly; None: chosen by the budget (0 with --rank/--tol)
    core_dtype: str = "float32"
    exact_dtype: str = "float32"

    def method(self, have_counts: bool, counts_from: str = "data") -> str:
        """The importance a table gets; ``counts_from``: what its counts are (``data``: lookup counts,
        ``optimizer``: the checkpoint's per-row optimizer accumulator)."""
        if self.importance not in IMPORTANCE_CHOICES:
            raise ValueError(f"importance should be one of {', '.join(IMPORTANCE_CHOICES)} but got "
                             f"{self.importance!r}")
        if self.importance == "auto":
            return counts_from if have_counts else "norm"
        if self.importance == "data" and not (have_counts and counts_from == "data"):
            raise ValueError("importance 'data' needs --data (a sample of training data)")
        if self.importance == "optimizer" and not (have_counts and counts_from == "optimizer"):
            raise ValueError("importance 'optimizer' needs the optimizer's state (Adagrad's sums or Adam's second "
                             "moments of the tables): in the checkpoint, as facebookresearch/dlrm saves it, or "
                             "apart with --optimizer-state FILE (e.g. TorchRec's KeyedOptimizer.state_dict())")
        return self.importance


@dataclass
class TableEval:
    """The rows errors are measured on, their weights and their source values."""

    ids: np.ndarray
    weights: np.ndarray
    rows: np.ndarray

    def subset(self, size: int, seed: int = 0) -> "TableEval":
        """At most ``size`` of these rows for comparing candidates: the heaviest half kept, a uniform sample
        of the others with their weights scaled up by what they stand for (an unbiased estimate of the
        same weighted sums)."""
        n = self.ids.size
        if n <= size:
            return self
        order = np.argsort(-self.weights, kind="stable")
        keep, rest = order[: size // 2], order[size // 2:]
        rng = np.random.default_rng(seed)
        drawn = rng.choice(rest, size=size - keep.size, replace=False)
        pick = np.sort(np.concatenate([keep, drawn]))
        weights = self.weights[pick].copy()
        weights[np.isin(pick, drawn)] *= rest.size / drawn.size
        return TableEval(self.ids[pick], weights, self.rows[pick])


@dataclass
class Prepared:
    """A table ready for its candidates: its plan, a row reader, row importance (None for plain TT-SVD)
    and the evaluation set (None for plain TT-SVD)."""

    plan: TablePlan
    reader: Reader
    importance: Optional[np.ndarray]
    method: str
    ev: Optional[TableEval]
    _candidate_ev: Optional[TableEval] = None

    def candidate_ev(self, size: int) -> Optional[TableEval]:
        """The evaluation set candidates are compared on (:meth:`TableEval.subset`, drawn once)."""
        if self.ev is not None and self._candidate_ev is None:
            self._candidate_ev = self.ev.subset(size)
        return self._candidate_ev


def row_norms(reader: Reader, rows: int, chunk: int = 1 << 15) -> np.ndarray:
    """Row L2 norms, read in chunks small enough that their float64 copy stays a few MB."""
    out = np.empty(rows, dtype=np.float64)
    for s in range(0, rows, chunk):
        out[s:s + chunk] = np.linalg.norm(reader(s, min(rows, s + chunk)).astype(np.float64), axis=1)
    return out


def gather(reader: Reader, ids: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
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


def evaluation_set(reader: Reader, importance: np.ndarray, seed: int = 0) -> TableEval:
    n = importance.shape[0]
    top = top_rows(importance, min(n, EVAL_TOP))
    others = np.ones(n, dtype=bool)
    others[top] = False
    rest = np.flatnonzero(others)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(rest, size=min(EVAL_SAMPLE, rest.size), replace=False)) if rest.size else rest
    ids = np.concatenate([top, sample]).astype(np.int64)
    weights = np.concatenate([importance[top], importance[sample] * (rest.size / max(sample.size, 1))])
    order = np.argsort(ids)
    ids, weights = ids[order], weights[order]
    return TableEval(ids, weights, gather(reader, ids))


def prepare(plan: TablePlan, weight, mapped: bool, options: FidelityOptions,
            counts: Optional[np.ndarray], counts_from: str = "data") -> Prepared:
    """Importance and evaluation set of one table (``counts``: its lookup counts if data was given, or
    its optimizer accumulator's row sums, ``counts_from="optimizer"``)."""
    reader = row_reader(weight, mapped)
    norms = row_norms(reader, plan.rows)  # one pass, which also finds a row with NaN or Inf before any SVD
    bad = np.flatnonzero(~np.isfinite(norms))
    if bad.size:
        raise CheckpointError(f"table {plan.key} has NaN or infinite values in {bad.size:,} of its {plan.rows:,} "
                              f"rows (the first: row {bad[0]:,}); its TT would be NaN: fix the checkpoint, or leave "
                              "the table out (--tables)")
    if options.importance == "none":
        return Prepared(plan, reader, None, "none", None)
    method = options.method(counts is not None, counts_from)
    imp = importance_from(norms, method, counts)
    return Prepared(plan, reader, imp, method, evaluation_set(reader, imp))
