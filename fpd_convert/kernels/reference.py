"""The TT row contraction: rows of a TT table for a batch of (unique) indices.

Plain PyTorch (gather + batched matmul), differentiable, device-agnostic; this is
the reference path that faster kernels are checked against.
"""
from __future__ import annotations

from typing import List, Sequence

import torch


def row_digits(indices: torch.Tensor, row_factors: Sequence[int]) -> List[torch.Tensor]:
    """Mixed-radix digits ``(i_1, ..., i_k)`` of row indices, most significant first."""
    digits = []
    rest = indices
    for n in reversed(row_factors[1:]):
        digits.append(rest % n)
        rest = rest // n  # exact in ONNX too (its export of torch.div "floor" goes through float32)
    digits.append(rest)
    return digits[::-1]


def tt_rows(cores: Sequence[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """Rows ``W[indices]`` of the TT table with cores ``(r_{j-1}, n_j, d_j, r_j)``.

    Shapes: ``indices`` (U,) int64 -> output (U, d_1 * ... * d_k).  Work and memory
    are ``O(U * d * r)``; the full table is never built.

    Example::

        >>> cores = [torch.randn(1, 10, 4, 8), torch.randn(8, 10, 4, 8), torch.randn(8, 10, 4, 1)]
        >>> tt_rows(cores, torch.tensor([0, 7, 999])).shape
        torch.Size([3, 64])
    """
    row_factors = [c.shape[1] for c in cores]
    digits = row_digits(indices, row_factors)
    u = indices.shape[0]
    # acc: (U, d_1...d_j, r_j); start with core 1 whose left rank is 1.
    acc = cores[0].index_select(1, digits[0]).reshape(u, -1, cores[0].shape[3])
    for core, digit in zip(cores[1:], digits[1:]):
        r_in, _, d_j, r_out = core.shape
        g = core.index_select(1, digit).permute(1, 0, 2, 3).reshape(u, r_in, d_j * r_out)
        acc = torch.bmm(acc, g).reshape(u, -1, r_out)
    return acc.reshape(u, -1)
