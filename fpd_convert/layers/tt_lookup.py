"""Which TT row path a layer uses: the dispatch between the reference and fast kernels.

``kernel="auto"`` picks, for three float cores on a CUDA device with Triton, the
Triton kernels (the suffix-table kernels when the batch's distinct ids are many enough for
the table's digit pairs, see :mod:`fpd_convert.kernels.triton_suffix`, else the per-index
ones); on the CPU, a suffix table built per call or the shared-prefix path, whichever takes
fewer multiply-adds (and the cached end table when no gradient is needed and the table is
small); otherwise the plain PyTorch
reference, which every fast path is tested against.  ``FPD_TT_KERNEL`` in the
environment sets the default for all layers (``reference``, ``cpu``, ``triton``, ``auto``).

A bag lookup without gradients on the Triton path, while the suffix table is cached, skips
the dedup and pools its bags in one pass (:mod:`fpd_convert.kernels.triton_pooled`, see
:func:`pools_in_one_pass`); ``FPD_TT_POOLED=off`` turns that off.  ``FPD_TT_SYNC_FREE=on`` (off by
default until timed on a GPU) trains sum-bags from the batch's sorted entries with no host sync
(:mod:`fpd_convert.kernels.triton_entries`, :func:`trains_sync_free`): index errors then surface
at the layer's next lookup.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..kernels import cpu_suffix, cpu_tt, triton_suffix, triton_tt
from ..kernels.reference import row_digits, tt_rows

KERNELS = ("auto", "reference", "cpu", "triton")
#: "auto": serve bags through the one-pass pooled kernel where it applies; "off": never
POOLED = os.environ.get("FPD_TT_POOLED", "auto")
#: "on": training lookups on the Triton path from sorted entries, without a host sync; "off"
SYNC_FREE = os.environ.get("FPD_TT_SYNC_FREE", "off")
#: "auto": under FPD_TT_SYNC_FREE=on, a group of lookups (several tables at once) trains its TT
#: tables of one shape as one stacked table (:mod:`fpd_convert.layers.table_batched`); "off": one by one
TABLE_BATCHED = os.environ.get("FPD_TT_TABLE_BATCHED", "auto")
#: "on": under FPD_TT_SYNC_FREE=on, a group's stacked training lookup (forward and backward) is
#: replayed from CUDA graphs (:mod:`fpd_convert.layers.graphed`); "off" (default): run op by op
CUDA_GRAPHS = os.environ.get("FPD_TT_CUDA_GRAPHS", "off")

__all__ = ["KERNELS", "default_kernel", "choose_kernel", "lookup_rows", "pools_in_one_pass", "row_digits",
           "sync_free", "table_batched", "cuda_graphs", "stashing_range_checks", "range_check_stash",
           "trains_sync_free", "tt_rows"]


def default_kernel() -> str:
    kernel = os.environ.get("FPD_TT_KERNEL", "auto")
    if kernel not in KERNELS:
        raise ValueError(f"FPD_TT_KERNEL should be one of {', '.join(KERNELS)} but is {kernel!r}")
    return kernel


def choose_kernel(kernel: str, cores: Sequence[torch.Tensor]) -> str:
    """The concrete path (``reference``, ``cpu`` or ``triton``) for these cores."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel should be one of {', '.join(KERNELS)} but got {kernel!r}")
    if kernel != "auto":
        return kernel
    device = cores[0].device
    if device.type == "cuda" and triton_tt.supports(cores):
        return "triton"
    if device.type == "cpu":
        return "cpu"
    return "reference"


def pools_in_one_pass(cores: Sequence[torch.Tensor], kernel: str,
                      suffix_cache: Optional[triton_suffix.SuffixCache]) -> bool:
    """Whether bags of these cores, looked up without gradients, are pooled in one pass by
    :func:`fpd_convert.kernels.triton_pooled.pooled_bags`: on the Triton path, while the suffix
    table fits its cache (the caller checks that no gradient is needed and that the call's
    arguments are ones the kernel takes)."""
    if POOLED not in ("auto", "off"):
        raise ValueError(f"FPD_TT_POOLED should be 'auto' or 'off' but is {POOLED!r}")
    return (POOLED == "auto" and suffix_cache is not None and choose_kernel(kernel, cores) == "triton"
            and suffix_cache.fits(cores))


def sync_free() -> bool:
    """``FPD_TT_SYNC_FREE=on``: Triton-path bag lookups read nothing on the host (training from
    sorted entries, serving in one pass; entries of ids out of range left out); index errors surface
    one lookup late."""
    if SYNC_FREE not in ("on", "off"):
        raise ValueError(f"FPD_TT_SYNC_FREE should be 'on' or 'off' but is {SYNC_FREE!r}")
    return SYNC_FREE == "on"


def table_batched() -> bool:
    """``FPD_TT_TABLE_BATCHED`` (default ``auto``): whether grouped sync-free training lookups stack
    their TT tables of one shape into one lookup (one sort, one kernel launch each way)."""
    if TABLE_BATCHED not in ("auto", "off"):
        raise ValueError(f"FPD_TT_TABLE_BATCHED should be 'auto' or 'off' but is {TABLE_BATCHED!r}")
    return TABLE_BATCHED == "auto"


def cuda_graphs() -> bool:
    """``FPD_TT_CUDA_GRAPHS=on``: under ``FPD_TT_SYNC_FREE=on``, the stacked training lookups of a
    group are captured once and replayed from CUDA graphs (see :mod:`fpd_convert.layers.graphed`)."""
    if CUDA_GRAPHS not in ("on", "off"):
        raise ValueError(f"FPD_TT_CUDA_GRAPHS should be 'on' or 'off' but is {CUDA_GRAPHS!r}")
    return CUDA_GRAPHS == "on"


_RANGE_STASH: Optional[List[tuple]] = None


@contextlib.contextmanager
def stashing_range_checks(stash: List[tuple]) -> Iterator[List[tuple]]:
    """While open, a sync-free lookup appends ``(layer, head, captured)`` to ``stash`` (``head``: its
    ids' ``[min, max]`` on the device; ``captured``: computed inside a CUDA graph capture) instead of copying its range to the host: what a CUDA graph
    capture needs (no pinned copy, no event in the graph); the caller defers each head after a
    replay (``layer.defer_range_head(head)``)."""
    global _RANGE_STASH
    saved, _RANGE_STASH = _RANGE_STASH, stash
    try:
        yield stash
    finally:
        _RANGE_STASH = saved


def range_check_stash() -> Optional[List[tuple]]:
    """The open :func:`stashing_range_checks` list, or None."""
    return _RANGE_STASH


def trains_sync_free(cores: Sequence[torch.Tensor], kernel: str) -> bool:
    """Whether bags of these cores that need gradients are built from the batch's sorted entries by
    :func:`fpd_convert.kernels.triton_entries.entry_bags` (no host sync): with ``FPD_TT_SYNC_FREE=on``,
    on the Triton path, while the suffix table stays under ``triton_suffix.MAX_BYTES`` (the caller
    checks the call's arguments)."""
    return (sync_free() and choose_kernel(kernel, cores) == "triton" and triton_suffix.supports(cores)
            and triton_suffix.suffix_bytes(cores) <= triton_suffix.MAX_BYTES)


def rows_from_end_table(cores: Sequence[torch.Tensor], kernel: str, row_cache: Optional[cpu_tt.EndTable]) -> bool:
    """Whether :func:`lookup_rows` takes these cores' rows from the CPU end table (``row_cache``),
    which takes ids in any order: the CPU path, no gradient for the cores, and a table that fits."""
    return (row_cache is not None and choose_kernel(kernel, cores) == "cpu"
            and not (torch.is_grad_enabled() and any(c.requires_grad for c in cores)) and row_cache.fits(cores))


def lookup_rows(cores: Sequence[torch.Tensor], unique_ids: torch.Tensor, kernel: str = "auto",
                row_cache: Optional[cpu_tt.EndTable] = None, is_sorted: bool = True,
                suffix_cache: Optional[triton_suffix.SuffixCache] = None) -> torch.Tensor:
    """Rows of the TT table for deduplicated indices, by the chosen path.

    On the CPU, rows that need gradients (or that no cache holds) come from a suffix table built
    for the call (:mod:`fpd_convert.kernels.cpu_suffix`) where that takes fewer multiply-adds than
    the shared-prefix path.  The shared-prefix and per-index Triton paths walk sorted ids: with
    ``is_sorted=False`` the ids are sorted for them and the rows put back in the given order; the
    end-table, suffix and reference paths take any order.  Without gradients, ``row_cache`` (CPU path) and
    ``suffix_cache`` (Triton path) keep a product of cores between calls while it fits.
    """
    if rows_from_end_table(cores, kernel, row_cache):
        return row_cache.rows(cores, unique_ids)
    path = choose_kernel(kernel, cores)
    grad = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
    if path == "triton":
        if not grad and suffix_cache is not None and suffix_cache.fits(cores):
            return triton_suffix.suffix_rows(cores, unique_ids, suffix_cache)
        if triton_suffix.worthwhile(cores, unique_ids.numel()):
            return triton_suffix.suffix_rows(cores, unique_ids)
    if path == "reference":
        return tt_rows(cores, unique_ids)
    if path == "cpu" and cpu_suffix.worthwhile(cores, unique_ids.numel()):  # any order
        return cpu_suffix.tt_rows_suffix(cores, unique_ids)
    if is_sorted:
        return _sorted_path(path, cores, unique_ids)
    if unique_ids.device.type == "cpu":  # numpy's sort is several times faster on the CPU
        order = torch.from_numpy(np.argsort(unique_ids.numpy(), kind="stable"))
        sorted_ids = unique_ids.index_select(0, order)
    else:
        sorted_ids, order = torch.sort(unique_ids)
    undo = torch.empty_like(order)
    undo[order] = torch.arange(order.numel(), device=order.device)
    return _sorted_path(path, cores, sorted_ids).index_select(0, undo)


def _sorted_path(path: str, cores: Sequence[torch.Tensor], sorted_ids: torch.Tensor) -> torch.Tensor:
    if path == "triton":
        return triton_tt.tt3_rows(cores, sorted_ids)
    return cpu_tt.tt_rows_shared(cores, sorted_ids)
