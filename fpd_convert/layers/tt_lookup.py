"""Which TT row path a layer uses: the dispatch between the reference and fast kernels.

``kernel="auto"`` picks, for three float cores on a CUDA device with Triton, the
Triton kernels; on the CPU, the shared-prefix path (and the cached prefix table
when no gradient is needed and the table is small); otherwise the plain PyTorch
reference, which every fast path is tested against.  ``FPD_TT_KERNEL`` in the
environment sets the default for all layers (``reference``, ``cpu``, ``triton``, ``auto``).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ..kernels import cpu_tt, triton_tt
from ..kernels.reference import row_digits, tt_rows

KERNELS = ("auto", "reference", "cpu", "triton")

__all__ = ["KERNELS", "default_kernel", "choose_kernel", "lookup_rows", "row_digits", "tt_rows"]


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


def lookup_rows(cores: Sequence[torch.Tensor], sorted_unique: torch.Tensor, kernel: str = "auto",
                prefix_table: Optional[cpu_tt.PrefixTable] = None) -> torch.Tensor:
    """Rows of the TT table for sorted, deduplicated indices, by the chosen path."""
    path = choose_kernel(kernel, cores)
    if path == "triton":
        return triton_tt.tt3_rows(cores, sorted_unique)
    if path == "cpu":
        grad = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        if not grad and prefix_table is not None and prefix_table.fits(cores):
            return prefix_table.rows(cores, sorted_unique)
        return cpu_tt.tt_rows_shared(cores, sorted_unique)
    return tt_rows(cores, sorted_unique)
