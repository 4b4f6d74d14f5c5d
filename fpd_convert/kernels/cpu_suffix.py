"""TT rows for training on the CPU from a suffix table built once per lookup.

A row is ``G_1[i_1] @ S[s]``, where ``S[s] = G_2[i_2] ... G_k[i_k]`` is the product of all cores
but the first for the row's suffix ``s`` (its trailing digits).  With a long first core
(``fpd_convert.tt.choose_row_factors``, the default layout) there are few suffixes (1,024 at
1M x 64 rank 16), so building all of them, differentiably, costs less than the shared-prefix path's
per-prefix products (:func:`fpd_convert.kernels.cpu_tt.tt_rows_shared`, ``d_1 r_1 d_2 r_2`` per
distinct prefix); each row then costs one small GEMM of ``r_1 D``.  :func:`worthwhile` compares
the two by their multiply-adds.  The same table, built without gradients, is what
:class:`fpd_convert.kernels.cpu_tt.EndTable` caches for inference.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def _swap_middle(x: torch.Tensor, b: int, a: int, s: int, c: int) -> torch.Tensor:
    """``x`` seen as ``(b, a, s, c)`` -> contiguous ``(b, s, a, c)``.

    The inner runs of ``c`` values move as wider elements where their bytes allow (16 or 8 bytes
    viewed as one complex128 or float64): torch's copy of a permutation with runs of 4 floats
    took 166 us for 1 MB against 17 us so (2 cores)."""
    x = x.reshape(b, a, s, c)
    if torch.compiler.is_compiling():  # a traced graph: inductor picks the copy's layout itself
        return x.transpose(1, 2).contiguous()
    run, offset = c * x.element_size(), x.storage_offset() * x.element_size()
    for unit, wide in ((16, torch.complex128), (8, torch.float64)):
        if run % unit == 0 and offset % unit == 0 and x.is_contiguous():
            return x.view(wide).transpose(1, 2).contiguous().view(x.dtype)
    return x.transpose(1, 2).contiguous()


class _SwapMiddle(torch.autograd.Function):
    """:func:`_swap_middle` with its gradient (the inverse swap)."""

    @staticmethod
    def forward(ctx, x, b, a, s, c):
        ctx.dims, ctx.shape = (b, a, s, c), x.shape
        return _swap_middle(x, b, a, s, c)

    @staticmethod
    def backward(ctx, grad):
        b, a, s, c = ctx.dims
        return _swap_middle(grad.contiguous(), b, s, a, c).reshape(ctx.shape), None, None, None, None


def _swap(x: torch.Tensor, b: int, a: int, s: int, c: int) -> torch.Tensor:
    """:func:`_swap_middle`, differentiable (traced as a plain transpose under ``torch.compile``)."""
    return _swap_middle(x, b, a, s, c) if torch.compiler.is_compiling() else _SwapMiddle.apply(x, b, a, s, c)


def suffix_table(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """All products ``G_2[i_2] ... G_k[i_k]`` as ``(N_suffix, r_1, d_2..d_k)``, differentiable.

    Level by level from the right, one GEMM each: core ``j`` ``(r', n, d, r)`` times the product so
    far ``(r, S, D)``; one copy a level puts the result in the layout the next level needs,
    ``(r', n S, d D)``, and the last level's straight in the table's ``(n S, r', d D)``.
    Suffix ``s`` is the row index modulo ``N_suffix`` (``i_2 .. i_k`` in mixed radix)."""
    acc = cores[-1][..., 0]  # (r_{k-1}, n_k, d_k)
    if len(cores) == 2:
        return acc.transpose(0, 1).contiguous()
    for j in range(len(cores) - 2, 0, -1):
        r_out, n, d, r = cores[j].shape
        _, s, dd = acc.shape
        if j > 1:  # (r' n, d, S, D) -> (r' n, S, d, D)
            prod = cores[j].reshape(r_out * n * d, r) @ acc.reshape(r, s * dd)
            acc = _swap(prod, r_out * n, d, s, dd).reshape(r_out, n * s, d * dd)
        else:  # (n, r' d, S, D) -> (n, S, r' d, D)
            prod = cores[j].permute(1, 0, 2, 3).reshape(n * r_out * d, r) @ acc.reshape(r, s * dd)
            acc = _swap(prod, n, r_out * d, s, dd).reshape(n * s, r_out, d * dd)
    return acc


def suffix_count(cores: Sequence[torch.Tensor]) -> int:
    return math.prod(c.shape[1] for c in cores[1:])


def rows_from_suffixes(first: torch.Tensor, table: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``G_1[i_1] @ S[s]`` (U, D) of indices in any order, from the first core ``(1, n_1, d_1, r_1)``
    and a :func:`suffix_table`; differentiable in both."""
    n_s, r, width = table.shape
    n_1, d_1 = first.shape[1], first.shape[2]
    end = indices // n_s  # not torch.div(..., rounding_mode="floor"): ONNX exports that through float32
    rest = indices - end * n_s
    lhs = first[0].reshape(n_1, d_1 * r).index_select(0, end).reshape(-1, d_1, r)
    rhs = table.reshape(n_s, r * width).index_select(0, rest).reshape(-1, r, width)
    return torch.bmm(lhs, rhs).reshape(indices.numel(), d_1 * width)


def tt_rows_suffix(cores: Sequence[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """Rows ``W[indices]`` (U, D) for indices in any order, differentiable; the same values and
    gradients as :func:`fpd_convert.kernels.reference.tt_rows`."""
    return rows_from_suffixes(cores[0], suffix_table(cores), indices)


def suffix_cost(cores: Sequence[torch.Tensor], n_ids: int) -> int:
    """Multiply-adds of :func:`tt_rows_suffix` for ``n_ids`` distinct ids (forward)."""
    cost, s, dd = 0, cores[-1].shape[1], cores[-1].shape[2]
    for core in reversed(cores[1:-1]):
        r_out, n, d, r = core.shape
        cost += r_out * n * d * r * s * dd
        s, dd = s * n, dd * d
    return cost + n_ids * cores[0].shape[3] * math.prod(c.shape[2] for c in cores)


def shared_cost(cores: Sequence[torch.Tensor], n_ids: int) -> int:
    """Multiply-adds of :func:`fpd_convert.kernels.cpu_tt.tt_rows_shared` for ``n_ids`` sorted
    distinct ids (forward), with each level's distinct prefixes taken as ``min(n_ids, prefixes)``."""
    cost, prefixes, width = 0, cores[0].shape[1], cores[0].shape[2]
    for core in cores[1:]:
        r_in, n, d, r_out = core.shape
        prefixes *= n
        cost += min(n_ids, prefixes) * width * r_in * d * r_out
        width *= d
    return cost


#: largest suffix table (and as much again for its gradient) built for one training lookup
MAX_BYTES = 256 << 20


def table_bytes(cores: Sequence[torch.Tensor]) -> int:
    """Bytes of the :func:`suffix_table` of these cores."""
    return suffix_count(cores) * cores[0].shape[3] * math.prod(c.shape[2] for c in cores[1:]) * cores[0].element_size()


def worthwhile(cores: Sequence[torch.Tensor], n_ids: int) -> bool:
    """Whether :func:`tt_rows_suffix` costs fewer multiply-adds than the shared-prefix path for
    ``n_ids`` distinct ids (at least two cores), with a table of at most :data:`MAX_BYTES`."""
    return (len(cores) >= 2 and table_bytes(cores) <= MAX_BYTES
            and suffix_cost(cores, n_ids) < shared_cost(cores, n_ids))
