"""A batch's distinct ids in no particular order, on the CPU, through a map from id to position.

Serving from the end table (:class:`fpd_convert.kernels.cpu_tt.EndTable`) takes ids in any order,
so it needs no sort: each id's position is written into a scratch array indexed by id, and the
positions that survived are one per distinct id.  Whichever duplicate's write wins, exactly one
position of each id reads its own value back, so the result does not depend on the order numpy
writes repeated indices in.  A second write gives each distinct id its rank, read back as the
inverse.  Four passes over the batch and none over the table's rows (the scratch array is never
cleared: only the slots of this batch's ids are written before they are read).

8,192 Zipf ids: 28 against 45 us for the sort (:func:`fpd_convert.kernels.cpu_sort.sort_with_positions`)
at 1M rows, 36 against 46 at 10M; at 40M rows and 65k ids the sort wins (the map no longer fits
the caches), hence :data:`MAX_ROWS`.  The scratch array is per thread (serving threads may share
a layer) and grows to the largest table asked, at 4 bytes a row.
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

import numpy as np

#: tables with more rows are deduplicated by a sort (the map would be 4 bytes a row, out of the caches)
MAX_ROWS = 1 << 23

_local = threading.local()
_POSITIONS = np.arange(1 << 16, dtype=np.int32)


def _arange(n: int) -> np.ndarray:
    """``np.arange(n)`` as int32, without a new array for the usual batch sizes."""
    return _POSITIONS[:n] if n <= _POSITIONS.size else np.arange(n, dtype=np.int32)


def _scratch(rows: int) -> np.ndarray:
    scratch = getattr(_local, "scratch", None)
    if scratch is None or scratch.size < rows:
        scratch = np.empty(rows, dtype=np.int32)  # never read before written
        _local.scratch = scratch
    return scratch


def distinct_ids(ids: np.ndarray, limit: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(distinct, inverse)`` with ``distinct[inverse] == ids``, ``distinct`` in no particular order
    and ``inverse`` int32; None where the map would not pay (``limit`` > :data:`MAX_ROWS`) or not fit
    (2**31 ids).  Ids outside ``[0, limit)`` raise ``IndexError``: a negative one from a check of the
    minimum, a large one from numpy's own bounds check of the first write, so that the caller needs
    no pass of its own over the batch for the range (min and max: 5-9 us for 8,192 ids)."""
    n = ids.size
    if limit > MAX_ROWS or n >= 1 << 31:
        return None
    if n and ids.min() < 0:  # numpy would count it from the end
        raise IndexError(f"index {ids.min()} is negative")
    scratch = _scratch(limit)[:limit]
    pos = _arange(n)
    scratch[ids] = pos  # raises IndexError for an id >= limit
    first = np.flatnonzero(scratch[ids] == pos)  # one surviving position per distinct id
    distinct = ids[first]
    scratch[distinct] = _arange(distinct.size)
    return distinct, scratch[ids]
