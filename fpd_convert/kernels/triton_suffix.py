"""Rows of a 3-core TT table through its suffix table: two Triton kernels and three GEMMs.

The per-index kernels of :mod:`triton_tt` contract ``G1[i1] G2[i2] G3[i3]`` for every
index, so each index pays for the ``r1 x d2 x r2`` middle slice (twice in the backward),
in small, latency-bound products.  Here the middle work is done once per step for all
digit pairs, as one dense GEMM:

    S = G3^T (n3 d3, r2) @ G2 (r2, n2 r1 d2)     rows (i3, p3), columns (i2, a, p2)

and a row is ``G1[i1] (d1 x r1)`` times the ``r1 x d2 d3`` values of its digit pair
(i2, i3), a 4 k-flop product per index (one kernel).  The backward is the same in reverse:
one kernel walks the sorted indices, sums ``dG1[i1] += g S^T`` over runs of equal ``i1`` and
adds ``dS[(i3, .), (i2, ., .)] += G1[i1]^T g`` (mostly distinct places, coalesced atomic
adds); then ``dG2 = G3 dS`` and ``dG3 = (dS G2^T)^T`` are two GEMMs.  Nothing is sorted by
digit and no core slice is copied per index.  The products go through ``tl.dot`` tiles (tensor
cores, ``DOT_PRECISION``).

It pays when the digit pairs are not many more than the indices of a batch
(:func:`worthwhile`), e.g. 10M x 128 rows, rank 32: 40,000 pairs of 2 KB for a batch
of 21,500 distinct ids.  Without gradients, :class:`SuffixCache` keeps ``S`` between
calls (rebuilt when a core changes), so a lookup is the one row kernel.

Works under ``TRITON_INTERPRET=1`` on CPU tensors (how the tests run it without a GPU).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .triton_tt import _pow2, available, supports, triton, tl

if triton is not None:
    from .triton_tt import _accumulate, _digits, _slice_first  # shared with the per-index kernels

    # the products as tl.dot tiles (every side padded to >= 16), the r1 x d2 d3 values of a digit
    # pair as one (Q1, QC) tile with columns (p3, p2)

    @triton.jit
    def _pair_tile(i2, i3, N2, R1, D2, D3, Q1: tl.constexpr, BD2: tl.constexpr, QC: tl.constexpr):
        """Offsets into S (and dS) of digit pair (i2, i3) as a (Q1, QC) tile (rows a, columns
        (p3, p2)), and its mask."""
        a = tl.arange(0, Q1)
        c = tl.arange(0, QC)
        p3 = c // BD2
        p2 = c % BD2
        offs = (i3 * D3 + p3[None, :]) * (N2 * R1 * D2) + i2 * (R1 * D2) + a[:, None] * D2 + p2[None, :]
        return offs, (a[:, None] < R1) & (p2[None, :] < D2) & (p3[None, :] < D3)

    @triton.jit
    def _tt_row(code, c1, s_ptr, N2, N3, R1, D1, D2, D3, P1: tl.constexpr, Q1: tl.constexpr, BD2: tl.constexpr,
                QC: tl.constexpr, PREC: tl.constexpr):
        """Row at TT position ``code`` as a (P1, QC) fp32 tile, columns (p3, p2): G1[i1] S[(i2, i3)]."""
        i1, i2, i3 = _digits(code, N2, N3)
        s_offs, s_mask = _pair_tile(i2, i3, N2, R1, D2, D3, Q1, BD2, QC)
        return tl.dot(_slice_first(c1, i1, R1, D1, P1, Q1), tl.load(s_ptr + s_offs, mask=s_mask, other=0.0),
                      input_precision=PREC)

    @triton.jit
    def _code_row(code, c1, s_ptr, exact_ptr, offs, mask, N2, N3, R1, D1, D2, D3, HAS_EXACT: tl.constexpr,
                  P1: tl.constexpr, Q1: tl.constexpr, BD2: tl.constexpr, QC: tl.constexpr, PREC: tl.constexpr):
        """Row of an entry's code (TT position, or ``-1 - k`` for exact row ``k`` when HAS_EXACT) as
        a (P1, QC) fp32 tile; ``offs``, ``mask``: a row's tile (:func:`_row_pt`)."""
        if HAS_EXACT:
            if code < 0:
                row = tl.load(exact_ptr + (-1 - code) * (D1 * D2 * D3) + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                row = _tt_row(code, c1, s_ptr, N2, N3, R1, D1, D2, D3, P1, Q1, BD2, QC, PREC)
        else:
            row = _tt_row(code, c1, s_ptr, N2, N3, R1, D1, D2, D3, P1, Q1, BD2, QC, PREC)
        return row

    @triton.jit
    def _row_pt(D1, D2, D3, P1: tl.constexpr, BD2: tl.constexpr, QC: tl.constexpr):
        """Offsets inside a row (p1, p2, p3) as a (P1, QC) tile (columns (p3, p2)), and its mask."""
        p1 = tl.arange(0, P1)
        c = tl.arange(0, QC)
        p3 = c // BD2
        p2 = c % BD2
        return (p1[:, None] * (D2 * D3) + p2[None, :] * D3 + p3[None, :],
                (p1[:, None] < D1) & (p2[None, :] < D2) & (p3[None, :] < D3))

    @triton.jit
    def _suffix_fwd_dot_kernel(idx_ptr, c1, s_ptr, out_ptr,
                               N2: tl.constexpr, N3: tl.constexpr, R1: tl.constexpr,
                               D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, P1: tl.constexpr,
                               Q1: tl.constexpr, BD2: tl.constexpr, QC: tl.constexpr, PREC: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        out = _tt_row(tl.load(idx_ptr + pid).to(tl.int64), c1, s_ptr, N2, N3, R1, D1, D2, D3, P1, Q1, BD2, QC, PREC)
        offs, mask = _row_pt(D1, D2, D3, P1, BD2, QC)
        tl.store(out_ptr + pid * (D1 * D2 * D3) + offs, out, mask=mask)

    @triton.jit
    def _suffix_bwd_dot_kernel(idx_ptr, grad_ptr, c1, s_ptr, d1_ptr, ds_ptr, U, CH,
                               N2: tl.constexpr, N3: tl.constexpr, R1: tl.constexpr,
                               D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
                               NEED1: tl.constexpr, NEEDS: tl.constexpr, P1: tl.constexpr, Q1: tl.constexpr,
                               BD2: tl.constexpr, QC: tl.constexpr, PREC: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * CH
        end = tl.minimum(start + CH, U)
        p1 = tl.arange(0, P1)
        a = tl.arange(0, Q1)
        out_mask = (p1[:, None] < D1) & (a[None, :] < R1)
        offs, mask = _row_pt(D1, D2, D3, P1, BD2, QC)
        cur = tl.load(idx_ptr + start).to(tl.int64) // (N2 * N3)
        acc = tl.zeros((P1, Q1), dtype=tl.float32)
        for s in range(start, end):
            row = tl.load(idx_ptr + s).to(tl.int64)
            i1, i2, i3 = _digits(row, N2, N3)
            g = tl.load(grad_ptr + s * (D1 * D2 * D3) + offs, mask=mask, other=0.0).to(tl.float32)  # (P1, QC)
            s_offs, s_mask = _pair_tile(i2, i3, N2, R1, D2, D3, Q1, BD2, QC)
            if NEEDS:
                g1 = _slice_first(c1, i1, R1, D1, P1, Q1)
                _accumulate(ds_ptr + s_offs, tl.dot(tl.trans(g1), g, input_precision=PREC), mask=s_mask)
            if NEED1:
                if i1 != cur:
                    _accumulate(d1_ptr + (cur * D1 + p1[:, None]) * R1 + a[None, :], acc, mask=out_mask)
                    acc = tl.zeros((P1, Q1), dtype=tl.float32)
                    cur = i1
                sl = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0)
                acc += tl.dot(g, tl.trans(sl), input_precision=PREC)
        if NEED1:
            _accumulate(d1_ptr + (cur * D1 + p1[:, None]) * R1 + a[None, :], acc, mask=out_mask)


#: the suffix path is used while ``n2 n3 d3 <= FACTOR * ids * r2``: per distinct id the
#: per-index kernels move ~3 middle slices (``r1 d2 r2``), the suffix path ~6 passes over
#: ``r1 d2 d3`` values per digit pair (a bandwidth estimate, FACTOR 1).  Measured on an H100
#: (10M x 128, rank 32: 40,000 pairs), forward+backward, suffix vs per-index: 0.36 vs 0.49 ms at
#: 3,653 ids and 0.44 vs 0.62 ms at 1,105 ids (with the first layout of S: 0.85 vs 0.75 ms at
#: 1,105).  FACTOR 4 takes the suffix path from 1,250 ids there; smaller batches were not measured.
FACTOR = 4.0
MAX_BYTES = 1 << 30  # nor while S (and dS) would take more than this
# launch settings: ids per backward program (runs of equal i1 are summed within one), warps
# per program.  H100, 10M x 128 rank 32, 21.6k ids: one id a program, 2 warps, backward 0.44 ms
# against 0.52-0.62 for 8 ids a program.
CHUNK, FWD_WARPS, BWD_WARPS = 1, 2, 2
DOT_PRECISION = "tf32x3"  # three TF32 products: float32-level accuracy on tensor cores


def _shapes(cores):
    """``n1, n2, n3, d1, d2, d3, r1, r2`` of three cores (or of their shapes)."""
    (_, n1, d1, r1), (_, n2, d2, r2), (_, n3, d3, _) = (getattr(c, "shape", c) for c in cores)
    return n1, n2, n3, d1, d2, d3, r1, r2


def suffix_bytes(cores: Sequence[torch.Tensor]) -> int:
    """Bytes of the fp32 suffix table ``S`` (``r1 n2 d2 x n3 d3``)."""
    _, n2, n3, _, d2, d3, r1, _ = _shapes(cores)
    return 4 * r1 * n2 * d2 * n3 * d3


def worthwhile(cores: Sequence[torch.Tensor], num_ids: int) -> bool:
    """Whether this batch of distinct ids is better served by the suffix path (see ``FACTOR``)."""
    if not supports(cores):
        return False
    _, n2, n3, _, _, d3, _, r2 = _shapes(cores)
    return n2 * n3 * d3 <= FACTOR * num_ids * r2 and suffix_bytes(cores) <= MAX_BYTES


def suffix_table(c2: torch.Tensor, c3: torch.Tensor) -> torch.Tensor:
    """``S = G3^T G2`` in fp32, rows ``(i3, p3)`` and columns ``(i2, a, p2)``: the ``r1 d2 d3``
    values of a digit pair are ``d3`` runs of ``r1 d2`` consecutive ones (coalesced loads and
    atomic adds in the kernels)."""
    return _table_and_operands(c2, c3)[0]


def _table_and_operands(c2: torch.Tensor, c3: torch.Tensor):
    """``S`` (fp32, ``(n3 d3, n2 r1 d2)``) by one GEMM, with its operands: G2 as ``m2``
    ``(r2, n2 r1 d2)`` (a copy, columns ``(i2, a, p2)``) and G3 as ``m3`` ``(r2, n3 d3)`` (a view)."""
    r1, n2, d2, r2 = c2.shape
    with torch.autocast(device_type=c2.device.type, enabled=False):
        m2 = c2.float().permute(3, 1, 0, 2).reshape(r2, n2 * r1 * d2)
        m3 = c3.float().reshape(r2, -1)
        return m3.t() @ m2, m2, m3


def _blocks(cores):
    """Sizes (compile-time constants of the kernels: a division by a known digit base is a
    multiply, not a 64-bit division; one compilation per table shape) and the tile sizes."""
    n1, n2, n3, d1, d2, d3, r1, r2 = _shapes(cores)
    return dict(N2=n2, N3=n3, R1=r1, D1=d1, D2=d2, D3=d3), dot_tiles(cores)


def dot_tiles(cores) -> dict:
    """Tile sizes of the ``tl.dot`` kernels (every side padded to >= 16) and their precision."""
    _, _, _, d1, d2, d3, r1, _ = _shapes(cores)
    return dict(P1=max(16, _pow2(d1)), Q1=max(16, _pow2(r1)), BD2=_pow2(d2), QC=max(16, _pow2(d2) * _pow2(d3)),
                PREC="ieee" if os.environ.get("TRITON_INTERPRET") == "1" else DOT_PRECISION)


def _rows_from(c1: torch.Tensor, s: torch.Tensor, ids: torch.Tensor, cores) -> torch.Tensor:
    sizes, blocks = _blocks(cores)
    out = torch.empty(ids.numel(), sizes["D1"] * sizes["D2"] * sizes["D3"], device=c1.device, dtype=torch.float32)
    if ids.numel():
        _suffix_fwd_dot_kernel[(ids.numel(),)](ids, c1, s, out, *sizes.values(), **blocks, num_warps=FWD_WARPS)
    return out


class _SuffixRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, c1, c2, c3):
        c1 = c1.contiguous()
        s, m2, m3 = _table_and_operands(c2, c3)
        ctx.save_for_backward(ids, c1, s, m2, m3)
        ctx.shapes = (c2.shape, c3.shape)
        ctx.dtypes = (c1.dtype, c2.dtype, c3.dtype)
        return _rows_from(c1, s, ids, (c1, c2, c3))

    @staticmethod
    def backward(ctx, grad):
        ids, c1, s, m2, m3 = ctx.saved_tensors
        need1, need2, need3 = ctx.needs_input_grad[1:]
        shape2, shape3 = ctx.shapes
        sizes, blocks = _blocks((c1, shape2, shape3))
        u = ids.numel()
        d1 = torch.zeros(c1.shape, device=c1.device, dtype=torch.float32) if need1 else None
        ds = torch.zeros(s.shape, device=s.device, dtype=torch.float32) if (need2 or need3) else None
        if u and (need1 or ds is not None):
            _suffix_bwd_dot_kernel[(triton.cdiv(u, CHUNK),)](
                ids, grad.float().contiguous(), c1, s, d1 if need1 else s, ds if ds is not None else s, u, CHUNK,
                *sizes.values(), NEED1=bool(need1), NEEDS=ds is not None, **blocks, num_warps=BWD_WARPS)
        grads = [d1, *middle_and_last_grads(ds, m2, m3, shape2, shape3, need2, need3)]
        return (None, *[None if g is None else g.to(t) for g, t in zip(grads, ctx.dtypes)])


def middle_and_last_grads(ds, m2, m3, shape2, shape3, need2: bool, need3: bool):
    """``(dG2, dG3)`` from ``dS`` (the suffix table's gradient) by two GEMMs, ``dG2 = G3 dS`` and
    ``dG3 = (dS G2^T)^T``, in the cores' shapes (fp32; None where not needed)."""
    d2 = d3 = None
    if ds is not None:
        with torch.autocast(device_type=ds.device.type, enabled=False):
            if need2:  # (r2, n2 r1 d2) back to (r1, n2, d2, r2)
                r1, n2, dd2, r2 = shape2
                d2 = (m3 @ ds).reshape(r2, n2, r1, dd2).permute(2, 1, 3, 0)
            if need3:
                d3 = (ds @ m2.t()).t().reshape(shape3)
    return d2, d3


class SuffixCache:
    """``S`` kept between lookups without gradients, while it fits in ``max_bytes``; rebuilt when
    the middle or last core changes (in-place optimizer steps bump the tensor version)."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._key = None
        self._table: Optional[torch.Tensor] = None

    def fits(self, cores: Sequence[torch.Tensor]) -> bool:
        return supports(cores) and suffix_bytes(cores) <= self.max_bytes

    def table(self, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        c2, c3 = cores[1], cores[2]
        key = tuple((c.data_ptr(), c._version, c.shape, c.dtype, c.device) for c in (c2, c3))
        if key != self._key or self._table is None:
            self._table = None  # free the old table before the new one is made
            self._table = suffix_table(c2.detach(), c3.detach())
            self._key = key
        return self._table


def suffix_rows(cores: Sequence[torch.Tensor], sorted_ids: torch.Tensor,
                cache: Optional[SuffixCache] = None) -> torch.Tensor:
    """Rows ``W[sorted_ids]`` of a 3-core TT table (differentiable; values and gradients as the
    reference).  ``sorted_ids`` (U,) ascending (the backward sums runs of equal first digits);
    duplicates are allowed.  Without gradients and with ``cache``, ``S`` is reused between calls."""
    if not supports(cores):
        raise ValueError("the Triton TT kernels take exactly three float cores")
    dtype = cores[0].dtype
    ids = sorted_ids.contiguous()
    if cache is not None and not (torch.is_grad_enabled() and any(c.requires_grad for c in cores)):
        with torch.no_grad():
            out = _rows_from(cores[0].detach().float().contiguous(), cache.table(cores), ids, cores)
    else:
        out = _SuffixRows.apply(ids, *cores)
    return out if dtype == torch.float32 else out.to(dtype)


__all__ = ["available", "worthwhile", "suffix_rows", "suffix_table", "suffix_bytes", "SuffixCache"]
