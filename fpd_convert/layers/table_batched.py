"""Several TT tables of one shape trained as one stacked table: one sort, one launch each way.

On an H100 a TT table's training lookup takes ~2 ms of host time (some forty PyTorch ops and
two Triton launches, each ~20-100 us of Python and driver work) for ~0.5 ms of GPU work, so a
DLRM step with five TT tables waits on the host, not on the GPU (.ci/sync-probe.py: 20.4 ms of
host time a step against 11.9 ms for the dense model).  Launch overhead does not grow with the
batch, so the cure is fewer launches: FBGEMM's table-batched embeddings do the same for plain
tables.

Tables whose cores have the same shapes (DLRM's largest tables, capped at one row count, all
get the same factorization) are stacked: ``torch.stack`` of each core gives ``(T, *shape)``
(the stack's backward hands every table its own gradient), entry ``j`` of table ``t`` gets the
code ``t NT + id`` (``NT``: a table's TT positions), and the bags of all tables are numbered
together.  The sorted-entry kernels (:mod:`fpd_convert.kernels.triton_entries`) read table
``t``'s suffix table at ``t`` tables' offset; its first core is row ``t n1 + i1`` of the stacked
first cores.  One range check covers all (the tables share their row count), read by the first
table's next lookup as in the one-table sync-free path; meanwhile the entries of ids out of range
are left out (code -1, skipped by the kernels).

Only under ``FPD_TT_SYNC_FREE=on`` (training, sum bags, no row map, exact rows or
``padding_idx``), for a group of at least two such calls; ``FPD_TT_TABLE_BATCHED=off`` looks
them up one by one.  Values and gradients equal the one-by-one lookups.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..kernels.triton_entries import entry_bags, order_by_suffix, suffix_major_codes
from .tt_embedding import TTEmbeddingBag, _sort_keys
from .tt_lookup import table_batched

#: (module, input, offsets, per_sample_weights)
Call = Tuple[TTEmbeddingBag, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def batch_key(module, input: torch.Tensor, offsets: Optional[torch.Tensor],
              weights: Optional[torch.Tensor]) -> Optional[tuple]:
    """What calls must share to be stacked together, or None where this call is not stackable."""
    if not isinstance(module, TTEmbeddingBag) or not table_batched():
        return None
    if module.padding_idx is not None or (module._index_ids is not None and module._index_ids.numel()):
        return None
    if not module._trains_sync_free(input, offsets, weights):
        return None
    cores = module._core_list()
    return (tuple(tuple(c.shape) for c in cores), tuple(c.dtype for c in cores), cores[0].device,
            module.num_embeddings, module.include_last_offset, weights is not None, input.dtype)


def stack_groups(calls: Sequence[tuple], min_size: int = 2) -> List[List[int]]:
    """Indices of the calls to look up stacked, in groups of ``min_size`` or more that share a key
    (1: a table alone is a stack of one, as CUDA graphs take it, :mod:`fpd_convert.layers.graphed`)."""
    groups = {}
    for k, (module, input, offsets, weights) in enumerate(calls):
        key = batch_key(module, input, offsets, weights)
        if key is not None:
            groups.setdefault(key, []).append(k)
    return [g for g in groups.values() if len(g) >= min_size]


def _bags_of_entries(inputs, offsets, include_last_offset: bool):
    """``(bag_of, counts)``: each entry's bag among all tables' bags (-1: none) and each table's bag count."""
    device = inputs[0].device
    one_d = all(i.dim() == 1 for i in inputs)
    if one_d and len({i.numel() for i in inputs}) == 1 and len({o.numel() for o in offsets}) == 1:
        t, e, o = len(inputs), inputs[0].numel(), offsets[0].numel()  # one shape: batched ops
        bags = o - int(include_last_offset)
        stacked = torch.stack(offsets).long()
        at = torch.arange(e, device=device).expand(t, e)
        bag = torch.searchsorted(stacked[:, :bags].contiguous(), at.contiguous(), right=True) - 1
        keep = bag >= 0
        if include_last_offset:  # entries from the last offset on belong to no bag
            keep &= at < stacked[:, -1:]
        bag = torch.where(keep, bag + torch.arange(t, device=device)[:, None] * bags, -1)
        return bag.reshape(-1), [bags] * t
    parts, counts, base = [], [], 0
    for input, offs in zip(inputs, offsets):
        at = torch.arange(input.numel(), device=device)
        if input.dim() == 2:  # (B, L): fixed-length bags
            bags, bag = input.shape[0], at // input.shape[1]
        else:
            bags = offs.numel() - int(include_last_offset)
            bag = torch.searchsorted(offs[:bags].long().contiguous(), at, right=True) - 1
            keep = bag >= 0
            if include_last_offset:
                keep &= at < offs[-1]
            bag = torch.where(keep, bag, -1)
        parts.append(torch.where(bag >= 0, bag + base, -1) if base else bag)
        counts.append(bags)
        base += bags
    return torch.cat(parts), counts


def stacked_lookups(calls: Sequence[Call]) -> List[torch.Tensor]:
    """The pooled bags of each call (as ``module(input, offsets, per_sample_weights=w)`` gives
    them), looked up as one stacked table; the calls share a :func:`batch_key`."""
    modules = [c[0] for c in calls]
    for m in modules:
        m.raise_deferred_errors()
    first, t = modules[0], len(calls)
    n = first.num_embeddings
    cores = [torch.stack(parts) for parts in zip(*(m._core_list() for m in modules))]
    nt = cores[0].shape[2] * cores[1].shape[2] * cores[2].shape[2]  # TT positions of a table
    flats = [c[1].reshape(-1) for c in calls]
    same = len({f.numel() for f in flats}) == 1
    raw = torch.stack(flats) if same else torch.cat(flats)
    first._defer_range_check(raw.reshape(-1))  # one check for all: they share the row count
    ids = raw.long().clamp(0, n - 1)
    if same:
        codes = (ids + torch.arange(t, device=raw.device)[:, None] * nt).reshape(-1)
    else:  # each table's part offset by its own base (no host-made tensor: a CUDA graph can capture it)
        parts = torch.split(ids, [f.numel() for f in flats])
        codes = torch.cat([part + k * nt for k, part in enumerate(parts)])
    by_suffix = order_by_suffix(first._core_list(), codes.numel(), t)
    if by_suffix:  # sorted suffix-major: the backward sums dS per digit pair (triton_entries)
        codes = suffix_major_codes(codes, first._core_list())
    codes = codes.masked_fill((ids != raw).reshape(-1), -1)  # ids out of range: left out (-1 codes, skipped)
    keys, pos = torch.sort(_sort_keys(codes, t * nt))
    bag_of, counts = _bags_of_entries([c[1] for c in calls], [c[2] for c in calls], first.include_last_offset)
    weights = None if calls[0][3] is None else torch.cat([c[3].reshape(-1) for c in calls])
    out = entry_bags(cores, keys.long(), pos, sum(counts), bag_of=bag_of, weights=weights, skip=-1,
                     suffix_major=by_suffix)
    return list(torch.split(out, counts))


__all__ = ["batch_key", "stack_groups", "stacked_lookups"]
