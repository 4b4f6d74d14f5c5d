"""Drop-in TT replacements for ``nn.EmbeddingBag`` and ``nn.Embedding``.

A forward pass deduplicates the batch's ids (:mod:`fpd_convert.layers.dedup`), builds only those
rows (:mod:`fpd_convert.layers.tt_lookup` picks the kernel) and pools them with
``torch.nn.functional.embedding_bag`` / ``embedding`` (or, on the CPU while training, with
:func:`fpd_convert.kernels.cpu_pool.pool_rows`), so modes, offsets, padding and their errors behave
exactly as in PyTorch.  Two ways skip the general path where it would only cost: serving one-hot
bags on the CPU straight from the cached end table (:meth:`TTEmbeddingBag.serve_from_end_table`),
and serving bags on a GPU in one pooled Triton pass (:mod:`fpd_convert.kernels.triton_pooled`).
Under ``torch.compile`` / ``torch.export`` the layers trace through registered operators instead
(:mod:`fpd_convert.layers.traced`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cpu_pool import pool_rows
from ..kernels.triton_pooled import pooled_bags
from . import dedup
from .tt_lookup import pools_in_one_pass, rows_from_end_table
from .tt_table import TTIndexError, _refuse_unsupported, _TTTable

__all__ = ["TTEmbeddingBag", "TTEmbedding", "TTIndexError", "StartedLookup"]


class StartedLookup(NamedTuple):
    """A bag lookup begun by :meth:`TTEmbeddingBag.start_lookup`."""
    input: torch.Tensor
    offsets: Optional[torch.Tensor]
    per_sample_weights: Optional[torch.Tensor]
    one_hot: Union[bool, torch.Tensor]  # a 0-dim GPU probe, read with the dedup
    launched: Optional[dedup.Dedup]  # a dedup launched on a GPU; None: all done in finish_lookup
    #: bags pooled in one pass (no dedup): int64 ``[min id, max id, offsets valid]`` to read
    pooled: Optional[torch.Tensor] = None

    @property
    def head(self) -> Optional[torch.Tensor]:
        """What :meth:`TTEmbeddingBag.finish_lookup` must read on the host (None: nothing launched)."""
        return self.launched.head if self.launched is not None else self.pooled


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

    def forward(self, input: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # torch.compile / torch.export: registered operators
            from .traced import traced_bag
            return traced_bag(self, input, offsets, per_sample_weights)
        if self.serves_from_end_table(input, offsets, per_sample_weights):
            return self.serve_from_end_table(input)
        return self.finish_lookup(self.start_lookup(input, offsets, per_sample_weights))

    def serves_from_end_table(self, input: torch.Tensor, offsets: Optional[torch.Tensor],
                              per_sample_weights: Optional[torch.Tensor] = None) -> bool:
        """Whether this lookup is served on the CPU straight from the cached end table: one-hot bags,
        no gradient, no weights, no padding (:class:`fpd_convert.layers.grouped.GroupedLookups` asks too)."""
        if (input.device.type != "cpu" or per_sample_weights is not None or self.padding_idx is not None
                or dedup.device_dedup(input) or self._needs_gradients()):
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
        and :meth:`finish_lookup` pools the bags in one kernel."""
        if self._pools_in_one_pass(input, offsets, per_sample_weights):
            return StartedLookup(input, offsets, per_sample_weights, False, None,
                                 pooled=self._pooled_head(input, offsets))
        one_hot = self._one_hot(input, offsets)
        probe = one_hot if isinstance(one_hot, torch.Tensor) else None  # a GPU probe: read with the dedup
        launched = None
        if dedup.device_dedup(input) and input.numel():
            self._check_type(input)
            launched = dedup.dedup_launch(input.reshape(-1), self.num_embeddings, probe)
        return StartedLookup(input, offsets, per_sample_weights, one_hot, launched)

    def finish_lookup(self, started: "StartedLookup", values: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Pooled rows of a lookup begun by :meth:`start_lookup`; ``values``: its ``dedup.head``
        already read on the host (read here otherwise)."""
        input, offsets, per_sample_weights, one_hot, launched, pooled = started
        if pooled is not None:
            lo, hi, valid = pooled.tolist() if values is None else values
            self._check_range(lo, hi)
            if valid:
                return self._pool_in_one_pass(input, offsets, per_sample_weights)
            # offsets nn.EmbeddingBag refuses: its own path raises its own error
        if launched is None:
            probe = one_hot if isinstance(one_hot, torch.Tensor) else None
            uniq, inverse, value = self._checked_unique(input, probe)
        else:
            uniq, inverse, lo, hi, value = dedup.dedup_finish(launched, launched.head.tolist() if values is None
                                                              else values)
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

    def _needs_gradients(self) -> bool:
        """Whether a lookup now is differentiated: grad mode on and a core or exact row trained."""
        trained = self._core_list() + ([self.exact_rows] if self.exact_rows is not None else [])
        return torch.is_grad_enabled() and any(p.requires_grad for p in trained)

    def _entry_codes(self, ids: torch.Tensor):
        """``(codes, skip)`` of checked ids for the Triton bag kernel: each id's TT position or ``-1 - k``
        for exact row k (through the row map and exact rows), and ``skip`` (None when nothing is
        skipped) in place of the padding entries."""
        codes = self._codes(ids)
        codes = ids if codes is None else codes
        if self.padding_idx is None:
            return codes, None
        skip = torch.iinfo(codes.dtype).min
        return codes.masked_fill(ids == self.padding_idx, skip), skip

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
                          per_sample_weights: Optional[torch.Tensor]) -> torch.Tensor:
        """Bags of checked ids pooled by :func:`fpd_convert.kernels.triton_pooled.pooled_bags`."""
        cores = self._core_list()
        codes, skip = self._entry_codes(input.reshape(-1))
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
        if torch.compiler.is_compiling():  # torch.compile / torch.export: registered operators
            from .traced import traced_embedding
            return traced_embedding(self, input)
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
