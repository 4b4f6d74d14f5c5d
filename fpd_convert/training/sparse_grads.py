"""Sparse gradients for the dense embedding tables while they train.

A dense table's gradient is zero outside the rows a batch looked up, but as a dense tensor it
is the table's full size: every step allocates it, and the optimizer reads and writes the whole
table and its state.  For a 1M x 64 table that is ~1 GB of memory traffic a step for a batch
that touches a few thousand rows: ``train`` of a DLRM with such a table, batch 512, on 2 CPU
cores took 438 ms a step with dense gradients and 13 ms with sparse ones (docs/benchmarks.md).
``nn.EmbeddingBag(sparse=True)`` gives a sparse gradient instead, as facebookresearch/dlrm
trains its tables.

Only where the result is the same: plain SGD and Adagrad without weight decay (their update of
a row with a zero gradient is zero, so updating only the looked-up rows is exact), and not
under DDP, whose reducer is set up for dense gradients.  Adam keeps dense gradients: it moves
rows with a zero gradient through its moments, which a sparse update would skip.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def takes_sparse_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` updates a table from a sparse gradient exactly as from the dense one."""
    if type(optimizer) is torch.optim.Adagrad:
        return all(g.get("weight_decay", 0) == 0 and g.get("lr_decay", 0) == 0 for g in optimizer.param_groups)
    if type(optimizer) is torch.optim.SGD:
        return all(g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 for g in optimizer.param_groups)
    return False


@contextlib.contextmanager
def sparse_table_gradients(model: nn.Module, optimizer: torch.optim.Optimizer,
                           distributed: bool = False) -> Iterator[int]:
    """Within the block, the ``nn.EmbeddingBag`` / ``nn.Embedding`` tables of ``model`` give sparse
    gradients when ``optimizer`` takes them (see the module's docstring); yields how many tables
    do.  Each table's own setting is restored after."""
    tables = [m for m in model.modules() if isinstance(m, (nn.EmbeddingBag, nn.Embedding)) and not m.sparse]
    if distributed or not takes_sparse_gradients(optimizer):
        tables = []
    # torch's sparse invariant checks are off by default; saying so explicitly silences the
    # warning Adagrad's sparse update gives otherwise (same behaviour)
    if tables and not torch.sparse.check_sparse_tensor_invariants.is_enabled():
        torch.sparse.check_sparse_tensor_invariants.disable()
    for m in tables:
        m.sparse = True
    try:
        yield len(tables)
    finally:
        for m in tables:
            m.sparse = False
