"""A compressed generic state_dict as a module: TT tables plus the other tensors."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from ..layers import TTEmbeddingBag
from ..tt import TTShape


def _name(key: str) -> str:
    return key.replace(".", "__")


class GenericCompressedModel(nn.Module):
    """``tables[<key with . as __>]`` are :class:`TTEmbeddingBag` (mode ``sum``) for the
    compressed weight keys; every other tensor is a buffer in ``tensors``.
    :meth:`dense_state_dict` rebuilds the source state_dict."""

    def __init__(self, tt_shapes: Dict[str, TTShape], tables, others: Dict[str, torch.Tensor], key_order: List[str]):
        super().__init__()
        self.keys = list(tt_shapes)
        self.tables = nn.ModuleDict({
            _name(k): TTEmbeddingBag(s.num_rows, s.dim, rank=s.ranks, row_factors=s.row_factors,
                                     dim_factors=s.dim_factors, mode="sum", _cores=tables[k].cores)
            for k, s in tt_shapes.items()})
        for k in self.keys:
            self.table(k).load_table(tables[k])
        self.tensors = nn.Module()
        for k, v in others.items():
            self.tensors.register_buffer(_name(k), v)
        self.key_order = key_order or list(others) + self.keys

    def table(self, key: str) -> TTEmbeddingBag:
        return self.tables[_name(key)]

    def forward(self, *ids: torch.Tensor):
        """The rows of each compressed table for its ids, in the order of ``keys``: ``ids_k`` (N_k,) int64
        -> rows (N_k, D_k).  What an exported program of a generic file serves (``fpd-convert export``).

        Example::

            model = fpd_convert.load("generic.tt.safetensors")
            rows = model(torch.tensor([0, 5, 5]))   # one tensor per compressed table, in model.keys order
        """
        if len(ids) != len(self.keys):
            raise ValueError(f"give one id tensor per compressed table ({len(self.keys)}: {', '.join(self.keys)}) "
                             f"but got {len(ids)}")
        return tuple(self.table(k)(i.reshape(-1, 1)) for k, i in zip(self.keys, ids))

    @torch.no_grad()
    def dense_state_dict(self) -> Dict[str, torch.Tensor]:
        out = {}
        for k in self.key_order:
            out[k] = self.table(k).to_dense() if k in self.keys else getattr(self.tensors, _name(k))
        return out
