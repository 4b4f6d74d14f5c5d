"""Streaming TT-SVD for tables too big to hold (with copies) in memory.

The first unfolding of the TT-matrix tensor, ``A`` (``n_1 d_1 x N``), is the only
big one.  Its rows are indexed by ``(i_1, p_1)``, so a block of table rows with
the same leading digits ``i_1`` is a block of rows of ``A``: the table is read in
row chunks, in order, and each chunk is used and dropped.

``A`` is factored by a randomized range finder with power iterations (Halko,
Martinsson, Tropp 2011, Alg. 4.4): ``Y = A Omega``, then ``q`` times
``Z = orth(A^T Q)``, ``Y = A Z``; ``B = Q^T A`` and ``B = U S V^T`` give the first
core ``Q U[:, :r_1]`` and the remainder ``S V^T`` (``r_1 x N``), which is small and
goes through the in-memory TT-SVD (TensorLy).  Each product with ``A`` is one pass
over the table: ``2 + 2q`` passes in all.  Peak memory is a chunk plus ``Omega``,
``Z``, ``B`` and the remainder (each ``N x (r_1 + p)`` floats, ``N = rows * d / (n_1 d_1)``).

The error is exact, not estimated: the cores are left-orthonormal, so
``||W - W_tt||^2 = ||A||^2 - ||S V^T||^2 + ||R - R_tt||^2``, all known without
another pass.

This module does no I/O: it takes ``read_rows(start, stop) -> float32 (stop-start, d)``.

References
----------
.. [1] N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness",
   SIAM Review 53(2), 2011.
.. [2] I. V. Oseledets, "Tensor-train decomposition", SIAM J. Sci. Comput. 33(5), 2011.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from tensorly.decomposition import tensor_train

from .decompose import TTDecomposition, tolerance_sweep, truncation_rank
from .shapes import TTShape

RowReader = Callable[[int, int], np.ndarray]


def stream_plan(num_rows: int, dim: int, row_factors: Sequence[int], dim_factors: Sequence[int], sketch: int,
                chunk_bytes: int = 64 << 20) -> dict:
    """Sizes of the streaming run: unfolding shape, leading digits per chunk, bytes it needs."""
    n1, d1 = row_factors[0], dim_factors[0]
    rows_per_digit = math.prod(row_factors[1:])
    cols = rows_per_digit * (dim // d1)
    digits_per_chunk = max(1, min(n1, chunk_bytes // max(rows_per_digit * dim * 4, 1)))
    chunk = digits_per_chunk * rows_per_digit * dim * 4
    sketch_bytes = cols * sketch * 4
    # read buffer + permuted copy + product, Omega/Z, B, V^T and the remainder
    peak = 3 * chunk + 4 * sketch_bytes + 2 * (n1 * d1) * sketch * 4
    return {"unfolding": (n1 * d1, cols), "rows_per_digit": rows_per_digit, "digits_per_chunk": digits_per_chunk,
            "chunk_bytes": chunk, "peak_bytes": peak, "sketch": sketch}


def _blocks(read_rows: RowReader, num_rows: int, dim: int, row_factors, dim_factors, digits_per_chunk: int):
    """Row blocks ``(first A row, A block)`` of the first unfolding, in order."""
    n1, d1 = row_factors[0], dim_factors[0]
    m_rows = math.prod(row_factors[1:])
    rest = dim // d1
    for a in range(0, n1, digits_per_chunk):
        b = min(n1, a + digits_per_chunk)
        start, stop = a * m_rows, min(b * m_rows, num_rows)
        if stop - start == (b - a) * m_rows:
            block = read_rows(start, stop)
        else:  # the padding rows past the table's end are zeros
            block = np.zeros(((b - a) * m_rows, dim), dtype=np.float32)
            if stop > start:
                block[: stop - start] = read_rows(start, stop)
        a_blk = torch.from_numpy(block).reshape(b - a, m_rows, d1, rest).permute(0, 2, 1, 3).reshape(
            (b - a) * d1, m_rows * rest)  # a copy: the read buffer can go before the block is used
        del block
        yield a * d1, a_blk, stop - start
        del a_blk  # the consumer deletes its reference too, so the next read starts with no block alive


def _norm_sq(x: torch.Tensor, elements: int = 1 << 20) -> float:
    """Squared Frobenius norm accumulated in float64, a slice at a time (no big temporaries)."""
    flat = x.reshape(-1)
    return sum(float(torch.sum(flat[i:i + elements].double() ** 2)) for i in range(0, flat.numel(), elements))


def _orth(x: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(x.double())
    return q.float()


def streaming_tt_svd(read_rows: RowReader, num_rows: int, dim: int, row_factors: Sequence[int],
                     dim_factors: Sequence[int], ranks: Optional[Sequence[int]] = None, tol: Optional[float] = None,
                     max_rank: int = 256, oversample: int = 10, power_iters: int = 1, seed: int = 0,
                     chunk_bytes: int = 64 << 20, progress: Optional[Callable[[int], None]] = None
                     ) -> TTDecomposition:
    """TT-SVD of a ``num_rows x dim`` table read in row chunks by ``read_rows``.

    Give ``ranks`` (the full list ``[1, r_1, ..., 1]``, already clamped) or ``tol``
    (relative Frobenius error, ranks capped at ``max_rank``).  ``progress(rows)`` is
    called after each chunk of each pass.  Deterministic for a given ``seed``.
    """
    if (ranks is None) == (tol is None):
        raise ValueError("give exactly one of ranks or tol")
    return streaming_tt_svd_ladder(read_rows, num_rows, dim, row_factors, dim_factors,
                                   None if ranks is None else [ranks], tol, max_rank, oversample, power_iters, seed,
                                   chunk_bytes, progress)[0]


def streaming_tt_svd_ladder(read_rows: RowReader, num_rows: int, dim: int, row_factors: Sequence[int],
                            dim_factors: Sequence[int], rank_lists: Optional[Sequence[Sequence[int]]] = None,
                            tol: Optional[float] = None, max_rank: int = 256, oversample: int = 10,
                            power_iters: int = 1, seed: int = 0, chunk_bytes: int = 64 << 20,
                            progress: Optional[Callable[[int], None]] = None) -> List[TTDecomposition]:
    """:func:`streaming_tt_svd` at several rank lists for the passes of one: the first unfolding's sketch is
    as wide as the largest first rank needs, and every rank list truncates its SVD (a narrower rank list
    gets a wider sketch than on its own: an error at most as large).  One decomposition per rank list
    (one for ``tol``)."""
    if (rank_lists is None) == (tol is None):
        raise ValueError("give exactly one of rank lists or tol")
    m = row_factors[0] * dim_factors[0]
    r_target = max(r[1] for r in rank_lists) if rank_lists is not None else min(max_rank, m)
    sk = stream_sketch(read_rows, num_rows, dim, row_factors, dim_factors, r_target + oversample, power_iters, seed,
                       chunk_bytes, progress)
    return sk.decompositions(rank_lists, tol, max_rank)


@dataclass
class StreamSketch:
    """The first unfolding ``A`` of a streamed table as its passes left it: ``Q`` (``n_1 d_1 x w``,
    orthonormal), ``B = Q^T A`` (``w x N``) and ``||A||^2``.  Every rank list's decomposition comes from it
    without another pass (:meth:`decompositions`), and so does that of the same table with some rows
    changed (:meth:`with_rows_added`, the Rayleigh-Ritz step in the same subspace)."""

    q: torch.Tensor
    b: torch.Tensor
    norm_sq: float
    num_rows: int
    dim: int
    row_factors: List[int]
    dim_factors: List[int]

    def decompositions(self, rank_lists: Optional[Sequence[Sequence[int]]] = None, tol: Optional[float] = None,
                       max_rank: int = 256) -> List[TTDecomposition]:
        """One decomposition per rank list (one for ``tol``), each truncating the SVD of ``B``."""
        if (rank_lists is None) == (tol is None):
            raise ValueError("give exactly one of rank lists or tol")
        u_b, s, vt = torch.linalg.svd(self.b, full_matrices=False)
        full = min(self.row_factors[0] * self.dim_factors[0], self.b.shape[1])
        return [_from_first_unfolding(self.q, u_b, s, vt, self.norm_sq, self.num_rows, self.dim, self.row_factors,
                                      self.dim_factors, ranks, tol, max_rank, self.q.shape[1], full)
                for ranks in (rank_lists if rank_lists is not None else [None])]

    def with_rows_added(self, positions: np.ndarray, values: np.ndarray, chunk: int = 4096) -> "StreamSketch":
        """The sketch of the table with ``values`` (``len(positions) x dim``) added to its rows at ``positions``
        (zero there before: rows a layout keeps apart), in this sketch's subspace: ``Q^T (A + Z)``."""
        rf, df = self.row_factors, self.dim_factors
        n1, d1 = rf[0], df[0]
        suffixes, rest = math.prod(rf[1:]), self.dim // d1
        bt = self.b.T.contiguous()  # (N, w): rows of B^T get the added columns
        q = self.q.reshape(n1, d1, -1)
        for i in range(0, positions.size, chunk):
            pos = torch.from_numpy(np.asarray(positions[i:i + chunk], dtype=np.int64))
            z = torch.from_numpy(np.ascontiguousarray(values[i:i + chunk], dtype=np.float32)).reshape(-1, d1, rest)
            i1, s = pos // suffixes, (pos % suffixes).numpy()
            contrib = torch.einsum("eaw,eab->ebw", q[i1], z)  # (E, rest, w)
            cols = torch.from_numpy(s[:, None] * rest + np.arange(rest)[None, :]).reshape(-1)  # (i_2.., p_2..)
            bt.index_add_(0, cols, contrib.reshape(-1, contrib.shape[2]))
        added = float(np.sum(np.square(values, dtype=np.float64)))
        return StreamSketch(self.q, bt.T.contiguous(), self.norm_sq + added, self.num_rows, self.dim, rf, df)


def stream_sketch(read_rows: RowReader, num_rows: int, dim: int, row_factors: Sequence[int],
                  dim_factors: Sequence[int], width: int, power_iters: int = 1, seed: int = 0,
                  chunk_bytes: int = 64 << 20, progress: Optional[Callable[[int], None]] = None) -> StreamSketch:
    """The passes over the table (``2 + 2 * power_iters``): the range finder of the first unfolding, ``width``
    vectors wide (capped by the unfolding), and ``B = Q^T A``."""
    k = len(row_factors)
    if k < 2:
        raise ValueError("the streaming TT-SVD needs at least two cores")
    n1, d1 = row_factors[0], dim_factors[0]
    m = n1 * d1
    cols = math.prod(row_factors[1:]) * (dim // d1)
    sketch = min(m, cols, width)
    plan = stream_plan(num_rows, dim, row_factors, dim_factors, sketch, chunk_bytes)

    def passes():
        return _blocks(read_rows, num_rows, dim, row_factors, dim_factors, plan["digits_per_chunk"])

    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(cols, sketch, generator=gen)
    y = torch.empty(m, sketch)
    norm_sq = 0.0
    for r0, a_blk, read in passes():
        y[r0:r0 + a_blk.shape[0]] = a_blk @ omega
        norm_sq += _norm_sq(a_blk)
        del a_blk  # before the next block is read
        if progress:
            progress(read)
    del omega
    q = _orth(y)
    for _ in range(power_iters):
        z = torch.zeros(cols, sketch)
        for r0, a_blk, read in passes():
            z.addmm_(a_blk.T, q[r0:r0 + a_blk.shape[0]])
            del a_blk
            if progress:
                progress(read)
        z = _orth(z)
        for r0, a_blk, read in passes():
            y[r0:r0 + a_blk.shape[0]] = a_blk @ z
            del a_blk
            if progress:
                progress(read)
        del z
        q = _orth(y)
    del y
    b = torch.zeros(sketch, cols)
    for r0, a_blk, read in passes():
        b.addmm_(q[r0:r0 + a_blk.shape[0]].T, a_blk)
        del a_blk
        if progress:
            progress(read)
    return StreamSketch(q, b, norm_sq, num_rows, dim, list(row_factors), list(dim_factors))


def _from_first_unfolding(q, u_b, s, vt, norm_sq: float, num_rows: int, dim: int, row_factors, dim_factors,
                          ranks, tol, max_rank: int, sketch: int, full: int) -> TTDecomposition:
    """The decomposition at ``ranks`` (or ``tol``) from the first unfolding's sketched SVD ``q u_b s vt``."""
    k = len(row_factors)
    n1, d1 = row_factors[0], dim_factors[0]
    s64 = s.double().numpy()
    if tol is not None:
        delta = tol / math.sqrt(k - 1) * math.sqrt(norm_sq)
        outside = max(norm_sq - float(np.sum(s64 ** 2)), 0.0)  # energy the sketch did not capture
        r1 = truncation_rank(s64, delta, outside)
        if r1 == len(s64) and sketch < full:
            warnings.warn(f"the tolerance {tol} needs more than {sketch} singular vectors of the first "
                          f"unfolding; the first rank is capped at {sketch} (raise max_rank)")
    else:
        r1 = ranks[1]
    first = (q @ u_b[:, :r1]).numpy().reshape(1, n1, d1, r1)
    remainder = (s[:r1, None] * vt[:r1]).numpy()  # (r1, N), columns (i_2..i_k, p_2..p_k)
    kept_sq = float(np.sum(remainder.astype(np.float64) ** 2))
    rf, df = list(row_factors[1:]), list(dim_factors[1:])
    t = remainder.reshape([r1] + rf + df)
    perm = [0] + [a for j in range(len(rf)) for a in (1 + j, 1 + len(rf) + j)]
    rem_tensor = np.ascontiguousarray(t.transpose(perm)).reshape([r1 * rf[0] * df[0]] +
                                                                [n * d for n, d in zip(rf[1:], df[1:])])
    del t, remainder
    if len(rf) == 1:
        rest = [rem_tensor.reshape(r1, rf[0], df[0], 1)]
    elif tol is not None:
        rest = tolerance_sweep(rem_tensor, rf, df, delta, r_prev=r1, max_rank=max_rank)
    else:
        inner = [1] + list(ranks[2:])
        factors = tensor_train(rem_tensor if rem_tensor.ndim > 1 else rem_tensor[:, None], rank=inner,
                               svd="truncated_svd")
        rest = [np.asarray(f) for f in factors]
        rest[0] = rest[0].reshape(r1, rf[0], df[0], rest[0].shape[2])
        rest[1:] = [f.reshape(f.shape[0], n, d, f.shape[2]) for f, n, d in zip(rest[1:], rf[1:], df[1:])]
    rem_err_sq = _remainder_error_sq(rem_tensor, rest)
    err_sq = max(norm_sq - kept_sq, 0.0) + rem_err_sq
    cores = [first.astype(np.float32)] + [c.astype(np.float32) for c in rest]
    shape = TTShape(num_rows, dim, list(row_factors), list(dim_factors), [1] + [c.shape[3] for c in cores])
    rel = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else math.sqrt(err_sq)
    return TTDecomposition(shape, cores, rel)


def _remainder_error_sq(rem_tensor: np.ndarray, rest: List[np.ndarray], rows: int = 4096) -> float:
    """``||R - R_tt||^2`` for the remainder and its cores (left rank open)."""
    if len(rest) == 1:
        return 0.0
    if len(rest) == 2:  # R = C_1 C_2 as a matrix product: compare in row chunks
        left = rest[0].reshape(-1, rest[0].shape[3])
        right = rest[1].reshape(rest[1].shape[0], -1)
        mat = rem_tensor.reshape(left.shape[0], -1)
        total = 0.0
        for i in range(0, left.shape[0], rows):
            diff = mat[i:i + rows].astype(np.float64) - left[i:i + rows].astype(np.float64) @ right
            total += float(np.sum(diff ** 2))
        return total
    # left-orthonormal cores (each step an orthogonal projection): ||R_tt|| = ||last core||
    kept = float(np.sum(rest[-1].astype(np.float64) ** 2))
    return max(float(np.sum(rem_tensor.astype(np.float64) ** 2)) - kept, 0.0)


def streaming_peak_bytes(num_rows: int, dim: int, row_factors: Sequence[int], dim_factors: Sequence[int],
                         rank: int, oversample: int = 10, chunk_bytes: int = 64 << 20) -> int:
    """Bytes the streaming path is expected to need for one table (besides the process)."""
    sketch = min(row_factors[0] * dim_factors[0], math.prod(row_factors[1:]) * (dim // dim_factors[0]),
                 rank + oversample)
    return stream_plan(num_rows, dim, row_factors, dim_factors, sketch, chunk_bytes)["peak_bytes"]
