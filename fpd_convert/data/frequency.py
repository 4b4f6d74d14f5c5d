"""Lookup counts per table row from a sample of training data (any format the readers take)."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from .dataset import CriteoData


def lookup_counts(path, table_rows: Sequence[int], max_rows: Optional[int] = 1_000_000,
                  batch_size: int = 65_536) -> List[np.ndarray]:
    """``counts[f][i]``: how often row ``i`` of table ``f`` is looked up in the first
    ``max_rows`` samples of ``path`` (one categorical feature per table, in order)."""
    counts = [np.zeros(n, dtype=np.int64) for n in table_rows]
    for batch in CriteoData(path, table_rows, batch_size=batch_size, max_rows=max_rows):
        sparse = batch.sparse.numpy()
        for f, n in enumerate(table_rows):
            counts[f] += np.bincount(sparse[:, f], minlength=n)
    return counts
