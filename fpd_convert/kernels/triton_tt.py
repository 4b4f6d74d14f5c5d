"""Triton kernels for rows of a 3-core TT table and their core gradients.

Forward: one program per (unique) index gathers the three core slices, contracts
``G1[i1] G2[i2] G3[i3]`` in registers (fp32 accumulation) and writes the row.

Backward: for core ``j`` the indices are visited in the order of their digit
``i_j`` (sorted); a program walks a chunk of them, sums the per-index core-slice
gradients in registers while the digit stays the same and adds the sum to the
gradient of the slice with one atomic add per run. Nothing of size
``indices x core slice`` is ever written to memory, which is what makes the plain
version (index_select + bmm, whose backward scatters one slice copy per index) slow.

Shapes: cores ``(1, n1, d1, r1)``, ``(r1, n2, d2, r2)``, ``(r2, n3, d3, 1)`` in fp32,
bf16 or fp16 (accumulation is always fp32); any sizes (padded to powers of two
inside a program with masks).  Works under ``TRITON_INTERPRET=1`` on CPU tensors,
which is how the tests check it on machines without a GPU.
"""
from __future__ import annotations

from typing import Sequence

import torch

try:  # triton ships with CUDA builds of torch; CPU machines may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None


def available() -> bool:
    """Triton importable (a GPU is still needed unless ``TRITON_INTERPRET=1``)."""
    return triton is not None


def supports(cores: Sequence[torch.Tensor]) -> bool:
    """Whether these cores can go through the kernels: three cores of a float type."""
    return (available() and len(cores) == 3
            and all(c.dtype in (torch.float32, torch.bfloat16, torch.float16) for c in cores))


if triton is not None:

    @triton.jit
    def _digits(row, N2, N3):
        i3 = row % N3
        rest = row // N3
        return rest // N2, rest % N2, i3

    @triton.jit
    def _prefix(c1, c2, i1, i2, N2, R1, R2, D1, D2,
                BD1: tl.constexpr, BD2: tl.constexpr, BR2: tl.constexpr):
        """``G1[i1] G2[i2]`` as a (BD1*BD2, BR2) fp32 tile, rows (p1, p2), cols b."""
        p1 = tl.arange(0, BD1)
        q = tl.arange(0, BD2 * BR2)
        p2 = q // BR2
        b = q % BR2
        m1 = p1 < D1
        m2 = (p2 < D2) & (b < R2)
        acc = tl.zeros((BD1, BD2 * BR2), dtype=tl.float32)
        for a in range(0, R1):
            g1 = tl.load(c1 + (i1 * D1 + p1) * R1 + a, mask=m1, other=0.0).to(tl.float32)
            g2 = tl.load(c2 + ((a * N2 + i2) * D2 + p2) * R2 + b, mask=m2, other=0.0).to(tl.float32)
            acc += g1[:, None] * g2[None, :]
        return tl.reshape(acc, (BD1 * BD2, BR2))

    @triton.jit
    def _last(c3, i3, N3, R2, D3, BR2: tl.constexpr, BD3: tl.constexpr):
        """``G3[:, i3, :, 0]`` as a (BR2, BD3) fp32 tile."""
        b = tl.arange(0, BR2)
        p3 = tl.arange(0, BD3)
        mask = (b[:, None] < R2) & (p3[None, :] < D3)
        return tl.load(c3 + (b[:, None] * N3 + i3) * D3 + p3[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _row_offsets(D1, D2, D3, BD1: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr):
        """Offsets and mask of a (BD1*BD2, BD3) tile inside a row of ``d1*d2*d3``."""
        m = tl.arange(0, BD1 * BD2)
        p1 = m // BD2
        p2 = m % BD2
        p3 = tl.arange(0, BD3)
        offs = (p1[:, None] * D2 + p2[:, None]) * D3 + p3[None, :]
        mask = (p1[:, None] < D1) & (p2[:, None] < D2) & (p3[None, :] < D3)
        return offs, mask

    @triton.jit
    def _fwd_kernel(idx_ptr, c1, c2, c3, out_ptr, N2, N3, R1, R2, D1, D2, D3,
                    BD1: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr, BR2: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        row = tl.load(idx_ptr + pid).to(tl.int64)
        i1, i2, i3 = _digits(row, N2, N3)
        t = _prefix(c1, c2, i1, i2, N2, R1, R2, D1, D2, BD1, BD2, BR2)
        g3 = _last(c3, i3, N3, R2, D3, BR2, BD3)
        out = tl.sum(t[:, :, None] * g3[None, :, :], axis=1)
        offs, mask = _row_offsets(D1, D2, D3, BD1, BD2, BD3)
        tl.store(out_ptr + pid * (D1 * D2 * D3) + offs, out, mask=mask)

    @triton.jit
    def _bwd_last_kernel(idx_ptr, perm_ptr, grad_ptr, c1, c2, c3, d3_ptr, U, CH, N2, N3, R1, R2, D1, D2, D3,
                         BD1: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr, BR2: tl.constexpr):
        """dG3[:, i3] += (G1[i1] G2[i2])^T grad_row, summed over a run of equal i3."""
        start = tl.program_id(0).to(tl.int64) * CH
        end = tl.minimum(start + CH, U)
        D = D1 * D2 * D3
        b = tl.arange(0, BR2)
        p3 = tl.arange(0, BD3)
        gmask = (b[:, None] < R2) & (p3[None, :] < D3)
        offs, rmask = _row_offsets(D1, D2, D3, BD1, BD2, BD3)
        cur = tl.load(idx_ptr + tl.load(perm_ptr + start)).to(tl.int64) % N3
        acc = tl.zeros((BR2, BD3), dtype=tl.float32)
        for s in range(start, end):
            pos = tl.load(perm_ptr + s).to(tl.int64)
            i1, i2, i3 = _digits(tl.load(idx_ptr + pos).to(tl.int64), N2, N3)
            if i3 != cur:
                tl.atomic_add(d3_ptr + (b[:, None] * N3 + cur) * D3 + p3[None, :], acc, mask=gmask)
                acc = tl.zeros((BR2, BD3), dtype=tl.float32)
                cur = i3
            t = _prefix(c1, c2, i1, i2, N2, R1, R2, D1, D2, BD1, BD2, BR2)
            g = tl.load(grad_ptr + pos * D + offs, mask=rmask, other=0.0).to(tl.float32)
            acc += tl.sum(t[:, :, None] * g[:, None, :], axis=0)
        tl.atomic_add(d3_ptr + (b[:, None] * N3 + cur) * D3 + p3[None, :], acc, mask=gmask)

    @triton.jit
    def _bwd_middle_kernel(idx_ptr, perm_ptr, grad_ptr, c1, c2, c3, d2_ptr, U, CH, N2, N3, R1, R2, D1, D2, D3,
                           BD1: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr, BR1: tl.constexpr,
                           BR2: tl.constexpr):
        """dG2[:, i2] += sum_p1 G1[i1][p1]^T (grad_row[p1] G3[i3]^T), summed over a run of equal i2."""
        start = tl.program_id(0).to(tl.int64) * CH
        end = tl.minimum(start + CH, U)
        D = D1 * D2 * D3
        a = tl.arange(0, BR1)
        q = tl.arange(0, BD2 * BR2)
        qp2 = q // BR2
        qb = q % BR2
        gmask = (a[:, None] < R1) & (qp2[None, :] < D2) & (qb[None, :] < R2)
        p2 = tl.arange(0, BD2)
        p3 = tl.arange(0, BD3)
        cur = (tl.load(idx_ptr + tl.load(perm_ptr + start)).to(tl.int64) // N3) % N2
        acc = tl.zeros((BR1, BD2 * BR2), dtype=tl.float32)
        for s in range(start, end):
            pos = tl.load(perm_ptr + s).to(tl.int64)
            i1, i2, i3 = _digits(tl.load(idx_ptr + pos).to(tl.int64), N2, N3)
            if i2 != cur:
                tl.atomic_add(d2_ptr + ((a[:, None] * N2 + cur) * D2 + qp2[None, :]) * R2 + qb[None, :], acc,
                              mask=gmask)
                acc = tl.zeros((BR1, BD2 * BR2), dtype=tl.float32)
                cur = i2
            g3 = _last(c3, i3, N3, R2, D3, BR2, BD3)
            for p1 in tl.static_range(BD1):
                gp = tl.load(grad_ptr + pos * D + (p1 * D2 + p2[:, None]) * D3 + p3[None, :],
                             mask=(p2[:, None] * 0 + p1 < D1) & (p2[:, None] < D2) & (p3[None, :] < D3), other=0.0).to(tl.float32)
                m = tl.reshape(tl.sum(gp[:, None, :] * g3[None, :, :], axis=2), (BD2 * BR2,))
                g1 = tl.load(c1 + (i1 * D1 + p1) * R1 + a, mask=(a < R1) & (a * 0 + p1 < D1), other=0.0).to(tl.float32)
                acc += g1[:, None] * m[None, :]
        tl.atomic_add(d2_ptr + ((a[:, None] * N2 + cur) * D2 + qp2[None, :]) * R2 + qb[None, :], acc, mask=gmask)

    @triton.jit
    def _bwd_first_kernel(idx_ptr, perm_ptr, grad_ptr, c1, c2, c3, d1_ptr, U, CH, N2, N3, R1, R2, D1, D2, D3,
                          BD1: tl.constexpr, BD2: tl.constexpr, BD3: tl.constexpr, BR1: tl.constexpr,
                          BR2: tl.constexpr):
        """dG1[i1] += grad_row (G2[i2] G3[i3])^T, summed over a run of equal i1."""
        start = tl.program_id(0).to(tl.int64) * CH
        end = tl.minimum(start + CH, U)
        D = D1 * D2 * D3
        p1 = tl.arange(0, BD1)
        a = tl.arange(0, BR1)
        b = tl.arange(0, BR2)
        p3 = tl.arange(0, BD3)
        gmask = (p1[:, None] < D1) & (a[None, :] < R1)
        cur = tl.load(idx_ptr + tl.load(perm_ptr + start)).to(tl.int64) // (N2 * N3)
        acc = tl.zeros((BD1, BR1), dtype=tl.float32)
        for s in range(start, end):
            pos = tl.load(perm_ptr + s).to(tl.int64)
            i1, i2, i3 = _digits(tl.load(idx_ptr + pos).to(tl.int64), N2, N3)
            if i1 != cur:
                tl.atomic_add(d1_ptr + (cur * D1 + p1[:, None]) * R1 + a[None, :], acc, mask=gmask)
                acc = tl.zeros((BD1, BR1), dtype=tl.float32)
                cur = i1
            g3 = _last(c3, i3, N3, R2, D3, BR2, BD3)
            for p2 in tl.static_range(BD2):
                g2 = tl.load(c2 + ((a[:, None] * N2 + i2) * D2 + p2) * R2 + b[None, :],
                             mask=(a[:, None] < R1) & (b[None, :] < R2) & (a[:, None] * 0 + p2 < D2), other=0.0).to(tl.float32)
                h = tl.sum(g2[:, :, None] * g3[None, :, :], axis=1)  # (BR1, BD3)
                gp = tl.load(grad_ptr + pos * D + (p1[:, None] * D2 + p2) * D3 + p3[None, :],
                             mask=(p1[:, None] < D1) & (p3[None, :] < D3) & (p1[:, None] * 0 + p2 < D2), other=0.0).to(tl.float32)
                acc += tl.sum(gp[:, None, :] * h[None, :, :], axis=2)
        tl.atomic_add(d1_ptr + (cur * D1 + p1[:, None]) * R1 + a[None, :], acc, mask=gmask)


def _pow2(n: int) -> int:
    return max(1, 1 << (int(n) - 1).bit_length())


def _meta(cores):
    c1, c2, c3 = cores
    _, n1, d1, r1 = c1.shape
    _, n2, d2, r2 = c2.shape
    _, n3, d3, _ = c3.shape
    sizes = dict(N2=n2, N3=n3, R1=r1, R2=r2, D1=d1, D2=d2, D3=d3)
    blocks = dict(BD1=_pow2(d1), BD2=_pow2(d2), BD3=_pow2(d3), BR2=_pow2(r2))
    return sizes, blocks, _pow2(r1)


# Launch parameters (module-level so that a tuning run can sweep them).
CHUNK = 16  # indices per backward program: fewer -> more programs in flight, more atomic flushes
FWD_WARPS = 4
BWD_WARPS = 4


class _TT3Rows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, c1, c2, c3):
        cores = [c.contiguous() for c in (c1, c2, c3)]
        sizes, blocks, _ = _meta(cores)
        u = indices.shape[0]
        d = sizes["D1"] * sizes["D2"] * sizes["D3"]
        out = torch.empty(u, d, device=c1.device, dtype=c1.dtype)
        if u:
            _fwd_kernel[(u,)](indices, *cores, out, *sizes.values(), **blocks, num_warps=FWD_WARPS)
        ctx.save_for_backward(indices, *cores)
        return out

    @staticmethod
    def backward(ctx, grad):
        indices, c1, c2, c3 = ctx.saved_tensors
        sizes, blocks, br1 = _meta((c1, c2, c3))
        grad = grad.contiguous()
        u = indices.shape[0]
        grads = [None, None, None]
        if u == 0:
            return (None, *[torch.zeros_like(c) if need else None
                            for c, need in zip((c1, c2, c3), ctx.needs_input_grad[1:])])
        n2, n3 = sizes["N2"], sizes["N3"]
        grid = (triton.cdiv(u, CHUNK),)
        args = (*sizes.values(),)
        if ctx.needs_input_grad[1]:
            first = torch.div(indices, n2 * n3, rounding_mode="floor")
            perm = torch.argsort(first)
            d1 = torch.zeros(c1.shape, device=c1.device, dtype=torch.float32)
            _bwd_first_kernel[grid](indices, perm, grad, c1, c2, c3, d1, u, CHUNK, *args, **blocks, BR1=br1,
                                    num_warps=BWD_WARPS)
            grads[0] = d1.to(c1.dtype)
        if ctx.needs_input_grad[2]:
            perm = torch.argsort(torch.div(indices, n3, rounding_mode="floor") % n2)
            d2 = torch.zeros(c2.shape, device=c2.device, dtype=torch.float32)
            _bwd_middle_kernel[grid](indices, perm, grad, c1, c2, c3, d2, u, CHUNK, *args, **blocks, BR1=br1,
                                     num_warps=BWD_WARPS)
            grads[1] = d2.to(c2.dtype)
        if ctx.needs_input_grad[3]:
            perm = torch.argsort(indices % n3)
            d3 = torch.zeros(c3.shape, device=c3.device, dtype=torch.float32)
            _bwd_last_kernel[grid](indices, perm, grad, c1, c2, c3, d3, u, CHUNK, *args, **blocks, num_warps=BWD_WARPS)
            grads[2] = d3.to(c3.dtype)
        return (None, *grads)


def tt3_rows(cores: Sequence[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """Rows ``W[indices]`` of a 3-core TT table through the Triton kernels (differentiable).

    ``indices`` (U,) int64 on the cores' device; duplicates are allowed (their
    gradients add up), but deduplicated indices are faster.
    """
    if not supports(cores):
        raise ValueError("the Triton TT kernels take exactly three float cores")
    return _TT3Rows.apply(indices.contiguous(), *cores)
