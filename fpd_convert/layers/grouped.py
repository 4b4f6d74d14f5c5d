"""Lookups of several tables begun together: one host sync a step for all TT bags on a GPU.

A TT bag lookup on a GPU must learn, on the host, how many distinct ids its batch has (to
size the rows it computes) and whether they are in range; each table alone pays one sync
for that (:func:`fpd_convert.layers.dedup.unique_device`), and a sync waits for everything
queued before it.  In a model with several TT tables that stalls the GPU once per table.
:class:`GroupedLookups` launches the dedups of all TT bags first, copies their counts and
ranges to pinned host memory in one asynchronous copy and records an event; the caller then
queues other work (the bottom MLP), and :meth:`GroupedLookups.results` waits for that event
only, not for the work queued after it.  Index errors are raised there, before any row of that
table is computed, as a single table's lookup would raise them.  A bag served in one pass (no
gradients, :mod:`fpd_convert.kernels.triton_pooled`) has no dedup: its range and offsets check
is read in the same copy.  (Measured on an H100: a DLRM step with five TT tables at 0.87x the
dense model grouped, 0.77x one by one; docs/benchmarks.md.)

Other modules (``nn.EmbeddingBag``, QR/MD bags) are called first in
:meth:`~GroupedLookups.results`, before the wait, so that the GPU works on them meanwhile; a TT
bag on the CPU does its whole lookup in :meth:`~GroupedLookups.results`, one served from its end
table (:meth:`TTEmbeddingBag.serves_from_end_table`, asked once) by
:meth:`TTEmbeddingBag.serve_from_end_table`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .tt_embedding import TTEmbeddingBag

#: (module, input, offsets, per_sample_weights)
Call = Tuple[nn.Module, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


class GroupedLookups:
    """``GroupedLookups(calls).results()`` equals ``[m(i, o, per_sample_weights=w) for m, i, o, w in calls]``."""

    def __init__(self, calls: Sequence[Call]):
        self._calls = list(calls)
        self._started: List[object] = []
        self._served = set()  # call indices of TT bags served from their CPU end table
        heads = []
        for k, (module, input, offsets, weights) in enumerate(self._calls):
            started = None
            if isinstance(module, TTEmbeddingBag):
                if module.serves_from_end_table(input, offsets, weights):
                    self._served.add(k)  # asked once: results() serves it without asking again
                else:
                    started = module.start_lookup(input, offsets, weights)
                    if started.head is not None:
                        heads.append(started.head)
            self._started.append(started)
        self._event = None
        self._host: Optional[torch.Tensor] = None
        if heads and len({h.device for h in heads}) == 1:  # tables on several devices: each reads its own
            head = torch.cat(heads)
            if head.is_cuda:
                self._host = torch.empty(head.shape, dtype=head.dtype, pin_memory=True)
                self._host.copy_(head, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(torch.cuda.current_stream(head.device))  # the copy's stream
            else:  # another device: a plain (synchronous) copy
                self._host = head.cpu()

    def results(self) -> List[torch.Tensor]:
        """The pooled embeddings of every call, in order.  The other modules' lookups are queued
        first, so that the GPU has their work while the host waits for the dedups (only for them)."""
        out: List[Optional[torch.Tensor]] = [None] * len(self._calls)
        for k, ((module, input, offsets, weights), started) in enumerate(zip(self._calls, self._started)):
            if k in self._served:
                out[k] = module.serve_from_end_table(input)
            elif started is None:
                out[k] = (module(input, offsets) if weights is None
                          else module(input, offsets, per_sample_weights=weights))
        values: List[int] = []
        if self._host is not None:
            if self._event is not None:
                self._event.synchronize()
            values = self._host.tolist()
        at = 0
        for k, ((module, *_), started) in enumerate(zip(self._calls, self._started)):
            if started is None:
                continue
            if started.head is None or self._host is None:
                out[k] = module.finish_lookup(started)
            else:
                size = started.head.numel()
                out[k] = module.finish_lookup(started, values[at:at + size])
                at += size
        return out
