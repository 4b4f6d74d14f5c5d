"""TT-SVD of an embedding table viewed as a TT-matrix.

The table ``W`` (``n x d``) is padded to ``N = n_1...n_k`` rows, reshaped to
``(n_1..n_k, d_1..d_k)`` and its row and dim modes interleaved to
``(n_1 d_1, ..., n_k d_k)``.  TT-SVD of that tensor (Oseledets 2011) gives cores
``(r_{j-1}, n_j d_j, r_j)`` which are reshaped to ``(r_{j-1}, n_j, d_j, r_j)``.

Fixed ranks go through TensorLy's ``tensor_train``; the tolerance mode runs the
delta-truncated sweep of Oseledets (2011, Alg. 1) with TensorLy's SVD.

References
----------
.. [1] I. V. Oseledets, "Tensor-train decomposition", SIAM J. Sci. Comput. 33(5), 2011.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import tensor_train
from tensorly.tenalg.svd import svd_interface

from .ranks import clamp_ranks, ranks_for_budget, ranks_for_ratio
from .shapes import TTShape, factor_dims, factor_rows


@dataclass
class TTDecomposition:
    """Result of :func:`decompose_table`: the layout, the cores and the error.

    ``cores[j]`` has shape ``shape.core_shapes[j]``; ``relative_error`` is
    ``||W - W_tt||_F / ||W||_F`` over the table's real rows (0 for a zero table).
    """

    shape: TTShape
    cores: List[np.ndarray]
    relative_error: float


def check_table(weight: np.ndarray) -> np.ndarray:
    """Validate a 2D finite table; returns it as a floating numpy array."""
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"an embedding table should be 2D (rows x dim) but got shape {weight.shape}")
    n, d = weight.shape
    if n == 0 or d == 0:
        raise ValueError(f"an embedding table needs at least one row and one column but got shape {weight.shape}")
    if not np.issubdtype(weight.dtype, np.floating):
        raise ValueError(f"an embedding table should be floating point but got dtype {weight.dtype}")
    if weight.dtype not in (np.float32, np.float64):
        weight = weight.astype(np.float32)
    if not np.isfinite(weight).all():
        bad = int((~np.isfinite(weight)).any(axis=1).sum())
        raise ValueError(f"the table has NaN or Inf values in {bad} of its {n} rows; fix the checkpoint first")
    return weight


def table_to_tt_tensor(weight: np.ndarray, row_factors: Sequence[int], dim_factors: Sequence[int]) -> np.ndarray:
    """``(n, d)`` -> interleaved ``(n_1 d_1, ..., n_k d_k)`` tensor (zero-padded rows)."""
    n, d = weight.shape
    k = len(row_factors)
    padded = int(np.prod(row_factors))
    if padded != n:
        weight = np.concatenate([weight, np.zeros((padded - n, d), dtype=weight.dtype)], axis=0)
    t = weight.reshape(*row_factors, *dim_factors)
    perm = [a for j in range(k) for a in (j, k + j)]
    return np.ascontiguousarray(t.transpose(perm)).reshape([n_ * d_ for n_, d_ in zip(row_factors, dim_factors)])


def tt_to_table(cores: Sequence[np.ndarray], num_rows: Optional[int] = None) -> np.ndarray:
    """Dense ``(num_rows, d)`` table from cores ``(r_{j-1}, n_j, d_j, r_j)``."""
    k = len(cores)
    row_factors = [c.shape[1] for c in cores]
    dim_factors = [c.shape[2] for c in cores]
    flat = [c.reshape(c.shape[0], c.shape[1] * c.shape[2], c.shape[3]) for c in cores]
    full = tl.tt_to_tensor(flat).reshape([a for n, d in zip(row_factors, dim_factors) for a in (n, d)])
    perm = [2 * j for j in range(k)] + [2 * j + 1 for j in range(k)]
    table = full.transpose(perm).reshape(int(np.prod(row_factors)), int(np.prod(dim_factors)))
    return table if num_rows is None else table[:num_rows]


def relative_error(weight: np.ndarray, cores: Sequence[np.ndarray]) -> float:
    """``||W - W_tt||_F / ||W||_F`` on the real rows of ``W``."""
    approx = tt_to_table(cores, weight.shape[0])
    norm = float(np.linalg.norm(weight.astype(np.float64)))
    diff = float(np.linalg.norm((weight - approx).astype(np.float64)))
    return diff / norm if norm > 0 else diff


# below this squared relative error, ||W||^2 - 2 <W, W_tt> + ||W_tt||^2 has lost too many digits to
# cancellation (float32 cores): the table is rebuilt instead
LADDER_ERROR_MIN_SQ = 1e-3


def _ladder_error(weight: np.ndarray, norm_sq: float, projected: np.ndarray, cores: List[np.ndarray]) -> float:
    """:func:`relative_error` of a ladder's cores without rebuilding the table.

    With ``U`` the (orthonormal) first core and ``R`` the TT of the rest, ``W_tt = U R``, so
    ``||W - W_tt||^2 = ||W||^2 - 2 <U^T W, R> + ||R||^2`` (``projected`` = ``U^T W``, first unfolding),
    less the TT's padded rows (the table's are zero).
    """
    from ..kernels.reference import tt_rows
    r1 = cores[0].shape[3]
    rest = _rest_tensor(cores[1:])
    err_sq = (norm_sq - 2.0 * float(np.vdot(projected[:r1].astype(np.float64), rest.astype(np.float64)))
              + float(np.sum(np.square(rest, dtype=np.float64))))
    n, padded = weight.shape[0], int(np.prod([c.shape[1] for c in cores]))
    if padded > n:
        pad = tt_rows([torch.from_numpy(np.ascontiguousarray(c)).double() for c in cores], torch.arange(n, padded))
        err_sq -= float(pad.square().sum())
    if norm_sq <= 0 or err_sq < LADDER_ERROR_MIN_SQ * norm_sq:
        return relative_error(weight, cores)
    return math.sqrt(err_sq / norm_sq)


def _rest_tensor(cores: Sequence[np.ndarray]) -> np.ndarray:
    """The cores ``(r_0, n_j, d_j, r_j)`` after the first (left rank open) contracted: ``(r_0, prod n_j d_j)``."""
    acc = cores[0].reshape(-1, cores[0].shape[3])
    for c in cores[1:]:
        acc = (acc @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[3])
    return acc.reshape(cores[0].shape[0], -1)


def tt_svd(weight: np.ndarray, row_factors: Sequence[int], dim_factors: Sequence[int],
           rank: Union[int, Sequence[int]], svd: str = "truncated_svd",
           random_state: Optional[int] = 0) -> List[np.ndarray]:
    """TT-SVD at fixed ranks through ``tensorly.decomposition.tensor_train``.

    Parameters
    ----------
    weight : (n, d) array
    row_factors, dim_factors : the TT-matrix shape
    rank : int or list; clamped (with a warning) to what the shape allows
    svd : 'truncated_svd' (exact) or 'randomized_svd'

    Returns
    -------
    cores : list of arrays ``(r_{j-1}, n_j, d_j, r_j)``
    """
    ranks = clamp_ranks(rank, row_factors, dim_factors)
    tensor = table_to_tt_tensor(weight, row_factors, dim_factors)
    factors = tensor_train(tensor, rank=list(ranks), svd=svd, random_state=random_state)
    return [np.asarray(f).reshape(f.shape[0], n, d, f.shape[2])
            for f, n, d in zip(factors, row_factors, dim_factors)]


def tt_svd_tolerance(weight: np.ndarray, row_factors: Sequence[int], dim_factors: Sequence[int],
                     eps: float, max_rank: Optional[int] = None) -> List[np.ndarray]:
    """Delta-truncated TT-SVD: relative Frobenius error ``<= eps`` (Oseledets 2011, Alg. 1).

    Each of the ``k-1`` unfoldings keeps the fewest singular values whose discarded
    tail has norm ``<= delta = eps / sqrt(k-1) * ||W||_F``; the errors of the sweeps
    add in squares, so the total is ``<= eps``.  ``max_rank`` caps every rank (the
    error bound then no longer holds).
    """
    if not eps >= 0:
        raise ValueError(f"tolerance eps should be >= 0 but got {eps}")
    tensor = table_to_tt_tensor(weight, row_factors, dim_factors)
    delta = eps / np.sqrt(max(len(row_factors) - 1, 1)) * np.linalg.norm(tensor.astype(np.float64))
    return tolerance_sweep(tensor, row_factors, dim_factors, delta, max_rank=max_rank)


def truncation_rank(s: np.ndarray, delta: float, discarded_sq: float = 0.0) -> int:
    """Fewest leading singular values whose discarded tail (plus ``discarded_sq``, energy
    already outside ``s``) has norm ``<= delta``; at least 1, at most ``len(s)``."""
    s64 = np.asarray(s, dtype=np.float64)
    tail = np.sqrt(np.cumsum((s64 ** 2)[::-1])[::-1] + discarded_sq)  # tail[i] = ||s[i:]|| (+ outside)
    r = int(np.searchsorted(-np.append(tail, np.sqrt(discarded_sq)), -delta))  # first i with tail[i] <= delta
    return max(1, min(r, len(s64)))


def tolerance_sweep(tensor: np.ndarray, row_factors: Sequence[int], dim_factors: Sequence[int], delta: float,
                    r_prev: int = 1, max_rank: Optional[int] = None) -> List[np.ndarray]:
    """The delta-truncated sweep over the modes of ``tensor`` (its first mode carries a left
    rank ``r_prev``): cores ``(r_{j-1}, n_j, d_j, r_j)`` for ``row_factors``/``dim_factors``."""
    modes = [n * d for n, d in zip(row_factors, dim_factors)]
    k = len(modes)
    cores = []
    unfolding = tensor
    for j in range(k - 1):
        unfolding = unfolding.reshape(r_prev * modes[j], -1)
        u, s, v = svd_interface(unfolding, n_eigenvecs=min(unfolding.shape), method="truncated_svd")
        r = truncation_rank(s, delta)
        if max_rank is not None:
            r = min(r, max_rank)
        cores.append(u[:, :r].reshape(r_prev, row_factors[j], dim_factors[j], r))
        unfolding = s[:r, None] * v[:r]
        r_prev = r
    cores.append(unfolding.reshape(r_prev, row_factors[-1], dim_factors[-1], 1))
    return cores


#: the sketch of :func:`tt_svd_ladder`: extra random vectors, and power iterations from a random start
SKETCH_OVERSAMPLES = 64
SKETCH_POWER_ITERS = 4


def _orth(x: np.ndarray) -> np.ndarray:
    """An orthonormal basis of ``x``'s columns (tall, full rank): Cholesky QR in float64, a third of numpy's
    Householder QR's time on a sketch's shapes and, like it, the same bits at any thread count (numpy's BLAS
    runs one thread); Householder where the Gram matrix is not positive definite (a rank-deficient ``x``)."""
    x64 = x.astype(np.float64)
    try:
        q = x64 @ np.linalg.inv(np.linalg.cholesky(x64.T @ x64)).T
    except np.linalg.LinAlgError:
        q = None
    if q is None or not np.isfinite(q).all():
        q = np.linalg.qr(x64)[0]
    return q.astype(x.dtype)


@dataclass
class Sketch:
    """A randomized SVD of a ladder's first unfolding (its leading left singular vectors and values) that the
    next one can start from.

    Subspace iteration (``Q = orth(A S)``, then ``Q = orth(A orth(A^T Q))`` per power iteration) and the
    Rayleigh-Ritz step on ``Q^T A`` (by the eigenvectors of its small Gram matrix, in float64): from a random
    ``S`` (``seed``) with :data:`SKETCH_POWER_ITERS` iterations, or, once a call has left its subspace in
    ``basis``, from that subspace with one.  Tables that differ in a few rows (the same row map, more rows
    kept exactly) have nearly the same subspace: from it, one iteration is within 0.0001 of the exact SVD's
    error on the demo's tables, against four from random (docs/benchmarks.md)."""

    seed: int = 0
    basis: Optional[np.ndarray] = None  # the last call's Q, ``rows x (k + oversamples)``
    oversamples: int = SKETCH_OVERSAMPLES
    power_iters: int = SKETCH_POWER_ITERS  # from a random start; from ``basis``: one

    def svd(self, a: np.ndarray, k: int):
        """``(u, s)``: ``a``'s ``k`` leading left singular vectors and values; ``basis`` is left for the next call."""
        width = min(k + self.oversamples, min(a.shape))

        if self.basis is not None and self.basis.shape == (a.shape[0], width):
            q, iters = self.basis, 1
        else:
            start = np.random.default_rng(self.seed).standard_normal((a.shape[1], width)).astype(a.dtype)
            q, iters = _orth(a @ start), self.power_iters
        for _ in range(iters):
            q = _orth(a @ _orth(a.T @ q))
        b = (q.T @ a).astype(np.float64)
        values, vectors = np.linalg.eigh(b @ b.T)  # ascending
        self.basis = q
        top = vectors[:, ::-1][:, :k]
        return (q @ top.astype(q.dtype)), np.sqrt(np.maximum(values[::-1][:k], 0.0)).astype(a.dtype)


def first_unfolding(weight: np.ndarray, row_factors: Sequence[int], dim_factors: Sequence[int]) -> np.ndarray:
    """The TT-matrix tensor's first unfolding, ``n_1 d_1 x (rest)`` (a copy of the table, padded)."""
    return table_to_tt_tensor(weight, row_factors, dim_factors).reshape(row_factors[0] * dim_factors[0], -1)


def first_core_basis(first: np.ndarray, k: int, svd: str = "truncated_svd", random_state: Optional[int] = 0,
                     sketch: Optional[Sketch] = None) -> np.ndarray:
    """The ``k`` leading left singular vectors of the first unfolding ``first`` (:func:`first_unfolding`;
    ``n_1 d_1 x k``, orthonormal): by ``svd`` (``truncated_svd`` exact, ``randomized_svd`` TensorLy's range
    finder) or by ``sketch`` (:class:`Sketch`) where it is narrower than the unfolding."""
    k = min(k, min(first.shape))
    if sketch is not None and k + sketch.oversamples < min(first.shape):
        return sketch.svd(first, k)[0]
    return svd_interface(first, n_eigenvecs=k, method=svd, random_state=random_state)[0]


def tt_svd_ladder(weight: np.ndarray, row_factors: Sequence[int], dim_factors: Sequence[int],
                  rank_lists: Sequence[Sequence[int]], svd: str = "truncated_svd",
                  random_state: Optional[int] = 0, sketch: Optional[Sketch] = None,
                  basis: Optional[np.ndarray] = None, errors: bool = True,
                  unfolding: Optional[np.ndarray] = None) -> List[TTDecomposition]:
    """TT-SVD (as ``tt_svd(..., svd=svd)``: ``truncated_svd`` exact, ``randomized_svd`` TensorLy's
    randomized range finder) at several rank lists, sharing the first (largest) unfolding's basis, which
    every rank list truncates, and its projection ``U^T W``, which is the rest's table and gives every rank
    list's error without rebuilding the table.

    ``basis``: that first core's basis (:func:`first_core_basis`, at least as wide as the largest first
    rank), else computed here, by ``sketch`` if given (:class:`Sketch`: on trained tables, whose spectra
    decay slowly, within ~0.001 of the exact SVD's errors at about a quarter of its cost from a random
    start, which is what comparing many candidates needs; the later, small unfoldings stay exact).
    ``errors=False``: leave ``relative_error`` NaN (a candidate's weighted error is measured apart).
    ``unfolding``: the table's :func:`first_unfolding`, if the caller has it.

    Returns one decomposition per rank list (ranks clamped), with its relative error on the real rows.
    """
    n, d = weight.shape
    first = unfolding if unfolding is not None else first_unfolding(weight, row_factors, dim_factors)
    modes = [n_ * d_ for n_, d_ in zip(row_factors, dim_factors)]
    r_max = max(r[1] for r in rank_lists)
    if sketch is not None or basis is not None:
        rest_svd = "truncated_svd"  # the first unfolding had its own basis; the later ones are small
    else:
        rest_svd = svd
    if basis is None:
        basis = first_core_basis(first, r_max, svd, random_state, sketch)
    if basis.shape[1] < r_max:
        raise ValueError(f"the first core's basis has {basis.shape[1]} columns; the ladder needs {r_max}")
    u = basis[:, :r_max]
    projected = u.T @ first  # U^T W: the first core's coefficients, the best for that basis
    norm_sq = float(np.sum(np.square(first, dtype=np.float64))) if errors else 0.0
    del first
    out = []
    for ranks in rank_lists:
        r1 = ranks[1]
        cores = [np.ascontiguousarray(u[:, :r1]).reshape(1, row_factors[0], dim_factors[0], r1)]
        rest = projected[:r1].reshape([r1 * modes[1]] + list(modes[2:]))
        if len(modes) == 2:
            cores.append(np.ascontiguousarray(rest).reshape(r1, row_factors[1], dim_factors[1], 1))
        else:
            factors = tensor_train(rest, rank=[1] + list(ranks[2:]), svd=rest_svd, random_state=random_state)
            f0 = np.asarray(factors[0])
            cores.append(f0.reshape(r1, row_factors[1], dim_factors[1], f0.shape[2]))
            cores += [np.asarray(f).reshape(f.shape[0], n_, d_, f.shape[2])
                      for f, n_, d_ in zip(factors[1:], row_factors[2:], dim_factors[2:])]
        shape = TTShape(n, d, list(row_factors), list(dim_factors), [1] + [c.shape[3] for c in cores])
        error = _ladder_error(weight, norm_sq, projected, cores) if errors else float("nan")
        out.append(TTDecomposition(shape, cores, error))
    return out


def resolve_ranks(n: int, d: int, row_factors: Sequence[int], dim_factors: Sequence[int],
                  rank: Union[int, Sequence[int], None] = None, ratio: Optional[float] = None,
                  budget_bytes: Optional[int] = None, bytes_per_param: int = 4) -> List[int]:
    """The full rank list ``[1, r_1, ..., 1]`` for a rank, ratio or byte-budget choice (clamped)."""
    if ratio is not None:
        rank = ranks_for_ratio(ratio, n, d, row_factors, dim_factors)
    elif budget_bytes is not None:
        rank = ranks_for_budget(budget_bytes, row_factors, dim_factors, bytes_per_param)
    if rank is None:
        raise ValueError("give one of rank, ratio or budget_bytes")
    return clamp_ranks(rank, row_factors, dim_factors)


def decompose_table(weight, order: int = 3, rank: Union[int, Sequence[int], None] = None,
                    ratio: Optional[float] = None, budget_bytes: Optional[int] = None,
                    tol: Optional[float] = None, row_factors: Optional[Sequence[int]] = None,
                    dim_factors: Optional[Sequence[int]] = None, svd: str = "truncated_svd",
                    random_state: Optional[int] = 0, bytes_per_param: int = 4) -> TTDecomposition:
    """Factorize a trained table into TT cores, choosing shapes and ranks.

    Exactly one of ``rank`` (int or list), ``ratio`` (dense params / TT params),
    ``budget_bytes`` (bytes of the cores at ``bytes_per_param``) or ``tol`` (relative
    Frobenius error) selects the ranks.

    Example::

        >>> w = np.random.rand(1000, 16).astype(np.float32)
        >>> dec = decompose_table(w, rank=8)
        >>> dec.shape.row_factors, dec.shape.dim_factors, dec.shape.ranks
        ([10, 10, 10], [4, 2, 2], [1, 8, 8, 1])
    """
    weight = check_table(weight)
    n, d = weight.shape
    modes = [m for m in (rank, ratio, budget_bytes, tol) if m is not None]
    if len(modes) != 1:
        raise ValueError("give exactly one of rank, ratio, budget_bytes or tol "
                         f"(got rank={rank}, ratio={ratio}, budget_bytes={budget_bytes}, tol={tol})")
    row_factors = list(row_factors) if row_factors is not None else factor_rows(n, order)
    dim_factors = list(dim_factors) if dim_factors is not None else factor_dims(d, order)
    if tol is not None:
        cores = tt_svd_tolerance(weight, row_factors, dim_factors, tol)
    else:
        rank = resolve_ranks(n, d, row_factors, dim_factors, rank, ratio, budget_bytes, bytes_per_param)
        cores = tt_svd(weight, row_factors, dim_factors, rank, svd=svd, random_state=random_state)
    ranks = [1] + [c.shape[3] for c in cores]
    shape = TTShape(n, d, row_factors, dim_factors, ranks)
    return TTDecomposition(shape, cores, relative_error(weight, cores))
