"""Stacked TT training lookups replayed from CUDA graphs: two graph launches a step, whatever the ops.

The eighth session measured the DLRM step with five TT tables on an H100 as host-bound: the
host took 20-24 ms to queue a step whose GPU work is ~16.7 ms (the dense model: 11.9 ms of host
time for 16.1 ms of GPU work).  Stacking the tables (:mod:`fpd_convert.layers.table_batched`)
cuts the launches; a CUDA graph removes them: the forward of a group's stacked lookup (one sort,
the suffix GEMMs, one Triton launch, ~25 ops) is captured once and then replayed by one host
call, and so is its backward.  The rest of the model (MLPs, interaction, the dense tables with
their sparse gradients, the optimizer) runs as before.

Under ``FPD_TT_CUDA_GRAPHS=on`` with ``FPD_TT_SYNC_FREE=on``, on a CUDA device, while gradients
are recorded; a TT table whose shape no other table of the group shares is a stack of one (a
compressed Criteo-Terabyte model factors each table on its own), graphed the same way, and so is
a layer called on its own (``TTEmbeddingBag.forward``).  A batch layout (tables, shapes and dtypes of ids, offsets and weights, where the
cores are) is captured the second time it is seen (``torch.cuda.make_graphed_callables``:
warm-up on a side stream, one capture each way) and replayed from then on; a layout seen once
(an epoch's short last batch) runs op by op, and so do layouts past :data:`MAX_GRAPHS` per table.
Each replay copies the call's ids and offsets into the graph's own input tensors.

What a graph asks of the training loop (the rules of ``make_graphed_callables``):

- Each forward's backward runs before the group's next forward replays.  A forward whose
  backward is still pending (two forwards, then the backwards) runs op by op instead, which
  is correct and slower.
- The pooled outputs and the cores' gradients live in the graph's memory: the next replay
  overwrites them.  A training step uses them before that; keep a copy to hold on to one.
- A replay's gradients reach the cores only while their ``.grad`` is None (``zero_grad()``'s
  default, ``set_to_none=True``): autograd may then keep the graph's gradient tensor itself as
  ``.grad``, which the next replay rewrites.  A lookup whose tables hold a gradient (accumulation
  over several batches, ``zero_grad(set_to_none=False)``) runs op by op, which accumulates
  correctly.

Index errors keep the sync-free semantics: the entries of ids out of range are left out, and the
error is raised by the table's next lookup (each replay's ``[min, max]`` is copied to the host
after it, without waiting).
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..kernels import triton_entries
from .table_batched import Call, batch_key, stacked_lookups
from .tt_lookup import cuda_graphs, stashing_range_checks

#: graphs one table keeps (one per batch layout); further layouts run op by op
MAX_GRAPHS = 4
_SEEN, _FAILED = "seen once", "capture failed"


class _Stack(nn.Module):
    """The stacked lookup of fixed tables as a module of tensor arguments only (what
    ``make_graphed_callables`` takes): ``ids[, offsets][, weights]`` of each table, in order."""

    def __init__(self, tables: Sequence[nn.Module], layout: Sequence[Tuple[bool, bool]]):
        super().__init__()
        self.tables = nn.ModuleList(tables)
        self.layout = list(layout)

    def forward(self, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        calls, at = [], 0
        for table, (has_offsets, has_weights) in zip(self.tables, self.layout):
            ids = tensors[at]
            offsets = tensors[at + 1] if has_offsets else None
            at += 1 + has_offsets
            weights = tensors[at] if has_weights else None
            at += has_weights
            calls.append((table, ids, offsets, weights))
        return tuple(stacked_lookups(calls))


def _arguments(calls: Sequence[Call]) -> List[torch.Tensor]:
    return [t for call in calls for t in call[1:] if t is not None]


def layout_key(calls: Sequence[Call]) -> tuple:
    """What a replay needs unchanged from the capture: the tables, where their parameters are,
    the shapes and dtypes of every argument, and the entries' order switch (it changes the
    captured ops)."""
    parts = []
    for module, ids, offsets, weights in calls:
        params = tuple((p.data_ptr(), p.requires_grad) for p in module.parameters())
        parts.append((id(module), params, tuple(ids.shape), ids.dtype, ids.device)
                     + tuple(None if t is None else (tuple(t.shape), t.dtype) for t in (offsets, weights)))
    return (triton_entries.ENTRY_ORDER,) + tuple(parts)


def _cores_of(key: tuple) -> tuple:
    """Where the first table's parameters were when ``key`` was made."""
    return key[1][1]


class GraphedStack:
    """The forward and backward of one group's stacked lookup, captured as CUDA graphs."""

    def __init__(self, calls: Sequence[Call]):
        self.tables = [call[0] for call in calls]
        layout = [(call[2] is not None, call[3] is not None) for call in calls]
        # the graph's own inputs: a replay copies each call's tensors into them
        sample = tuple(t.detach().clone(memory_format=torch.contiguous_format) for t in _arguments(calls))
        stash: List[tuple] = []
        with torch.autocast("cuda", enabled=False), stashing_range_checks(stash):
            self._fn = torch.cuda.make_graphed_callables(_Stack(self.tables, layout), sample,
                                                         allow_unused_input=True)
        # each table's [min, max] as the captured forward computes it: rewritten by every replay
        self._heads = [(table, head) for table, head, captured in stash if captured]
        if not self._heads:
            raise RuntimeError("the captured lookup computed no index range (an internal error)")
        self._node: Optional[weakref.ref] = None  # the last replay's backward node, until it has run

    @property
    def pending(self) -> bool:
        """Whether the last replay's backward may still run (its autograd graph is alive and its
        gradients have not been computed): replaying now would overwrite what it needs."""
        return self._node is not None and self._node() is not None

    def _backward_ran(self, grad: torch.Tensor) -> None:
        self._node = None

    def __call__(self, calls: Sequence[Call]) -> List[torch.Tensor]:
        for table in self.tables:
            table.raise_deferred_errors()
        outs = self._fn(*_arguments(calls))
        for table, head in self._heads:
            table.defer_range_head(head)
        grad_outs = [o for o in outs if o.requires_grad]
        if grad_outs:
            self._node = weakref.ref(grad_outs[0].grad_fn)
            grad_outs[0].register_hook(self._backward_ran)
        return list(outs)


def graphed_lookups(calls: Sequence[Call]) -> Optional[List[torch.Tensor]]:
    """The pooled bags of a stackable group (``table_batched.stack_groups``; a layer's own call,
    ``TTEmbeddingBag.forward``, is checked here), replayed from CUDA graphs, or None where this
    call runs op by op (switch off, not CUDA, no gradients, inside another capture, a table
    holding a gradient, a layout seen for the first time or past :data:`MAX_GRAPHS`, or the last
    replay's backward still pending)."""
    ids = calls[0][1]
    if not cuda_graphs() or not ids.is_cuda or not torch.is_grad_enabled():
        return None
    if torch.cuda.is_current_stream_capturing():
        return None
    if len(calls) == 1 and batch_key(*calls[0]) is None:  # a lone layer's call: only a stackable one
        return None
    if any(p.grad is not None for call in calls for p in call[0].parameters()):
        return None  # a gradient kept from before may be the graph's own memory: accumulate op by op
    graphs = calls[0][0].__dict__.setdefault("_cuda_graphs", {})
    key = layout_key(calls)
    entry = graphs.get(key)
    if entry is _FAILED:
        return None
    if entry is None:
        for old in [k for k in graphs if _cores_of(k) != _cores_of(key)]:  # cores moved or replaced: stale
            del graphs[old]
        if len(graphs) < MAX_GRAPHS:
            graphs[key] = _SEEN
        return None
    if entry is _SEEN:
        for call in calls:  # an earlier batch's index error is the caller's, not the capture's
            call[0].raise_deferred_errors()
        try:
            entry = GraphedStack(calls)
        except Exception as e:
            graphs[key] = _FAILED  # not again for this layout
            raise RuntimeError(f"capturing the TT lookups in a CUDA graph failed ({type(e).__name__}: {e}); "
                               "unset FPD_TT_CUDA_GRAPHS to train without graphs") from e
        graphs[key] = entry
    if entry.pending:
        return None
    return entry(calls)


__all__ = ["MAX_GRAPHS", "GraphedStack", "graphed_lookups", "layout_key"]
