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
        counts = z["counts"] if "counts" in z.files else None
        return z["X_int"], z["X_cat"], z["y"], counts
    stem = str(path)
    for suffix in ("_dense.npy", "_sparse.npy", "_labels.npy"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    parts = []
    for suffix in ("_dense.npy", "_sparse.npy", "_labels.npy"):
        p = Path(stem + suffix)
        if not p.is_file():
            raise DataError(f"{p}: no such file (TorchRec days come as {Path(stem).name}_dense/_sparse/_labels.npy)")
        parts.append(np.load(p, mmap_mode="r", allow_pickle=False))
    return parts[0], parts[1], parts[2].reshape(-1), None


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
