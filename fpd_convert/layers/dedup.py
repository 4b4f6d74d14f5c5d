"""A batch's distinct ids and the inverse map: where every TT lookup starts.

A TT table computes each distinct row of a batch once (a row costs a chain of small products),
so a lookup first deduplicates its ids.  On the CPU the ids are sorted together with their
positions (:func:`fpd_convert.kernels.cpu_sort.sort_with_positions`), or, where the rows may come
in any order (the cached end table), mapped without a sort
(:func:`fpd_convert.kernels.cpu_dedup.distinct_ids`).  On a GPU the dedup is launched without a
host sync (:func:`dedup_launch`) and finished once its count and range are read
(:func:`dedup_finish`), so that :class:`fpd_convert.layers.grouped.GroupedLookups` can read those
of every table in one sync.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..kernels.cpu_dedup import distinct_ids
from ..kernels.cpu_sort import sort_with_positions


def device_dedup(input: torch.Tensor) -> bool:
    """Whether a bag lookup of ``input`` dedups on its device (a GPU) with :func:`dedup_launch` rather
    than with numpy on the host (the tests switch it on for CPU tensors, to run the GPU's steps)."""
    return input.device.type != "cpu"


def sort_keys(flat: torch.Tensor, limit: int) -> torch.Tensor:
    """Ids as sort keys: int32 on a GPU where they fit (a radix sort of half the passes of int64;
    65k ids on an H100: ``torch.unique`` 0.14 vs 0.18 ms)."""
    if flat.device.type != "cpu" and limit <= 1 << 31 and flat.dtype == torch.int64:
        return flat.int()
    return flat


def unique_sorted(flat: torch.Tensor, limit: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sorted distinct values and the inverse map, for ids already checked to be in ``[0, limit)``."""
    if flat.device.type != "cpu" or flat.numel() == 0:
        uniq, inverse = torch.unique(sort_keys(flat, limit), return_inverse=True)
        return uniq.to(flat.dtype), inverse
    ids = flat.numpy()
    found = sort_with_positions(ids, limit)
    if found is None:  # the key would overflow: plain unique
        uniq, inverse = np.unique(ids, return_inverse=True)
        return torch.from_numpy(uniq.astype(np.int64, copy=False)), torch.from_numpy(inverse.reshape(-1)).long()
    values, pos = found
    n = ids.size
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(values[1:], values[:-1], out=first[1:])
    inverse = np.empty(n, dtype=np.int64)
    inverse[pos] = first.cumsum() - 1
    return torch.from_numpy(values[first]), torch.from_numpy(inverse)


def unique_any_order(flat: torch.Tensor, limit: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(distinct ids in no particular order, int32 inverse)`` of CPU ids without a sort, or None where
    the map does not pay (a table over ``cpu_dedup.MAX_ROWS`` rows) or an id is out of range (the
    caller's range check then says which)."""
    try:
        found = distinct_ids(flat.numpy(), limit)
    except IndexError:
        return None
    if found is None:
        return None
    return torch.from_numpy(found[0].astype(np.int64, copy=False)), torch.from_numpy(found[1])


class Dedup(NamedTuple):
    """A device dedup launched by :func:`dedup_launch` whose host values are not read yet."""
    keys: torch.Tensor  # sorted ids (sort keys)
    perm: torch.Tensor  # sorted position -> input position
    run: torch.Tensor  # 1-based run of each sorted id
    head: torch.Tensor  # int64 [min, max, count] (+ [probe]): what the host must read
    dtype: torch.dtype


def dedup_launch(flat: torch.Tensor, limit: int, probe: Optional[torch.Tensor] = None) -> Dedup:
    """Sorts and counts on the device with no host sync; ``head`` holds what the host must read."""
    lo, hi = torch.aminmax(flat)
    keys, perm = torch.sort(sort_keys(flat, limit))
    first = torch.empty(keys.shape, dtype=torch.bool, device=keys.device)
    first[:1] = True
    torch.ne(keys[1:], keys[:-1], out=first[1:])
    run = torch.cumsum(first, 0)
    head = [lo.long().view(1), hi.long().view(1), run[-1:]]
    return Dedup(keys, perm, run, torch.cat(head + ([probe.long().view(1)] if probe is not None else [])),
                 flat.dtype)


def dedup_finish(dedup: Dedup, values: Sequence[int]):
    """``(uniq, inverse, lo, hi, probe value)`` of a launched dedup, given its ``head`` read on the host.
    The caller checks the range (``lo``, ``hi``) before using ``uniq``: ids out of int32 range were
    sorted wrapped."""
    run = dedup.run - 1
    inverse = torch.empty_like(run).scatter_(0, dedup.perm, run)
    uniq = dedup.keys.new_empty(values[2]).scatter_(0, run, dedup.keys).to(dedup.dtype)  # each run writes its id
    return uniq, inverse, values[0], values[1], (bool(values[3]) if len(values) > 3 else None)


def unique_device(flat: torch.Tensor, limit: int, probe: Optional[torch.Tensor] = None):
    """Device dedup with a single host sync, which also reads the ids' range and ``probe`` (a 0-dim
    tensor): ``(uniq, inverse, lo, hi, probe value)``.  ``torch.unique`` would sync to learn the
    count and the range check would sync again."""
    dedup = dedup_launch(flat, limit, probe)
    return dedup_finish(dedup, dedup.head.tolist())  # the one sync
