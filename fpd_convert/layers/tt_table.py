"""What both TT layers share: the cores, the fidelity features, index checks, row lookups.

The table ``W`` (``num_embeddings x embedding_dim``) is held as TT cores ``G_j`` of shape
``(r_{j-1}, n_j, d_j, r_j)``; row ``i`` with digits ``(i_1..i_k)`` is ``G_1[i_1] G_2[i_2] ... G_k[i_k]``.
A table may also move its hottest rows to the leading TT rows (a row map) and keep some rows
exactly (exact rows, a trainable parameter): :mod:`fpd_convert.layers.row_index` answers where each
row lives.  The layers' public contract (``nn.EmbeddingBag`` / ``nn.Embedding``) is in
:mod:`fpd_convert.layers.tt_embedding`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..kernels.cpu_tt import EndTable
from ..kernels.triton_suffix import SuffixCache
from ..tt import TTDecomposition, TTShape, clamp_ranks, decompose_table, factor_dims, factor_rows
from . import dedup, serving_form
from .row_index import BitRank, build_row_index, index_buckets, row_codes
from .tt_lookup import default_kernel, lookup_rows, rows_from_end_table


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
        self.row_map: Optional[torch.Tensor] = None  # buffers once set (see _set_buffer)
        self.exact_ids: Optional[torch.Tensor] = None
        self.exact_rows: Optional[nn.Parameter] = None
        self._map_from: Optional[torch.Tensor] = None
        self._map_to: Optional[torch.Tensor] = None
        # both merged: the ids not at their own TT position and their codes (layers.row_index)
        self._index_ids: Optional[torch.Tensor] = None
        self._index_codes: Optional[torch.Tensor] = None
        self._bit_rank = (None, None)  # (the _index_ids it was built from, BitRank) on the CPU
        self.register_load_state_dict_post_hook(serving_form.after_load)

    # -- the serving form (derived, for traced CPU inference): built in eval mode ------------
    def train(self, mode: bool = True):
        super().train(mode)
        serving_form.refresh(self)
        return self

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        serving_form.refresh(self)
        return out

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
        self._set_buffer("row_map", hot.to(device))
        self._set_buffer("_map_from", torch.from_numpy(rows[order]).to(device), persistent=False)
        self._set_buffer("_map_to", torch.from_numpy(pos[order]).to(device), persistent=False)
        self._set_index()

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
        self._set_buffer("exact_ids", ids.to(device))
        self.exact_rows = nn.Parameter(rows.detach().to(device, self.cores[0].dtype).clone(),
                                       requires_grad=self.cores[0].requires_grad)
        self._set_index()

    def _set_index(self) -> None:
        index_ids, index_codes = build_row_index(self._map_from, self._map_to, self.exact_ids)
        self._set_buffer("_index_ids", index_ids.to(self.cores[0].device), persistent=False)
        self._set_buffer("_index_codes", index_codes.to(self.cores[0].device), persistent=False)
        starts, shift, depth = index_buckets(index_ids, self.num_embeddings)
        self._set_buffer("_index_starts", starts.to(self.cores[0].device), persistent=False)
        self._index_shift, self._index_depth = shift, depth

    @property
    def _index_buckets(self):
        """The row index's buckets for traced lookups (:func:`fpd_convert.layers.row_index.index_buckets`)."""
        return self._index_starts, self._index_shift, self._index_depth

    def _set_buffer(self, name: str, value: torch.Tensor, persistent: bool = True) -> None:
        """Registers ``name`` as a buffer the first time it is set: a layer without a row map or exact rows
        holds plain ``None`` attributes, not ``None`` buffers, which ``torch.export`` 2.13 miscounts (a
        root module with some buffers ``None`` and others set fails to export)."""
        if name in self._buffers:
            self._buffers[name] = value
        else:
            self.__dict__.pop(name, None)
            self.register_buffer(name, value, persistent=persistent)

    def _exact_rows_in_use(self) -> Optional[torch.Tensor]:
        return self.exact_rows if self.exact_ids is not None and self.exact_ids.numel() else None

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
            return _touching([self.exact_rows], self._tt_rows(codes, is_sorted=False)), None
        kept = self.exact_rows.index_select(0, -1 - codes.index_select(0, hits))
        if misses.numel() == 0:
            return _touching(self._core_list(), kept), None
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
        serving_form.refresh(self)

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
        :func:`dedup.unique_device`), where ``probe`` (a 0-dim tensor) is read in the same sync."""
        flat = input.reshape(-1)
        if flat.device.type == "cpu" or flat.numel() == 0:
            any_order = rows_from_end_table(self._core_list(), self.kernel, self._row_cache)
            uniq, inverse = self._cpu_unique(input, any_order)
            return uniq, inverse, None if probe is None else bool(probe)
        self._check_type(input)
        uniq, inverse, lo, hi, value = dedup.unique_device(flat, self.num_embeddings, probe)
        self._check_range(lo, hi)
        return uniq, inverse, value

    def _cpu_unique(self, input: torch.Tensor, any_order: bool):
        """``(uniq, inverse)`` of a CPU batch, its ids checked.  ``any_order``: the distinct ids may come
        in any order (for the end table), found without a sort (:func:`dedup.unique_any_order`, whose
        bounds check is the range check; ``inverse`` int32); else sorted (``inverse`` int64)."""
        self._check_type(input)
        flat = input.reshape(-1)
        if any_order and flat.numel():
            found = dedup.unique_any_order(flat, self.num_embeddings)
            if found is not None:
                return found
        self._check_indices(input)
        return dedup.unique_sorted(flat, self.num_embeddings)

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
            uniq, inverse = dedup.unique_sorted(ids[s:s + step], self.num_embeddings)
            out.append(self._rows_for(uniq).index_select(0, inverse.to(uniq.device)))
        return torch.cat(out) if out else self.cores[0].new_zeros(0, self.embedding_dim)

    @torch.no_grad()
    def to_dense(self, chunk_rows: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full ``(num_embeddings, embedding_dim)`` table (in ``dtype``, default the cores'), built in
        row chunks into one buffer: the table plus one chunk is all it holds."""
        device = self.cores[0].device
        chunk_rows = chunk_rows or min(1 << 16, self.safe_chunk())
        out = None
        for s in range(0, self.num_embeddings, chunk_rows):
            part = self._rows_for(torch.arange(s, min(s + chunk_rows, self.num_embeddings), device=device))
            if out is None:
                out = torch.empty(self.num_embeddings, self.embedding_dim, dtype=dtype or part.dtype, device=device)
            out[s:s + part.shape[0]] = part
        return out

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


def _touching(params: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """``rows``, differentiated also in ``params`` the lookup did not read (exact rows no id has; cores when all
    ids are exact): a zero gradient, not None, as under ``torch.compile``; DistributedDataParallel needs one."""
    if not torch.is_grad_enabled():
        return rows
    unread = [p for p in params if p is not None and p.requires_grad]
    if not unread:
        return rows
    return rows + sum(p.reshape(-1)[:0].sum() for p in unread).to(rows.dtype)
