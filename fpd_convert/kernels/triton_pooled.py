"""Bags of a 3-core TT table pooled in one pass, for serving: one Triton kernel, no dedup.

Without gradients, the suffix table ``S`` (:mod:`fpd_convert.kernels.triton_suffix`) is cached,
and a row is one small product, ``G1[i1] (d1 x r1)`` times the ``r1 x d2 d3`` values of its
digit pair.  The training path deduplicates the batch first (a sort and an inverse map, a host
sync to learn the count), builds each distinct row once and then gathers or pools the rows in
another pass: the dedup pays for itself in the backward, whose atomic adds it divides by the
ids' repetition.  A forward alone has no backward to save, so here one program per bag walks
the bag's entries, builds each entry's row from ``G1`` and ``S`` in registers, applies its
per-sample weight and pools it (sum, mean or max; padding entries skipped) into the bag's
output, written once.  A Zipf-hot id is rebuilt wherever it occurs, from slices that stay in
the GPU's L2 cache; no sort, no inverse map and no gather remain.

Entries are given as *codes*: a TT position (>= 0), ``-1 - k`` for exact row ``k`` (the layer's
exact rows, :mod:`fpd_convert.layers.row_index`), or ``skip`` for a padding entry.  Bags are
given by ``bounds`` (``nn.EmbeddingBag``'s offsets, with or without the last one) or, for a
``(B, L)`` input, by their fixed length.  Accumulation is fp32; the output takes ``out_dtype``.

Works under ``TRITON_INTERPRET=1`` on CPU tensors (how the tests check it against
``nn.EmbeddingBag`` without a GPU).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .triton_suffix import _shapes, dot_tiles, supports
from .triton_tt import triton, tl

MODES = {"sum": 0, "mean": 1, "max": 2}

if triton is not None:
    from .triton_suffix import _code_row, _row_pt

    @triton.jit
    def _pooled_kernel(code_ptr, bounds_ptr, w_ptr, c1, s_ptr, exact_ptr, out_ptr, NB, N, L, SKIP,
                       N2: tl.constexpr, N3: tl.constexpr, R1: tl.constexpr,
                       D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
                       MODE: tl.constexpr, FIXED: tl.constexpr, HAS_W: tl.constexpr, HAS_SKIP: tl.constexpr,
                       HAS_EXACT: tl.constexpr, P1: tl.constexpr, Q1: tl.constexpr, BD2: tl.constexpr,
                       QC: tl.constexpr, PREC: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        if FIXED:  # a (B, L) input: bag b is entries [b L, (b + 1) L)
            start = b * L
            end = start + L
        else:  # offsets; without the last one, the last bag ends at N
            start = tl.load(bounds_ptr + b).to(tl.int64)
            nxt = tl.load(bounds_ptr + tl.minimum(b + 1, NB - 1)).to(tl.int64)
            end = tl.where(b + 1 < NB, nxt, N)
            start = tl.minimum(tl.maximum(start, 0), N)  # offsets nobody checked stay inside the input
            end = tl.minimum(tl.maximum(end, start), N)
        D = D1 * D2 * D3
        offs, mask = _row_pt(D1, D2, D3, P1, BD2, QC)
        if MODE == 2:
            acc = tl.full((P1, QC), float("-inf"), tl.float32)
        else:
            acc = tl.zeros((P1, QC), dtype=tl.float32)
        count = 0.0
        for e in range(start, end):
            code = tl.load(code_ptr + e).to(tl.int64)
            keep = code != SKIP
            if HAS_SKIP:
                code = tl.where(keep, code, 0)  # a padding entry reads row 0 and adds nothing
            row = _code_row(code, c1, s_ptr, exact_ptr, offs, mask, N2, N3, R1, D1, D2, D3, HAS_EXACT,
                            P1, Q1, BD2, QC, PREC)
            if HAS_W:
                row = row * tl.load(w_ptr + e).to(tl.float32)
            if MODE == 2:
                acc = tl.where(keep, tl.maximum(acc, row), acc)
            else:
                acc += tl.where(keep, row, 0.0)
            count += tl.where(keep, 1.0, 0.0)
        if MODE == 1:
            acc = acc / tl.maximum(count, 1.0)
        if MODE == 2:  # an empty bag (or one of padding only) is zeros, as in nn.EmbeddingBag
            acc = tl.where(count > 0, acc, 0.0)
        tl.store(out_ptr + b * D + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


#: warps per bag program (one-hot bags: one row of d values each)
WARPS = 2


def pooled_bags(cores: Sequence[torch.Tensor], s: torch.Tensor, codes: torch.Tensor, mode: str,
                bounds: Optional[torch.Tensor] = None, bag_len: Optional[int] = None,
                weights: Optional[torch.Tensor] = None, skip: Optional[int] = None,
                exact_rows: Optional[torch.Tensor] = None, include_last_offset: bool = False,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pooled bags ``(B, d)`` of a 3-core TT table with suffix table ``s`` (no gradients).

    Parameters
    ----------
    cores : the three cores (only ``cores[0]`` is read; the others give the shape).
    s : ``triton_suffix.suffix_table(cores[1], cores[2])`` (fp32).
    codes : (N,) int32/int64, one per entry: TT position, ``-1 - k`` for ``exact_rows[k]``, or
        ``skip`` (padding; excluded from the bag, as ``nn.EmbeddingBag``'s ``padding_idx``).
    mode : ``"sum"``, ``"mean"`` or ``"max"``.
    bounds : (B,) offsets (``(B + 1,)`` with ``include_last_offset``), non-decreasing from 0,
        the last <= N (bags outside ``[0, N)`` are cut to it, so bad offsets read nothing
        outside the input); or ``bag_len``: bags of ``bag_len`` consecutive entries.
    weights : (N,) per-sample weights (``mode="sum"``).

    Returns
    -------
    (B, d) tensor of ``out_dtype`` (default ``cores[0].dtype``).

    The caller checks the codes' range (an out-of-range code reads outside the cores) and, for
    ``nn.EmbeddingBag``'s errors, the offsets.
    """
    if not supports(cores):
        raise ValueError("the Triton TT kernels take exactly three float cores")
    if mode not in MODES:
        raise ValueError(f"mode should be one of {', '.join(MODES)} but got {mode!r}")
    if (bounds is None) == (bag_len is None):
        raise ValueError("give either bounds (offsets) or bag_len")
    if weights is not None and mode != "sum":
        raise ValueError("per-sample weights are only supported for mode='sum'")
    n = codes.numel()
    if bounds is not None:
        bags = bounds.numel() - int(include_last_offset)
    else:
        bags = n // bag_len if bag_len else 0
    _, n2, n3, d1, d2, d3, r1, _ = _shapes(cores)
    c1 = cores[0].detach()
    c1 = (c1 if c1.dtype == torch.float32 else c1.float()).contiguous()
    out = torch.empty(bags, d1 * d2 * d3, device=c1.device, dtype=out_dtype or cores[0].dtype)
    if bags <= 0:
        return out
    codes = codes.contiguous()
    _pooled_kernel[(bags,)](
        codes, bounds if bounds is not None else codes, weights.contiguous() if weights is not None else c1,
        c1, s, exact_rows.detach().contiguous() if exact_rows is not None else c1, out,
        bounds.numel() if bounds is not None else 0, n, bag_len or 0, skip if skip is not None else -(1 << 62),
        N2=n2, N3=n3, R1=r1, D1=d1, D2=d2, D3=d3, MODE=MODES[mode], FIXED=bounds is None,
        HAS_W=weights is not None, HAS_SKIP=skip is not None, HAS_EXACT=exact_rows is not None,
        **dot_tiles(cores), num_warps=WARPS)
    return out


__all__ = ["MODES", "pooled_bags"]
