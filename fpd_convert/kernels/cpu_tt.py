"""TT rows on the CPU: shared prefixes, batched GEMMs, no per-index Python work.

Sorted, deduplicated indices that share their leading digits ``(i_1..i_j)`` share
the partial product ``G_1[i_1] ... G_j[i_j]``; each level computes it once per
distinct prefix (``unique_consecutive`` on sorted codes is a linear scan) with one
batched GEMM, and the last level is done in the layout that CPU batched GEMM
handles fastest (``(d_k x r) @ (r x D)``, measured 2.4x faster than the other way).

:class:`EndTable` goes further for inference: it keeps the product of all cores
but one end core for every digit combination (``n_2..n_k x r_1 x d_2..d_k`` for the
first core as the end), so a row costs one weighted ``embedding_bag`` over ``d_1``
bags of ``r_1`` cached rows, in any id order.  It is rebuilt when a core changes.  It runs
on any device (the layer uses it on the CPU; ``.ci/kernel-sweep.py`` times it on a GPU
against the Triton forward).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cpu_suffix import suffix_table


def _levels(indices: torch.Tensor, row_factors: Sequence[int]):
    """Per level j (1..k): distinct prefix codes and, for j >= 2, the parent of each."""
    codes = [indices]
    parents: List[Optional[torch.Tensor]] = [None] * len(row_factors)
    for j in range(len(row_factors) - 1, 0, -1):
        up, parent = torch.unique_consecutive(torch.div(codes[0], row_factors[j], rounding_mode="floor"),
                                              return_inverse=True)
        parents[j] = parent
        codes.insert(0, up)
    return codes, parents


def _gather(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows[index]`` for a (N, a, b) tensor, gathered as 2D rows (N, a b): the 2D backward
    (``index_add`` of whole rows) made the CPU path's forward+backward 1.15-1.4x faster
    than 3D ``index_select`` (1M x 64, rank 16, 3,300 ids; A/B in one process)."""
    n, a, b = rows.shape
    return rows.reshape(n, a * b).index_select(0, index).reshape(index.numel(), a, b)


def _last_level(acc_t: torch.Tensor, last: torch.Tensor, digit: torch.Tensor) -> torch.Tensor:
    """Rows ``acc @ G_k[:, digit, :, 0]`` from ``acc_t`` (P, r, D) and the last core (r, n, d, 1) -> (P, D * d)."""
    n, d = last.shape[1], last.shape[2]
    g = _gather(last[:, :, :, 0].permute(1, 2, 0).reshape(n, d, -1), digit)  # (P, d_k, r)
    out_t = torch.bmm(g, acc_t)  # (P, d_k, D): the fast layout
    return out_t.transpose(1, 2).reshape(acc_t.shape[0], -1)


def _digit_slots(digit: torch.Tensor, n: int):
    """Group positions by digit: ``(slot of each position, slots per digit m)``, where the
    positions with digit ``i`` take slots ``i*m .. i*m + count_i - 1`` (a padded layout)."""
    counts = torch.bincount(digit, minlength=n)
    m = int(counts.max())
    order = torch.argsort(digit, stable=True)
    ranked = digit.index_select(0, order)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(digit)
    slot[order] = ranked * m + torch.arange(digit.numel(), device=digit.device) - starts.index_select(0, ranked)
    return slot, m


#: padded slots a grouped level may use per real prefix before it falls back to one GEMM a prefix
GROUPED_MAX_PADDING = 4


def tt_rows_shared(cores: Sequence[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
    """Rows ``W[indices]`` for **sorted** ``indices`` (U,) (unique or not); differentiable.

    Same values and gradients as :func:`fpd_convert.kernels.reference.tt_rows`.

    A middle level multiplies each distinct prefix's partial product by the core slice of its
    digit.  Prefixes are grouped by that digit, so the level is one batched GEMM over the
    ``n_j`` slices of the core itself, ``(n_j, m D, r) @ (n_j, r, d r')``, instead of one small
    GEMM per prefix with a gathered copy of its ``r x d r'`` slice (whose backward scattered
    the copies back): 1.6-1.8x faster forward+backward at 1M x 64, rank 16, 3,300 ids.
    Consecutive row selections are composed into one index, so each level gathers once.
    """
    row_factors = [c.shape[1] for c in cores]
    codes, parents = _levels(indices, row_factors)
    rows = cores[0][0]  # (n1, d1, r1): the partial products that `pick` selects from
    pick = codes[0]  # per distinct prefix of the current level
    k = len(cores)
    for j in range(1, k):
        digit = codes[j] % row_factors[j]
        pick = pick.index_select(0, parents[j])
        if j == k - 1:
            return _last_level(_gather(rows, pick).transpose(1, 2), cores[j], digit)
        r_in, n_j, d_j, r_out = cores[j].shape
        slices = cores[j].permute(1, 0, 2, 3).reshape(n_j, r_in, d_j * r_out)
        slot, m = _digit_slots(digit, n_j)
        if n_j * m <= GROUPED_MAX_PADDING * digit.numel():
            source = torch.zeros(n_j * m, dtype=pick.dtype, device=pick.device)  # padding: any row
            source[slot] = pick
            acc = _gather(rows, source).reshape(n_j, m * rows.shape[1], r_in)
            rows = torch.bmm(acc, slices).reshape(n_j * m, -1, r_out)
            pick = slot
        else:  # few prefixes spread over many digits: one small GEMM a prefix
            acc = _gather(rows, pick)
            rows = torch.bmm(acc, _gather(slices, digit)).reshape(acc.shape[0], -1, r_out)
            pick = torch.arange(acc.shape[0], device=pick.device)
    return _gather(rows, pick).reshape(pick.numel(), -1)  # a single core


class EndTable:
    """Cached product of all cores but one end core, for lookups without gradients.

    With the first core as the end: ``S[s] = G_2[i_2] ... G_k[i_k]`` (``r_1 x D/d_1``) for
    every suffix ``s``, and a row is ``G_1[i_1] @ S[s]``: for each ``j_1``, a weighted sum of
    ``r_1`` cached rows of ``D/d_1`` values with weights ``G_1[i_1, j_1, :]``.  That is exactly
    a weighted ``embedding_bag`` (one bag per ``(row, j_1)``), whose CPU kernel gathers and
    contracts in one pass with no per-row copy of a slice: measured 2.8x faster than
    gathering a cached prefix and multiplying by ``bmm`` (1M x 64, rank 16, 3,300 rows).
    With the last core as the end, the same with prefixes ``G_1 ... G_{k-1}`` and a transpose
    of the small output.  The end whose table fits in ``max_bytes`` is used when only one does;
    else, on the CPU, the end whose table stays in the caches (``cache_bytes``) when only one
    does, and the first end otherwise (no transpose); on other devices the end with the fewer bag
    entries per row (``d r``).

    Ids may come in any order.  ``rows(cores, ids)`` equals the reference; the cache is
    rebuilt when any core has been modified (in-place optimizer steps bump the tensor
    version) or replaced.
    """

    def __init__(self, max_bytes: int = 256 << 20, cache_bytes: int = 4 << 20):
        self.max_bytes = max_bytes
        # a product table this small is read from the CPU caches, one larger from memory: at 1M x 128
        # rank 32, [8, 4, 4], the first end's 2 MB table at 256 entries a row served 1.45-1.6x faster
        # than the last end's 122 MB at 128 (an 8 MB against a 61 MB table: a draw)
        self.cache_bytes = cache_bytes
        self._key = None
        self._table: Optional[torch.Tensor] = None  # (N_rest * r, D/d_end): rows of the product
        self._n_rest = 0  # products in the table
        self._pattern: Optional[torch.Tensor] = None  # (d_end * r,) int32: a product's bag rows from its first
        self._weights: Optional[torch.Tensor] = None  # (n_end, d_end * r): the end core's bag weights
        self._first = True
        self._offsets = torch.zeros(0, dtype=torch.int32)
        self._fits_key, self._fits = None, False

    def _first_is_end(self, cores: Sequence[torch.Tensor]) -> bool:
        """The end whose table fits in ``max_bytes`` when only one does (a long first core,
        ``factor_rows(suffix_rows=...)``, leaves a small suffix table and a huge prefix one); else,
        on the CPU, the one whose table fits in ``cache_bytes`` when only one does, and the first
        otherwise; on other devices the one with the fewer bag entries per row."""
        sizes = [self._end_bytes(cores, end) for end in (0, len(cores) - 1)]
        first, last = (size <= self.max_bytes for size in sizes)
        if first != last:
            return first
        if cores[0].device.type == "cpu":
            first, last = (size <= self.cache_bytes for size in sizes)
            # else the first end: its rows come out in the output's order, the last end's need a
            # transpose (a strided copy of every row), which cost more than its fewer bag entries saved
            # in all eleven layouts timed where neither table alone was cached (14th session: the first
            # end took 2-63% less time, against 4x fewer entries included)
            return first or not last
        return cores[0].shape[2] * cores[0].shape[3] <= cores[-1].shape[2] * cores[-1].shape[0]

    @staticmethod
    def _end_bytes(cores: Sequence[torch.Tensor], end: int) -> int:
        rest = [c for j, c in enumerate(cores) if j != end]
        n_rest = math.prod(c.shape[1] for c in rest)
        r = cores[0].shape[3] if end == 0 else cores[-1].shape[0]
        width = math.prod(c.shape[2] for c in rest)
        return n_rest * r * width * cores[0].element_size()

    def nbytes_for(self, cores: Sequence[torch.Tensor]) -> int:
        """Bytes the cache would take for these cores (the product table)."""
        return self._end_bytes(cores, 0 if self._first_is_end(cores) else len(cores) - 1)

    def fits(self, cores: Sequence[torch.Tensor]) -> bool:
        shapes = tuple(c.shape for c in cores) + (cores[0].dtype, cores[0].device, self.max_bytes, self.cache_bytes)
        if shapes != self._fits_key:  # asked on every lookup: answer from the last shapes
            self._fits_key = shapes
            self._fits = len(cores) >= 2 and self.nbytes_for(cores) <= self.max_bytes
        return self._fits

    @staticmethod
    @torch.no_grad()
    def suffixes(cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """All products ``G_2[i_2] ... G_k[i_k]`` as ``(N_suffix, r_1, d_2..d_k)``
        (:func:`fpd_convert.kernels.cpu_suffix.suffix_table`, without gradients)."""
        return suffix_table(cores)

    @staticmethod
    @torch.no_grad()
    def prefixes(cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """All products ``G_1[i_1] ... G_{k-1}[i_{k-1}]`` as ``(N_prefix, r_{k-1}, d_1..d_{k-1})``,
        level by level from the left as one GEMM each: acc ``(P, D, r)`` times core
        ``(r, n, d, r')`` -> ``(P n, D d, r')``; the last level multiplies the other way round,
        core ``(n r' d, r)`` by acc ``(r, P D)``, so that its one copy gives the table's
        ``(P n, r', D d)`` directly."""
        acc = cores[0][0]  # (n_1, d_1, r_1)
        if len(cores) == 2:
            return acc.transpose(1, 2).contiguous()
        last = len(cores) - 2
        for j in range(1, last + 1):
            p, dd, r = acc.shape
            _, n, d, r_out = cores[j].shape
            if j < last:
                prod = (acc.reshape(p * dd, r) @ cores[j].reshape(r, n * d * r_out)).reshape(p, dd, n, d, r_out)
                acc = prod.permute(0, 2, 1, 3, 4).reshape(p * n, dd * d, r_out)
            else:
                lhs = cores[j].permute(1, 3, 2, 0).reshape(n * r_out * d, r)
                prod = (lhs @ acc.reshape(p * dd, r).t()).reshape(n, r_out, d, p, dd)
                acc = prod.permute(3, 0, 1, 4, 2).reshape(p * n, r_out, dd * d)
            del prod
        return acc

    def _refresh(self, cores: Sequence[torch.Tensor]) -> None:
        key = tuple((id(c), c._version, c.device, c.dtype) for c in cores)
        if key == self._key:
            return
        self._first = self._first_is_end(cores)
        if self._first:
            table = self.suffixes(cores)
            weights = cores[0][0]  # (n_1, d_1, r_1)
        else:
            table = self.prefixes(cores)
            weights = cores[-1][..., 0].permute(1, 2, 0)  # (n_k, d_k, r_{k-1})
        n_rest, r, width = table.shape
        n_end, d_end, _ = weights.shape
        self._table = table.reshape(n_rest * r, width)
        self._weights = weights.detach().reshape(n_end, d_end * r).contiguous()
        # product p's bag for each j: rows p*r .. p*r + r - 1, i.e. p*r + pattern (int32: half the
        # bytes of int64).  Computed per lookup rather than gathered from a table of every
        # product's bags: on fresh batches that table (2.5 MB at 1M x 64) competed with the
        # product table for the CPU caches, and its gather took 70 us against ~15 for the sum.
        self._n_rest = n_rest
        small = n_rest * r < 1 << 31  # int32 bag rows where they fit
        self._pattern = torch.arange(r, dtype=torch.int32 if small else torch.int64, device=table.device).repeat(d_end)
        self._pattern_np = self._pattern.numpy() if table.device.type == "cpu" else None
        if self._offsets.device != table.device:
            self._offsets = self._offsets.to(table.device)
        self._key = key

    def rows(self, cores: Sequence[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
        """Rows ``W[indices]`` (U, D) for indices in any order, on the cores' device.

        On the CPU the digit split goes through numpy (several times faster than torch's for a few
        thousand ids); elsewhere through torch.
        """
        self._refresh(cores)
        n_rest, n_end = self._n_rest, self._weights.shape[0]
        r = self._table.shape[0] // n_rest
        if indices.device.type == "cpu":  # numpy's divmod costs a third of torch's here
            ids = indices.numpy()
            split = n_rest if self._first else n_end  # id = high * split + low
            if split & (split - 1):
                high, low = np.divmod(ids, split)
            else:  # a power of two (balanced factors often are): a shift and a mask, 3x faster
                high, low = ids >> (split.bit_length() - 1), ids & (split - 1)
            end, rest = (high, low) if self._first else (low, high)
            rest = torch.from_numpy((rest * r).astype(self._pattern_np.dtype))
            # torch's broadcast add: 10 us for 3,300 x 64 bag rows, numpy's 52 us
            bags = torch.add(rest[:, None], self._pattern).reshape(-1)
            end = torch.from_numpy(end)
        else:
            if self._first:
                end = torch.div(indices, n_rest, rounding_mode="floor")
                rest = indices - end * n_rest
            else:
                rest = torch.div(indices, n_end, rounding_mode="floor")
                end = indices - rest * n_end
            bags = torch.add((rest.to(self._pattern.dtype) * r)[:, None], self._pattern).reshape(-1)
        weights = self._weights.index_select(0, end).reshape(-1)
        count = bags.numel() // r
        if self._offsets.numel() < count:  # (kept on the table's device)
            self._offsets = torch.arange(0, max(count, 1) * r, r, dtype=torch.int32, device=bags.device)
        # table and weights hold no gradient (built without one): no graph is recorded
        out = F.embedding_bag(bags, self._table, self._offsets[:count], mode="sum", per_sample_weights=weights)
        u = indices.numel()
        if self._first:
            return out.reshape(u, -1)
        d_end = self._weights.shape[1] // r
        return out.reshape(u, d_end, -1).transpose(1, 2).reshape(u, -1)
