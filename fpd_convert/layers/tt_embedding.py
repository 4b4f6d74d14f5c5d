"""Drop-in TT replacements for ``nn.EmbeddingBag`` and ``nn.Embedding``.

The table ``W`` (``num_embeddings x embedding_dim``) is held as TT cores
``G_j`` of shape ``(r_{j-1}, n_j, d_j, r_j)``; row ``i`` with digits
``(i_1..i_k)`` is ``G_1[i_1] G_2[i_2] ... G_k[i_k]``.  A forward pass deduplicates
the batch's indices, builds only those rows (:func:`tt_rows`) and hands pooling to
``torch.nn.functional.embedding_bag`` / ``embedding``, so modes, offsets, padding
and their errors behave exactly as in PyTorch.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..tt import TTDecomposition, TTShape, clamp_ranks, decompose_table, factor_dims, factor_rows
from ..kernels.cpu_pool import pool_rows
from ..kernels.cpu_sort import sort_with_positions
from ..kernels.cpu_dedup import distinct_ids
from ..kernels.cpu_tt import EndTable
from ..kernels.triton_entries import entry_bags, order_by_suffix, suffix_major_codes
from ..kernels.triton_pooled import pooled_bags
from ..kernels.triton_suffix import SuffixCache
from .row_index import BitRank, build_row_index, row_codes
from .tt_lookup import (cuda_graphs, default_kernel, lookup_rows, pools_in_one_pass,
                        range_check_stash, rows_from_end_table, sync_free, trains_sync_free)


def _unique(flat: torch.Tensor, limit: int):
    """Sorted distinct values and the inverse map, for ids already checked to be in ``[0, limit)``.

    On the CPU the ids are sorted with their positions (:func:`fpd_convert.kernels.cpu_sort.sort_with_positions`),
    which then give the inverse.
    """
    if flat.device.type != "cpu" or flat.numel() == 0:
        uniq, inverse = torch.unique(_sort_keys(flat, limit), return_inverse=True)
        return uniq.to(flat.dtype), inverse
    ids = flat.numpy()
    found = sort_with_positions(ids, limit)
    if found is None:  # the key would overflow: plain unique
        uniq, inverse = np.unique(ids, return_inverse=True)
        return torch.from_numpy(uniq.astype(np.int64, copy=False)), torch.from_numpy(inverse.reshape(-1)).long()
    values, pos = found
    n = ids.size
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(values[1:], values[:-1], out=first[1:])
    inverse = np.empty(n, dtype=np.int64)
    inverse[pos] = first.cumsum() - 1
    return torch.from_numpy(values[first]), torch.from_numpy(inverse)


def _sort_keys(flat: torch.Tensor, limit: int) -> torch.Tensor:
    """Ids as sort keys: int32 on a GPU where they fit (a radix sort of half the passes of int64;
    65k ids on an H100: ``torch.unique`` 0.14 vs 0.18 ms)."""
    if flat.device.type != "cpu" and limit <= 1 << 31 and flat.dtype == torch.int64:
        return flat.int()
    return flat


def _device_dedup(input: torch.Tensor) -> bool:
    """Whether a bag lookup of ``input`` dedups with :func:`_dedup_launch` (on a GPU; the tests
    also switch it on for CPU tensors) rather than numpy's sort."""
    return input.device.type != "cpu"


class _Dedup(NamedTuple):
    """A GPU dedup launched (:func:`_dedup_launch`) whose host values are not read yet."""
    keys: torch.Tensor  # sorted ids (sort keys)
    perm: torch.Tensor  # sorted position -> input position
    run: torch.Tensor  # 1-based run of each sorted id
    head: torch.Tensor  # int64 [min, max, count] (+ [probe]): what the host must read
    dtype: torch.dtype


def _dedup_launch(flat: torch.Tensor, limit: int, probe: Optional[torch.Tensor] = None) -> _Dedup:
    """The device half of :func:`_unique_device`: sorts and counts with no host sync."""
    lo, hi = torch.aminmax(flat)
    keys, perm = torch.sort(_sort_keys(flat, limit))
    first = torch.empty(keys.shape, dtype=torch.bool, device=keys.device)
    first[:1] = True
    torch.ne(keys[1:], keys[:-1], out=first[1:])
    run = torch.cumsum(first, 0)
    head = [lo.long().view(1), hi.long().view(1), run[-1:]]
    return _Dedup(keys, perm, run, torch.cat(head + ([probe.long().view(1)] if probe is not None else [])),
                  flat.dtype)


def _dedup_finish(dedup: _Dedup, values: Sequence[int]):
    """``(uniq, inverse, lo, hi, probe value)`` of a launched dedup, given its ``head`` read on the host."""
    run = dedup.run - 1
    inverse = torch.empty_like(run).scatter_(0, dedup.perm, run)
    uniq = dedup.keys.new_empty(values[2]).scatter_(0, run, dedup.keys).to(dedup.dtype)  # each run writes its id
    return uniq, inverse, values[0], values[1], (bool(values[3]) if len(values) > 3 else None)


def _unique_device(flat: torch.Tensor, limit: int, probe: Optional[torch.Tensor] = None):
    """GPU dedup with a single host sync, which also reads the ids' range and ``probe``.

    ``torch.unique`` syncs to learn the count, and the range check would sync again: here the
    ids are sorted, the first of each run marked and counted, and the count, min, max and probe
    come back in one read.  Returns ``(uniq, inverse, lo, hi, probe value)``; the caller checks
    the range before using ``uniq`` (ids out of int32 range were sorted wrapped, so the results
    are only meaningful once ``lo``/``hi`` are checked).  :class:`fpd_convert.layers.grouped.GroupedLookups`
    launches the dedups of several tables first and reads all their values in one sync."""
    dedup = _dedup_launch(flat, limit, probe)
    return _dedup_finish(dedup, dedup.head.tolist())  # the one sync


class _Entries(NamedTuple):
    """A batch's entries sorted by id, for :func:`fpd_convert.kernels.triton_entries.entry_bags`."""
    codes: torch.Tensor  # sorted: TT position, -1 - k for exact row k, or skip (padding)
    pos: torch.Tensor  # each sorted entry's position in the batch
    bags: int
    bag_of: Optional[torch.Tensor]  # the bag of each batch position (-1: none), or
    bag_len: Optional[int]  # bags of this many consecutive entries
    skip: Optional[int]
    suffix_major: bool = False  # codes in suffix-major order (triton_entries.suffix_major_codes)


class StartedLookup(NamedTuple):
    """A bag lookup begun by :meth:`TTEmbeddingBag.start_lookup`."""
    input: torch.Tensor
    offsets: Optional[torch.Tensor]
    per_sample_weights: Optional[torch.Tensor]
    one_hot: Union[bool, torch.Tensor]  # a 0-dim GPU probe, read with the dedup
    dedup: Optional[_Dedup]  # launched on a GPU; None: all done in finish_lookup
    #: bags pooled in one pass (no dedup): int64 ``[min id, max id, offsets valid]`` to read
    pooled: Optional[torch.Tensor] = None
    #: trained from sorted entries with no host sync (nothing to read; errors are deferred)
    entries: Optional[_Entries] = None
    #: served in one pass with no host sync (entries of bad ids left out; their range error deferred)
    unchecked: bool = False

    @property
    def head(self) -> Optional[torch.Tensor]:
        """What :meth:`TTEmbeddingBag.finish_lookup` must read on the host (None: nothing launched)."""
        return self.dedup.head if self.dedup is not None else self.pooled


class TTIndexError(IndexError, RuntimeError):
    """An index outside ``[0, num_embeddings)``.

    Also a ``RuntimeError``, which is what ``nn.EmbeddingBag`` raises, so code that
    catches either keeps working.
    """


_UNSUPPORTED = ("max_norm", "scale_grad_by_freq", "sparse")


class _TTTable(nn.Module):
    """What both layers share: the cores, index checks, row lookup, (de)serialization."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: Union[int, Sequence[int]] = 16,
                 order: int = 3, row_factors: Optional[Sequence[int]] = None,
                 dim_factors: Optional[Sequence[int]] = None, padding_idx: Optional[int] = None,
                 init_std: Optional[float] = None, device=None, dtype=None,
                 _cores: Optional[Sequence[torch.Tensor]] = None):
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"num_embeddings and embedding_dim should be >= 1 but got "
                             f"{num_embeddings} and {embedding_dim}")
        row_factors = list(row_factors) if row_factors is not None else factor_rows(num_embeddings, order)
        dim_factors = list(dim_factors) if dim_factors is not None else factor_dims(embedding_dim, order)
        ranks = clamp_ranks(rank, row_factors, dim_factors)
        self.tt_shape = TTShape(num_embeddings, embedding_dim, row_factors, dim_factors, ranks)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        if padding_idx is not None:
            if padding_idx < 0:
                padding_idx += num_embeddings
            if not 0 <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be within num_embeddings ({num_embeddings}) "
                                 f"but got {padding_idx}")
        self.padding_idx = padding_idx
        if _cores is None:
            # Each row entry sums prod(r) products of k core entries: pick the core std
            # so that entries have std init_std (default 1/sqrt(n), like DLRM's init).
            std = init_std if init_std is not None else 1.0 / math.sqrt(num_embeddings)
            core_std = (std ** 2 / math.prod(ranks)) ** (1.0 / (2 * len(ranks) - 2))
            _cores = [torch.randn(s, device=device, dtype=dtype or torch.float32) * core_std
                      for s in self.tt_shape.core_shapes]
        else:
            for j, (c, s) in enumerate(zip(_cores, self.tt_shape.core_shapes)):
                if tuple(c.shape) != tuple(s):
                    raise ValueError(f"core {j} should have shape {s} but got {tuple(c.shape)}")
            _cores = [c.to(device=device, dtype=dtype) if (device or dtype) else c for c in _cores]
        self.cores = nn.ParameterList([nn.Parameter(c) for c in _cores])
        self.reconstruction_error: Optional[float] = None
        #: row path: "auto", "reference", "cpu" or "triton" (see layers.tt_lookup)
        self.kernel = default_kernel()
        self._row_cache = EndTable()
        self._suffix_cache = SuffixCache()
        # fidelity options (docs/format.md): a hot-row map and rows kept exactly; set by
        # set_row_map / set_exact_rows, absent (and not in the state_dict) otherwise
        self.register_buffer("row_map", None)
        self.register_buffer("exact_ids", None)
        self.exact_rows: Optional[nn.Parameter] = None
        self.register_buffer("_map_from", None, persistent=False)
        self.register_buffer("_map_to", None, persistent=False)
        # both merged: the ids not at their own TT position and their codes (layers.row_index)
        self.register_buffer("_index_ids", None, persistent=False)
        self.register_buffer("_index_codes", None, persistent=False)
        self._bit_rank = (None, None)  # (the _index_ids it was built from, BitRank) on the CPU

    # -- fidelity: row map and exact rows --------------------------------------------
    def set_row_map(self, hot_ids: torch.Tensor) -> None:
        """Table rows ``hot_ids`` live at TT rows ``0..H-1``; the rows they displace take the
        hot rows' old places (``fpd_convert.tt.importance``)."""
        from ..tt.importance import row_map_moves
        hot = torch.as_tensor(hot_ids, dtype=torch.int64).reshape(-1)
        if hot.numel() and (hot.min() < 0 or hot.max() >= self.num_embeddings or hot.unique().numel() != hot.numel()):
            raise ValueError("a row map needs distinct row ids within the table")
        rows, pos = row_map_moves(hot.cpu().numpy())
        order = rows.argsort()
        device = self.cores[0].device
        self.row_map = hot.to(device)
        self._map_from = torch.from_numpy(rows[order]).to(device)
        self._map_to = torch.from_numpy(pos[order]).to(device)
        self._index_ids, self._index_codes = build_row_index(self._map_from, self._map_to, self.exact_ids)

    def set_exact_rows(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows ``ids`` are looked up from ``rows`` (a trainable parameter), not from the TT."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        order = ids.argsort()
        ids, rows = ids[order], torch.as_tensor(rows)[order]
        if rows.shape != (ids.numel(), self.embedding_dim):
            raise ValueError(f"exact rows should have shape ({ids.numel()}, {self.embedding_dim}) but got "
                             f"{tuple(rows.shape)}")
        if ids.numel() and (ids[0] < 0 or ids[-1] >= self.num_embeddings or (ids[1:] == ids[:-1]).any()):
            raise ValueError("exact rows need distinct row ids within the table")
        device = self.cores[0].device
        self.exact_ids = ids.to(device)
        self.exact_rows = nn.Parameter(rows.detach().to(device, self.cores[0].dtype).clone(),
                                       requires_grad=self.cores[0].requires_grad)
        self._index_ids, self._index_codes = build_row_index(self._map_from, self._map_to, self.exact_ids)

    def _codes(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Per id: its TT position (>= 0) or ``-1 - k`` for exact row k; None without map or exact rows."""
        if self._index_ids is None or self._index_ids.numel() == 0:
            return None
        bit_rank = None
        if ids.device.type == "cpu":
            built_from, bit_rank = self._bit_rank
            if built_from is not self._index_ids:
                bit_rank = BitRank(self._index_ids.numpy(), self.num_embeddings)
                self._bit_rank = (self._index_ids, bit_rank)
        return row_codes(self._index_ids, self._index_codes, ids, bit_rank)

    def _rows_for(self, uniq: torch.Tensor) -> torch.Tensor:
        """Rows of sorted distinct ids, through the row map and exact rows when present."""
        rows, order = self._rows_and_order(uniq)
        return rows if order is None else rows.index_select(0, order)

    def _rows_and_order(self, uniq: torch.Tensor):
        """``(rows, order)``: the rows of distinct ids are ``rows[order]`` (order None: in the ids' order).
        The ids are sorted, or in any order where the rows come from the CPU end table
        (:func:`~fpd_convert.layers.tt_lookup.rows_from_end_table`).

        Ids with an exact row are not looked up in the TT at all: with exact rows for the
        hottest ids, a batch computes TT rows only for the rest.  Their rows come after the
        TT rows; a lookup folds ``order`` into its own gather instead of reordering them.
        """
        codes = self._codes(uniq)
        if codes is None:
            return self._tt_rows(uniq, is_sorted=True), None
        exact = codes < 0
        if uniq.device.type == "cpu":
            ex = exact.numpy()
            hits, misses = torch.from_numpy(np.flatnonzero(ex)), torch.from_numpy(np.flatnonzero(~ex))
        else:
            hits, misses = exact.nonzero().reshape(-1), (~exact).nonzero().reshape(-1)
        if hits.numel() == 0:
            return self._tt_rows(codes, is_sorted=False), None
        kept = self.exact_rows.index_select(0, -1 - codes.index_select(0, hits))
        if misses.numel() == 0:
            return kept, None
        tt = self._tt_rows(codes.index_select(0, misses), is_sorted=False)
        order = torch.empty_like(codes)  # TT rows first, then exact rows
        order[misses] = torch.arange(misses.numel(), device=codes.device)
        order[hits] = torch.arange(misses.numel(), codes.numel(), device=codes.device)
        return torch.cat([tt, kept.to(tt.dtype)]), order

    @property
    def row_cache_bytes(self) -> int:
        """Most bytes an inference cache may take (default 256 MB; 0 turns caching off).

        Without gradients, the CPU path keeps the product of all cores but one end core
        (``fpd_convert.kernels.cpu_tt.EndTable``), and the Triton path the product of the last
        two cores (``fpd_convert.kernels.triton_suffix.SuffixCache``), while it fits in this
        many bytes."""
        return self._row_cache.max_bytes

    @row_cache_bytes.setter
    def row_cache_bytes(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"row_cache_bytes should be >= 0 but got {value}")
        self._row_cache = EndTable(max_bytes=int(value))  # new, empty caches: memory is given back
        self._suffix_cache = SuffixCache(max_bytes=int(value))

    def _core_list(self) -> list:
        """The cores, in order (ParameterList's own iteration costs ~3 us a core on every lookup)."""
        return list(self.cores._parameters.values())

    def _tt_rows(self, positions: torch.Tensor, is_sorted: bool) -> torch.Tensor:
        """Rows at distinct TT positions."""
        return lookup_rows(self._core_list(), positions, self.kernel, self._row_cache, is_sorted=is_sorted,
                           suffix_cache=self._suffix_cache)

    def load_table(self, table) -> None:
        """Cores, row map and exact rows of a decoded compressed table (``TableTensors``)."""
        with torch.no_grad():
            for c, v in zip(self.cores, table.cores):
                c.copy_(v)
        if table.row_map is not None:
            self.set_row_map(table.row_map)
        if table.exact_ids is not None:
            self.set_exact_rows(table.exact_ids, table.exact_rows)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def _from_decomposition(cls, dec: TTDecomposition, **layer_kwargs):
        s = dec.shape
        module = cls(s.num_rows, s.dim, rank=s.ranks, row_factors=s.row_factors, dim_factors=s.dim_factors,
                     _cores=[torch.from_numpy(np.ascontiguousarray(c)) for c in dec.cores], **layer_kwargs)
        module.reconstruction_error = dec.relative_error
        return module

    @classmethod
    def _decompose(cls, weight: torch.Tensor, layer_kwargs: dict, tt_kwargs: dict):
        weight = weight.detach()
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        dec = decompose_table(weight.to("cpu", dtype).numpy(), **tt_kwargs)
        module = cls._from_decomposition(dec, **layer_kwargs)
        return module.to(weight.device)

    # -- lookup -----------------------------------------------------------------------
    def _check_type(self, input: torch.Tensor) -> None:
        if input.dtype not in (torch.int32, torch.int64):
            raise RuntimeError("Expected tensor for argument #1 'indices' to have one of the following "
                               f"scalar types: Long, Int; but got {input.dtype} instead")

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < 0 or hi >= self.num_embeddings:
            bad = lo if lo < 0 else hi
            raise TTIndexError(f"index {bad} is out of range for a table of {self.num_embeddings} rows "
                               f"(valid: 0..{self.num_embeddings - 1})")

    def _check_indices(self, input: torch.Tensor) -> None:
        """Raise on ids of a wrong type or out of range."""
        self._check_type(input)
        if input.numel():
            if input.device.type == "cpu":  # numpy's min and max: a third of aminmax's time
                flat = input.reshape(-1).numpy()
                self._check_range(int(flat.min()), int(flat.max()))
            else:
                self._check_range(*torch.stack(torch.aminmax(input)).tolist())

    def _checked_unique(self, input: torch.Tensor, probe: Optional[torch.Tensor] = None):
        """``(uniq, inverse, probe value)`` of checked ids; on a GPU in one host sync (see
        :func:`_unique_device`), where ``probe`` (a 0-dim tensor) is read in the same sync."""
        flat = input.reshape(-1)
        if flat.device.type == "cpu" or flat.numel() == 0:
            any_order = rows_from_end_table(self._core_list(), self.kernel, self._row_cache)
            uniq, inverse = self._cpu_unique(input, any_order)
            return uniq, inverse, None if probe is None else bool(probe)
        self._check_type(input)
        uniq, inverse, lo, hi, value = _unique_device(flat, self.num_embeddings, probe)
        self._check_range(lo, hi)
        return uniq, inverse, value

    def _cpu_unique(self, input: torch.Tensor, any_order: bool):
        """``(uniq, inverse)`` of a CPU batch, its ids checked.  ``any_order``: the distinct ids may come
        in any order (for the end table), found without a sort by
        :func:`fpd_convert.kernels.cpu_dedup.distinct_ids`, whose bounds check is the range check
        (``inverse`` int32); else sorted (``inverse`` int64)."""
        self._check_type(input)
        flat = input.reshape(-1)
        if any_order and flat.numel():
            try:
                found = distinct_ids(flat.numpy(), self.num_embeddings)
            except IndexError:  # out of range: the check below says which id
                found = None
            if found is not None:
                return torch.from_numpy(found[0].astype(np.int64, copy=False)), torch.from_numpy(found[1])
        self._check_indices(input)
        return _unique(flat, self.num_embeddings)

    def _unique_rows(self, input: torch.Tensor, probe: Optional[torch.Tensor] = None):
        """(rows of the unique indices (U, d), inverse map shaped like input, padding position,
        probe value)."""
        uniq, inverse, value = self._checked_unique(input, probe)
        return self._rows_of_unique(uniq, inverse, input.shape) + (value,)

    def _rows_of_unique(self, uniq: torch.Tensor, inverse: torch.Tensor, shape: torch.Size):
        """``(rows (U, d), inverse shaped like the input, padding position)`` of checked distinct ids."""
        order = None
        if uniq.numel() == 0:  # empty batch: one dummy row keeps the pooling ops happy
            rows = self.cores[0].new_zeros(1, self.embedding_dim)
        else:
            rows, order = self._rows_and_order(uniq.long())
        pad = None
        if self.padding_idx is not None:
            hit = (uniq == self.padding_idx).nonzero()
            pad = int(hit[0, 0]) if hit.numel() else None
        if order is not None:  # rows are not in id order: look them up where they are
            inverse = order.index_select(0, inverse.reshape(-1))
            pad = None if pad is None else int(order[pad])
        return rows, inverse.reshape(shape), pad

    def safe_chunk(self, budget_bytes: int = 64 << 20) -> int:
        """Ids per lookup call that keep the per-index core-slice copies of the plain paths
        (``ids x r_in x d x r_out`` floats for the largest core) under ``budget_bytes``."""
        per_id = max(c.shape[0] * c.shape[2] * c.shape[3] for c in self.cores) * 4 + self.embedding_dim * 8
        return max(256, budget_bytes // per_id)

    @torch.no_grad()
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``W[ids]`` (any order, duplicates allowed) in chunks of :meth:`safe_chunk`, without
        gradients: bounded memory however many ids (evaluation, export)."""
        ids = ids.reshape(-1).long()
        self._check_indices(ids)
        out = []
        step = self.safe_chunk()
        for s in range(0, ids.numel(), step):
            uniq, inverse = _unique(ids[s:s + step], self.num_embeddings)
            out.append(self._rows_for(uniq).index_select(0, inverse.to(uniq.device)))
        return torch.cat(out) if out else self.cores[0].new_zeros(0, self.embedding_dim)

    @torch.no_grad()
    def to_dense(self, chunk_rows: Optional[int] = None) -> torch.Tensor:
        """The full ``(num_embeddings, embedding_dim)`` table, built in row chunks."""
        device = self.cores[0].device
        chunk_rows = chunk_rows or min(1 << 16, self.safe_chunk())
        parts = [self._rows_for(torch.arange(s, min(s + chunk_rows, self.num_embeddings), device=device))
                 for s in range(0, self.num_embeddings, chunk_rows)]
        return torch.cat(parts)

    def param_count(self) -> int:
        """``sum_j r_{j-1} n_j d_j r_j`` plus exact rows (equals ``sum(p.numel() for p in parameters())``)."""
        return self.tt_shape.param_count + (self.exact_rows.numel() if self.exact_rows is not None else 0)

    def extra_repr(self) -> str:
        s = self.tt_shape
        out = (f"{self.num_embeddings}, {self.embedding_dim}, row_factors={s.row_factors}, "
               f"dim_factors={s.dim_factors}, ranks={s.ranks}, params={s.param_count}")
        if self.padding_idx is not None:
            out += f", padding_idx={self.padding_idx}"
        if self.kernel != "auto":
            out += f", kernel={self.kernel!r}"
        if self.row_map is not None:
            out += f", row_map={self.row_map.numel()}"
        if self.exact_ids is not None:
            out += f", exact_rows={self.exact_ids.numel()}"
        return out


def _refuse_unsupported(module: nn.Module) -> None:
    if getattr(module, "max_norm", None) is not None:
        raise ValueError("max_norm renormalizes stored rows in place, which a TT table cannot do; "
                         "build the TT layer from a module with max_norm=None")


class TTEmbeddingBag(_TTTable):
    """TT-factorized ``nn.EmbeddingBag`` with the same forward contract.

    Args:
        num_embeddings, embedding_dim: table shape ``(n, d)``.
        rank: TT ranks (int or list), clamped to what the shape allows.
        order: number of cores k (2 to 4) when factors are not given.
        mode: ``"sum"``, ``"mean"`` or ``"max"`` (default ``"mean"``, as PyTorch).
        padding_idx, include_last_offset: as in ``nn.EmbeddingBag``.

    Shape: ``input`` (B, L) or (N,) with ``offsets`` (B,) -> output (B, d).

    Example::

        >>> bag = TTEmbeddingBag(1_000_000, 64, rank=16, mode="sum")
        >>> bag(torch.tensor([1, 2, 999_999, 5]), torch.tensor([0, 3])).shape
        torch.Size([2, 64])
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: Union[int, Sequence[int]] = 16,
                 order: int = 3, row_factors=None, dim_factors=None, mode: str = "mean",
                 padding_idx: Optional[int] = None, include_last_offset: bool = False,
                 init_std: Optional[float] = None, device=None, dtype=None, _cores=None):
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"mode should be 'sum', 'mean' or 'max' but got {mode!r}")
        super().__init__(num_embeddings, embedding_dim, rank, order, row_factors, dim_factors, padding_idx,
                         init_std, device, dtype, _cores)
        self.mode = mode
        self.include_last_offset = include_last_offset
        self._arange = torch.zeros(0, dtype=torch.int64)  # cached 0..n-1 to recognize one-hot offsets
        self._deferred = None  # the range of a lookup trained without a host sync, read by the next one

    def forward(self, input: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input.is_cuda and cuda_graphs():  # a sync-free training lookup replayed from CUDA graphs
            from .graphed import graphed_lookups  # (that module builds on this one)
            outs = graphed_lookups([(self, input, offsets, per_sample_weights)])
            if outs is not None:
                return outs[0]
        if self.serves_from_end_table(input, offsets, per_sample_weights):
            return self.serve_from_end_table(input)
        return self.finish_lookup(self.start_lookup(input, offsets, per_sample_weights))

    def serves_from_end_table(self, input: torch.Tensor, offsets: Optional[torch.Tensor],
                              per_sample_weights: Optional[torch.Tensor] = None) -> bool:
        """Whether this lookup is served on the CPU straight from the cached end table: one-hot bags,
        no gradient, no weights, no padding (:class:`fpd_convert.layers.grouped.GroupedLookups` asks too)."""
        if (input.device.type != "cpu" or per_sample_weights is not None or self.padding_idx is not None
                or _device_dedup(input) or self._needs_gradients()):
            return False
        return (input.numel() > 0 and rows_from_end_table(self._core_list(), self.kernel, self._row_cache)
                and self._one_hot(input, offsets) is True)

    def serve_from_end_table(self, input: torch.Tensor) -> torch.Tensor:
        """The rows of one-hot bags, for a call that :meth:`serves_from_end_table` accepts (``forward``
        and :class:`~fpd_convert.layers.grouped.GroupedLookups` ask it first): the general path's
        steps without its dispatch.

        Ids with an exact row get a TT row too, overwritten by their exact row, rather than the
        general path's split of the batch and reordering of its rows: exact hits are few among a
        batch's distinct ids (the hot ids repeat).  About 10 us less a call without a row map, ~40 us
        less with one (2,048 ids)."""
        cores = self._core_list()
        self.raise_deferred_errors()
        uniq, inverse = self._cpu_unique(input, any_order=True)  # the end table takes ids in any order
        codes = self._codes(uniq)
        if codes is None:
            return self._row_cache.rows(cores, uniq).index_select(0, inverse)
        c = codes.numpy()
        hits = np.flatnonzero(c < 0)
        if not hits.size:
            return self._row_cache.rows(cores, codes).index_select(0, inverse)
        rows = self._row_cache.rows(cores, torch.from_numpy(np.maximum(c, 0)))
        exact = self.exact_rows.index_select(0, torch.from_numpy(-1 - c[hits]))
        rows.index_copy_(0, torch.from_numpy(hits), exact.to(rows.dtype))
        return rows.index_select(0, inverse)

    def start_lookup(self, input: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                     per_sample_weights: Optional[torch.Tensor] = None) -> "StartedLookup":
        """The first half of :meth:`forward`: on a GPU, launches the batch's dedup without waiting
        for it.  :meth:`finish_lookup` reads its count and range (one host sync, or none when
        ``values`` are given: :class:`fpd_convert.layers.grouped.GroupedLookups` reads those of
        several tables at once), checks the ids and computes the rows; errors are raised there.

        Served without gradients from a cached suffix table (:func:`pools_in_one_pass`), the
        lookup needs no dedup: only the ids' range and the offsets' validity are launched here,
        and :meth:`finish_lookup` pools the bags in one kernel.  With ``FPD_TT_SYNC_FREE=on``
        (:func:`sync_free`) nothing is launched for the host to read: serving leaves out bad ids,
        training sorts the batch's entries (:meth:`_sorted_entries`), and the ids' range is
        checked by the next lookup (:meth:`raise_deferred_errors`)."""
        self.raise_deferred_errors()
        if self._pools_in_one_pass(input, offsets, per_sample_weights):
            if sync_free():  # nothing to read: the range is checked by the next lookup
                self._defer_range_check(input.reshape(-1))
                return StartedLookup(input, offsets, per_sample_weights, False, None, unchecked=True)
            return StartedLookup(input, offsets, per_sample_weights, False, None,
                                 pooled=self._pooled_head(input, offsets))
        if self._trains_sync_free(input, offsets, per_sample_weights):
            return StartedLookup(input, offsets, per_sample_weights, False, None,
                                 entries=self._sorted_entries(input, offsets))
        one_hot = self._one_hot(input, offsets)
        probe = one_hot if isinstance(one_hot, torch.Tensor) else None  # a GPU probe: read with the dedup
        dedup = None
        if _device_dedup(input) and input.numel():
            self._check_type(input)
            dedup = _dedup_launch(input.reshape(-1), self.num_embeddings, probe)
        return StartedLookup(input, offsets, per_sample_weights, one_hot, dedup)

    def finish_lookup(self, started: "StartedLookup", values: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Pooled rows of a lookup begun by :meth:`start_lookup`; ``values``: its ``dedup.head``
        already read on the host (read here otherwise)."""
        input, offsets, per_sample_weights, one_hot, dedup, pooled, entries, unchecked = started
        if unchecked:
            return self._pool_in_one_pass(input, offsets, per_sample_weights, clamp=True)
        if entries is not None:
            return entry_bags(self._core_list(), entries.codes, entries.pos, entries.bags, bag_of=entries.bag_of,
                              bag_len=entries.bag_len, weights=per_sample_weights, skip=entries.skip,
                              exact_rows=self._exact_rows_in_use(), suffix_major=entries.suffix_major)
        if pooled is not None:
            lo, hi, valid = pooled.tolist() if values is None else values
            self._check_range(lo, hi)
            if valid:
                return self._pool_in_one_pass(input, offsets, per_sample_weights)
            # offsets nn.EmbeddingBag refuses: its own path raises its own error
        if dedup is None:
            probe = one_hot if isinstance(one_hot, torch.Tensor) else None
            uniq, inverse, value = self._checked_unique(input, probe)
        else:
            uniq, inverse, lo, hi, value = _dedup_finish(dedup, dedup.head.tolist() if values is None else values)
            self._check_range(lo, hi)
        one_hot = value if isinstance(one_hot, torch.Tensor) else one_hot
        rows, inverse, pad = self._rows_of_unique(uniq, inverse, input.shape)
        if per_sample_weights is None and pad is None and one_hot:
            return rows.index_select(0, inverse.reshape(-1))  # every mode gives the row itself
        if per_sample_weights is not None and per_sample_weights.dtype != rows.dtype:
            per_sample_weights = per_sample_weights.to(rows.dtype)  # rows may be bf16 under autocast
        offsets = offsets.long() if offsets is not None else None
        last_offset = self.include_last_offset
        if last_offset and self._has_trailing_entries(input, offsets):
            rows, inverse, pad = self._trailing_as_padding(rows, inverse, offsets, pad)
            offsets, last_offset = offsets[:-1], False
        if self._pools_by_row(rows, per_sample_weights) and (inverse.dim() == 2 or offsets is not None) \
                and (not last_offset or (offsets.numel() and int(offsets[-1]) == input.numel())):
            return pool_rows(rows, inverse, offsets[:-1] if last_offset else offsets, self.mode,
                             per_sample_weights, pad)
        return F.embedding_bag(inverse, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                               include_last_offset=last_offset, padding_idx=pad)

    def _pools_by_row(self, rows: torch.Tensor, per_sample_weights: Optional[torch.Tensor]) -> bool:
        """Whether the bags are pooled by :func:`fpd_convert.kernels.cpu_pool.pool_rows`, whose backward
        sums each row's entries in one pass: rows on the CPU that need a gradient, mode sum or mean,
        weights (if any) that do not."""
        return (rows.requires_grad and rows.device.type == "cpu" and self.mode != "max"
                and (per_sample_weights is None or not per_sample_weights.requires_grad))

    @staticmethod
    def _has_trailing_entries(input: torch.Tensor, offsets: Optional[torch.Tensor]) -> bool:
        """Whether entries may follow the last offset (``include_last_offset``).  PyTorch 2.13's
        ``embedding_bag`` mishandles them (its CPU backward reads uninitialized memory for them,
        its CPU mean counts them, CUDA folds them into the last bag: pytorch/pytorch#191965,
        #178614); they belong to no bag.  On the CPU only when it is so; on a GPU, where asking
        would cost a host sync, always."""
        if input.dim() != 1 or offsets is None or offsets.numel() < 2:
            return False
        if input.device.type == "cpu":
            return int(offsets[-1]) < input.numel()
        return True

    @staticmethod
    def _trailing_as_padding(rows: torch.Tensor, inverse: torch.Tensor, offsets: torch.Tensor, pad: Optional[int]):
        """``(rows, inverse, pad)`` with the entries after the last offset turned into padding entries
        (excluded from every mode's pooling and from the backward) of bags that end with the input."""
        if pad is None:  # a zero row to point them at
            rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
            pad = rows.shape[0] - 1
        at = torch.arange(inverse.numel(), device=inverse.device)
        return rows, torch.where(at < offsets[-1], inverse, torch.full_like(inverse, pad)), pad

    def _pools_in_one_pass(self, input: torch.Tensor, offsets: Optional[torch.Tensor],
                           per_sample_weights: Optional[torch.Tensor]) -> bool:
        """Whether this call is served by the one-pass pooled kernel: no gradient needed, the
        Triton path with its suffix table cached, and arguments the kernel takes (anything else,
        errors included, goes the general way)."""
        cores = self._core_list()
        return (not self._needs_gradients()
                and self._takes_bag_arguments(input, offsets, per_sample_weights, cores[0].device)
                and pools_in_one_pass(cores, self.kernel, self._suffix_cache))

    def _trains_sync_free(self, input: torch.Tensor, offsets: Optional[torch.Tensor],
                          per_sample_weights: Optional[torch.Tensor]) -> bool:
        """Whether this call trains from sorted entries with no host sync (``FPD_TT_SYNC_FREE=on``,
        :func:`trains_sync_free`): gradients needed, ``mode="sum"``, and arguments the kernels take."""
        if not sync_free() or self.mode != "sum" or not self._needs_gradients():
            return False
        cores = self._core_list()
        if not self._takes_bag_arguments(input, offsets, per_sample_weights, cores[0].device):
            return False
        if per_sample_weights is not None and per_sample_weights.requires_grad:
            return False  # the weights' own gradient: the general path computes it
        return trains_sync_free(cores, self.kernel)

    def _needs_gradients(self) -> bool:
        """Whether a lookup now is differentiated: grad mode on and a core or exact row trained."""
        trained = self._core_list() + ([self.exact_rows] if self.exact_rows is not None else [])
        return torch.is_grad_enabled() and any(p.requires_grad for p in trained)

    def _entry_codes(self, ids: torch.Tensor, left_out: Optional[torch.Tensor] = None):
        """``(codes, skip)`` of in-range ids for the Triton bag kernels: each id's TT position or
        ``-1 - k`` for exact row k (through the row map and exact rows), and ``skip`` (None when
        nothing is skipped) in place of the padding entries and of the ``left_out`` ones (ids that
        were out of range, looked up without a host sync)."""
        codes = self._codes(ids)
        codes = ids if codes is None else codes
        if self.padding_idx is not None:
            pad = ids == self.padding_idx
            left_out = pad if left_out is None else left_out | pad
        if left_out is None:
            return codes, None
        skip = torch.iinfo(codes.dtype).min
        return codes.masked_fill(left_out, skip), skip

    def _exact_rows_in_use(self) -> Optional[torch.Tensor]:
        return self.exact_rows if self.exact_ids is not None and self.exact_ids.numel() else None

    def _takes_bag_arguments(self, input, offsets, per_sample_weights, device) -> bool:
        """Arguments the Triton bag kernels take (others, errors included, go the general way)."""
        if input.numel() == 0 or input.dtype not in (torch.int32, torch.int64) or input.device != device:
            return False
        if input.dim() == 2:
            if offsets is not None:
                return False
        elif input.dim() != 1 or offsets is None or offsets.dim() != 1 or offsets.device != input.device \
                or offsets.dtype not in (torch.int32, torch.int64) \
                or offsets.numel() < 1 + int(self.include_last_offset):
            return False
        return per_sample_weights is None or (self.mode == "sum" and per_sample_weights.shape == input.shape
                                              and per_sample_weights.is_floating_point()
                                              and per_sample_weights.device == input.device)

    def _sorted_entries(self, input: torch.Tensor, offsets: Optional[torch.Tensor]) -> _Entries:
        """The batch's entries sorted by id, all on the device (no sync).  Entries whose id is out
        of range are left out (as padding: no row read, no gradient), and their error is raised
        by the next lookup (:meth:`raise_deferred_errors`), as CUDA's own embedding kernels report
        theirs late."""
        flat = input.reshape(-1)
        n = self.num_embeddings
        self._defer_range_check(flat)
        # int64 ids may be sorted as int32: out-of-range ones first pinned to -1 or n, not wrapped
        raw = flat.clamp(-1, n) if flat.dtype == torch.int64 else flat
        cores = self._core_list()
        by_suffix = order_by_suffix(cores, flat.numel())
        if by_suffix:  # codes first, then sorted suffix-major (the kernels sum dS per digit pair)
            ids = raw.long().clamp(0, n - 1)
            codes, skip = self._entry_codes(ids, left_out=ids != raw)
            codes = suffix_major_codes(codes, cores)
            keys, pos = torch.sort(_sort_keys(codes.clamp(min=-(1 << 31)), math.prod(self.tt_shape.row_factors)))
            codes = codes.index_select(0, pos)
        else:
            keys, pos = torch.sort(_sort_keys(raw, n))
            ids = keys.long().clamp(0, n - 1)
            codes, skip = self._entry_codes(ids, left_out=ids != keys)
        if input.dim() == 2:
            return _Entries(codes, pos, input.shape[0], None, input.shape[1], skip, by_suffix)
        bags = offsets.numel() - int(self.include_last_offset)
        starts = offsets[:bags].long()
        at = torch.arange(flat.numel(), device=flat.device)
        bag_of = torch.searchsorted(starts, at, right=True) - 1
        if self.include_last_offset:  # entries from the last offset on belong to no bag
            bag_of = torch.where(at < offsets[-1], bag_of, torch.full_like(bag_of, -1))
        return _Entries(codes, pos, bags, bag_of, None, skip, by_suffix)

    def _defer_range_check(self, flat: torch.Tensor) -> None:
        """Copies the ids' range to the host without waiting (read by :meth:`raise_deferred_errors`);
        under :func:`~fpd_convert.layers.tt_lookup.stashing_range_checks` (a CUDA graph capture)
        only computes it and hands it to the stash."""
        head = torch.stack(torch.aminmax(flat)).long()
        stash = range_check_stash()
        if stash is not None:  # (layer, head, whether a CUDA graph is being captured now)
            stash.append((self, head, head.is_cuda and torch.cuda.is_current_stream_capturing()))
            return
        self.defer_range_head(head)

    def defer_range_head(self, head: torch.Tensor) -> None:
        """Starts the copy of ``head`` (``[min id, max id]`` on the device) to the host; the next
        lookup waits for it and raises if it is out of range."""
        if head.is_cuda:
            host = torch.empty(2, dtype=torch.int64, pin_memory=True)
            host.copy_(head, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(head.device))
            self._deferred = (host, event)
        else:
            self._deferred = (head, None)

    def __getstate__(self):
        """A copy (``copy.deepcopy``, pickling) leaves a pending range check with the original:
        it may hold a CUDA event, which cannot be copied."""
        state = self.__dict__.copy()
        state["_deferred"] = None
        state.pop("_cuda_graphs", None)  # captured graphs (layers.graphed) belong to this instance
        return state

    def raise_deferred_errors(self) -> None:
        """Raises the index error of an earlier lookup trained without a host sync
        (``FPD_TT_SYNC_FREE=on``), if it had ids out of range; every lookup calls it first."""
        deferred = getattr(self, "_deferred", None)
        if deferred is None:
            return
        self._deferred = None
        host, event = deferred
        if event is not None:
            event.synchronize()  # recorded a lookup ago: long done
        lo, hi = host.tolist()
        try:
            self._check_range(lo, hi)
        except TTIndexError as e:
            raise TTIndexError(f"{e} (in an earlier batch, looked up without a host sync)") from None

    @staticmethod
    def _pooled_head(input: torch.Tensor, offsets: Optional[torch.Tensor]) -> torch.Tensor:
        """int64 ``[min id, max id, offsets valid]``, computed where the ids are (no sync)."""
        lo, hi = torch.aminmax(input)
        if offsets is None:
            valid = torch.ones((), dtype=torch.bool, device=input.device)
        else:  # what nn.EmbeddingBag asks of offsets: from 0, non-decreasing, within the input
            valid = (offsets[0] == 0) & (offsets[-1] <= input.numel()) & (offsets[1:] >= offsets[:-1]).all()
        return torch.stack([lo.long(), hi.long(), valid.long()])

    def _pool_in_one_pass(self, input: torch.Tensor, offsets: Optional[torch.Tensor],
                          per_sample_weights: Optional[torch.Tensor], clamp: bool = False) -> torch.Tensor:
        """Bags of checked ids (``clamp``: entries of ids out of range left out, their check
        deferred) pooled by :func:`fpd_convert.kernels.triton_pooled.pooled_bags`."""
        cores = self._core_list()
        flat = input.reshape(-1)
        if clamp:  # entries of ids out of range left out (their error deferred)
            ids = flat.clamp(0, self.num_embeddings - 1)
            codes, skip = self._entry_codes(ids, left_out=ids != flat)
        else:
            codes, skip = self._entry_codes(flat)
        with torch.no_grad():
            return pooled_bags(cores, self._suffix_cache.table(cores), codes, self.mode,
                               bounds=offsets if input.dim() == 1 else None,
                               bag_len=input.shape[1] if input.dim() == 2 else None,
                               weights=per_sample_weights, skip=skip, exact_rows=self._exact_rows_in_use(),
                               include_last_offset=self.include_last_offset)

    def _one_hot(self, input: torch.Tensor, offsets: Optional[torch.Tensor]):
        """Whether every bag holds exactly one index (DLRM's Criteo tables): then pooling is a gather.

        On a GPU, offsets are compared there and the answer is a 0-dim tensor (a probe) that the
        caller reads in the dedup's one host sync, so it costs no sync of its own; the
        gather and its backward (``index_add``) then replace ``embedding_bag``, whose dense
        backward sorts the batch again (0.21 ms for 65k ids on an H100)."""
        if input.dim() == 2:  # with offsets, embedding_bag raises PyTorch's own error
            return input.shape[1] == 1 and offsets is None
        if offsets is None or input.dim() != 1 or offsets.device != input.device:
            return False
        n = input.numel()
        if offsets.numel() != n + int(self.include_last_offset) or n == 0:
            return False
        if (self._arange.numel() < offsets.numel() or self._arange.device != offsets.device
                or self._arange.dtype != offsets.dtype):
            self._arange = torch.arange(offsets.numel(), device=offsets.device, dtype=offsets.dtype)
        if offsets.device.type == "cpu":  # numpy's compare: 2.3 against torch.equal's 3.8 us for 8,192
            return bool((offsets.numpy() == self._arange[:offsets.numel()].numpy()).all())
        return torch.eq(offsets, self._arange[:offsets.numel()]).all()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mode: str = "mean", padding_idx: Optional[int] = None,
                   include_last_offset: bool = False, freeze: bool = False, **tt_kwargs) -> "TTEmbeddingBag":
        """TT-SVD of a trained table; ``tt_kwargs`` go to :func:`decompose_table`
        (one of ``rank``, ``ratio``, ``budget_bytes``, ``tol``; ``order``, factors, ``svd``).
        The relative error is kept in ``reconstruction_error``."""
        module = cls._decompose(weight, dict(mode=mode, padding_idx=padding_idx,
                                             include_last_offset=include_last_offset), tt_kwargs)
        module.requires_grad_(not freeze)
        return module

    @classmethod
    def from_pretrained(cls, embeddings: torch.Tensor, freeze: bool = True, mode: str = "mean",
                        include_last_offset: bool = False, padding_idx: Optional[int] = None,
                        **tt_kwargs) -> "TTEmbeddingBag":
        """``nn.EmbeddingBag.from_pretrained``'s signature (frozen by default); see :meth:`from_dense`."""
        return cls.from_dense(embeddings, mode=mode, padding_idx=padding_idx,
                              include_last_offset=include_last_offset, freeze=freeze, **tt_kwargs)

    @classmethod
    def from_embedding(cls, module: nn.EmbeddingBag, **tt_kwargs) -> "TTEmbeddingBag":
        """TT replacement of an ``nn.EmbeddingBag``, keeping its mode and options."""
        _refuse_unsupported(module)
        return cls.from_dense(module.weight, mode=module.mode, padding_idx=module.padding_idx,
                              include_last_offset=module.include_last_offset, **tt_kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode!r}" + (
            ", include_last_offset=True" if self.include_last_offset else "")


class TTEmbedding(_TTTable):
    """TT-factorized ``nn.Embedding``: ``input`` of any shape (*) -> output (*, d).

    Example::

        >>> emb = TTEmbedding(10_000, 32, rank=8)
        >>> emb(torch.tensor([[1, 2], [3, 9_999]])).shape
        torch.Size([2, 2, 32])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows, inverse, pad, _ = self._unique_rows(input)
        if pad is None:  # a gather: its backward (index_add) is ~3x faster than embedding's on the CPU
            return rows.index_select(0, inverse.reshape(-1)).reshape(*inverse.shape, rows.shape[1])
        return F.embedding(inverse, rows, padding_idx=pad)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, padding_idx: Optional[int] = None, freeze: bool = False,
                   **tt_kwargs) -> "TTEmbedding":
        """TT-SVD of a trained table; see :meth:`TTEmbeddingBag.from_dense`."""
        module = cls._decompose(weight, dict(padding_idx=padding_idx), tt_kwargs)
        module.requires_grad_(not freeze)
        return module

    @classmethod
    def from_pretrained(cls, embeddings: torch.Tensor, freeze: bool = True, padding_idx: Optional[int] = None,
                        **tt_kwargs) -> "TTEmbedding":
        return cls.from_dense(embeddings, padding_idx=padding_idx, freeze=freeze, **tt_kwargs)

    @classmethod
    def from_embedding(cls, module: nn.Embedding, **tt_kwargs) -> "TTEmbedding":
        _refuse_unsupported(module)
        return cls.from_dense(module.weight, padding_idx=module.padding_idx, **tt_kwargs)
