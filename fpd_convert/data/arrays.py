"""Pre-processed Criteo arrays: facebookresearch/dlrm ``.npz`` and TorchRec ``day_N_*.npy``.

- dlrm ``.npz`` (``dlrm_data_pytorch.py`` processed files): ``X_int`` (N, 13) raw counts,
  ``X_cat`` (N, 26) row ids already indexed, ``y`` (N,), ``counts`` (26,) table sizes.
- TorchRec numpy days: ``day_N_dense.npy`` (N, 13), ``day_N_sparse.npy`` (N, 26) row ids,
  ``day_N_labels.npy`` (N,) or (N, 1); opened memory-mapped, so larger-than-RAM days stream.

The dense transform (default ``log(1 + max(x, 0))``) is applied when batches are made;
use ``none`` for arrays that were already transformed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np

from ..paths import not_a_file
from .batch import NUM_DENSE, Batch, make_batch
from .criteo_text import DataError


def load_arrays(path) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(dense, sparse, labels, counts or None) for a ``.npz`` file or a ``day_N_*.npy`` prefix/file."""
    path = Path(path)
    if path.suffix == ".npz":
        if (reason := not_a_file(path)):
            raise DataError(f"{path}: {reason}")
        try:
            z = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path}: not a readable .npz file ({e})") from None
        missing = {"X_int", "X_cat", "y"} - set(z.files)
        if missing:
            raise DataError(f"{path}: a dlrm .npz needs X_int, X_cat and y; missing {sorted(missing)}")
        try:
            counts = z["counts"] if "counts" in z.files else None
            return z["X_int"], z["X_cat"], z["y"], counts
        except (ValueError, OSError, EOFError) as e:  # a damaged member (zlib, a truncated array)
            raise DataError(f"{path}: a damaged .npz ({type(e).__name__}: {e})") from None
    stem = str(path)
    for suffix in ("_dense.npy", "_sparse.npy", "_labels.npy"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    parts = []
    for suffix in ("_dense.npy", "_sparse.npy", "_labels.npy"):
        p = Path(stem + suffix)
        if not p.is_file():
            raise DataError(f"{p}: no such file (TorchRec days come as {Path(stem).name}_dense/_sparse/_labels.npy)")
        try:
            parts.append(np.load(p, mmap_mode="r", allow_pickle=False))
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{p}: not a readable .npy array ({e})") from None
    labels = parts[2].reshape(-1) if parts[2].ndim == 2 and parts[2].shape[1] == 1 else parts[2]
    return parts[0], parts[1], labels, None


def check_arrays(path, dense, sparse, labels, table_rows, max_rows: Optional[int] = None) -> None:
    """Refuse arrays that would train or score wrongly, with a message naming the problem: shapes, dtypes,
    lengths that differ, no rows, labels other than 0/1, non-finite dense values, ids that are negative
    or beyond the model's tables.  Only the first ``max_rows`` rows are read when given."""
    for name, a, ndim in (("dense (X_int)", dense, 2), ("sparse (X_cat)", sparse, 2)):
        if a.ndim != ndim:
            raise DataError(f"{path}: {name} should be a 2-D array (rows x features) but has shape {a.shape}")
    if labels.ndim != 1:
        raise DataError(f"{path}: labels (y) should be one per row but have shape {labels.shape}")
    if not (len(dense) == len(sparse) == len(labels)):
        raise DataError(f"{path}: dense, sparse and labels have {len(dense)}, {len(sparse)} and {len(labels)} rows; "
                        "they should have the same number")
    if len(labels) == 0:
        raise DataError(f"{path}: the data has no rows")
    if dense.shape[1] != NUM_DENSE:
        raise DataError(f"{path}: dense features have {dense.shape[1]} columns, expected {NUM_DENSE}")
    if sparse.shape[1] != len(table_rows):
        raise DataError(f"{path}: {sparse.shape[1]} categorical features but the model has {len(table_rows)} tables")
    if not np.issubdtype(sparse.dtype, np.integer):
        raise DataError(f"{path}: categorical ids should be integers but are {sparse.dtype}")
    n = len(labels) if max_rows is None else min(len(labels), max_rows)
    for s in range(0, n, 1 << 20):  # in slices: memory-mapped days may not fit in memory
        e = min(s + (1 << 20), n)
        d, c, y = np.asarray(dense[s:e]), np.asarray(sparse[s:e]), np.asarray(labels[s:e])
        if np.issubdtype(d.dtype, np.floating) and not np.isfinite(d).all():
            row = s + int(np.flatnonzero(~np.isfinite(d).all(axis=1))[0])
            raise DataError(f"{path}: dense features hold NaN or infinite values (first in row {row:,})")
        bad = (y != 0) & (y != 1)
        if bad.any():
            row = s + int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: labels should be 0 or 1 but row {row:,} has {y[row - s]}")
        low = c.min(axis=0)
        if (low < 0).any():
            f = int(np.flatnonzero(low < 0)[0])
            raise DataError(f"{path}: feature {f} has a negative id ({int(low[f])}); ids index table rows from 0")
        top = c.max(axis=0)
        over = [(f, int(m), r) for f, (m, r) in enumerate(zip(top, table_rows)) if m >= r]
        if over:
            f, m, r = over[0]
            raise DataError(f"{path}: feature {f} has id {m} but the model's table {f} has {r} rows "
                            f"({len(over)} features do not fit); was the data made for another model?")


def iter_arrays(dense, sparse, labels, batch_size: int, dense_transform: str = "log", shard: int = 0,
                num_shards: int = 1, max_rows: Optional[int] = None) -> Iterator[Batch]:
    """Batches of consecutive rows (row slices of memory-mapped arrays are read lazily)."""
    n = len(labels) if max_rows is None else min(len(labels), max_rows)
    if dense.shape[1] != NUM_DENSE:
        raise DataError(f"dense features have {dense.shape[1]} columns, expected {NUM_DENSE}")
    starts = range(0, n, batch_size)
    for b, s in enumerate(starts):
        if b % num_shards != shard:
            continue
        e = min(s + batch_size, n)
        yield make_batch(np.asarray(dense[s:e], np.float64), np.asarray(sparse[s:e]), np.asarray(labels[s:e]),
                         dense_transform)
