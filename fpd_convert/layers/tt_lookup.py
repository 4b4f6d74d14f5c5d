"""Which TT row path a layer uses: the dispatch between the reference and fast kernels.

``kernel="auto"`` picks, for three float cores on a CUDA device with Triton, the
Triton kernels (the suffix-table kernels when the batch's distinct ids are many enough for
the table's digit pairs, see :mod:`fpd_convert.kernels.triton_suffix`, else the per-index
ones); on the CPU, a suffix table built per call or the shared-prefix path, whichever takes
fewer multiply-adds (and the cached end table when no gradient is needed and the table is
small); otherwise the plain PyTorch reference, which every fast path is tested against.
``FPD_TT_KERNEL`` in the environment (``reference``, ``cpu``, ``triton``, ``auto``) sets the
default for all layers: the one debugging override of the choice.

A bag lookup without gradients on the Triton path, while the suffix table is cached, skips
the dedup and pools its bags in one pass (:mod:`fpd_convert.kernels.triton_pooled`, see
:func:`pools_in_one_pass`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from ..kernels import cpu_suffix, cpu_tt, triton_suffix, triton_tt
from ..kernels.reference import row_digits, tt_rows

KERNELS = ("auto", "reference", "cpu", "triton")

__all__ = ["KERNELS", "default_kernel", "choose_kernel", "lookup_rows", "pools_in_one_pass", "row_digits",
           "rows_from_end_table", "tt_rows"]


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
    return (suffix_cache is not None and choose_kernel(kernel, cores) == "triton"
            and suffix_cache.fits(cores))


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
