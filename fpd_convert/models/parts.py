"""Named parts of DLRM-style models: MLPs, embedding tables, feature interactions.

Parameter names follow the source layouts exactly, so a source state_dict loads
into these modules with ``strict=True``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.grouped import GroupedLookups
from ..layers.traced import for_onnx

SparseInput = Union[torch.Tensor, Sequence[Tuple[torch.Tensor, torch.Tensor]]]


def sequential_mlp(sizes: Sequence[int], last: str) -> nn.Sequential:
    """facebookresearch/dlrm MLP: ``Linear`` at even indices, ``ReLU`` between, ``last`` after
    the final layer (``"relu"`` for the bottom MLP, ``"sigmoid"`` for the top)."""
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        final = i == len(sizes) - 2
        layers.append(nn.Sigmoid() if final and last == "sigmoid" else nn.ReLU())
    return nn.Sequential(*layers)


class DDPShell(nn.Module):
    """Keeps the ``.module`` level of a DDP-wrapped MLP so its keys stay ``bot_l.module.{k}``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


class Perceptron(nn.Module):
    """TorchRec ``Perceptron``: ``relu(_linear(x))``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self._linear = nn.Linear(in_features, out_features)

    def forward(self, x):
        return torch.relu(self._linear(x))


class MLP(nn.Module):
    """TorchRec ``MLP``: a ReLU after every layer, parameters at ``_mlp.{k}._linear``."""

    def __init__(self, in_features: int, layer_sizes: Sequence[int]):
        super().__init__()
        sizes = [in_features] + list(layer_sizes)
        self._mlp = nn.ModuleList(Perceptron(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for layer in self._mlp:
            x = layer(x)
        return x


class DenseArch(nn.Module):
    """TorchRec ``DenseArch``: (B, num_dense) -> (B, D) through ``model`` (an :class:`MLP`)."""

    def __init__(self, in_features: int, layer_sizes: Sequence[int]):
        super().__init__()
        self.model = MLP(in_features, layer_sizes)

    def forward(self, x):
        return self.model(x)


class OverArch(nn.Module):
    """TorchRec ``OverArch``: ``model = Sequential(MLP, Linear)``; outputs logits (B, 1)."""

    def __init__(self, in_features: int, layer_sizes: Sequence[int]):
        super().__init__()
        self.model = nn.Sequential(MLP(in_features, layer_sizes[:-1]), nn.Linear(layer_sizes[-2], layer_sizes[-1]))

    def forward(self, x):
        return self.model(x)


class QREmbeddingBag(nn.Module):
    """facebookresearch/dlrm quotient-remainder table (``--qr-flag``), operation ``mult``:
    ``row(i) = weight_q[i // c] * weight_r[i % c]`` with ``c = weight_r.shape[0]``.
    Kept as it is by compression."""

    def __init__(self, num_q: int, num_r: int, dim: int, operation: str = "mult"):
        super().__init__()
        self.weight_q = nn.Parameter(torch.zeros(num_q, dim))
        self.weight_r = nn.Parameter(torch.zeros(num_r, dim))
        self.operation = operation

    def forward(self, input, offsets=None, per_sample_weights=None):
        c = self.weight_r.shape[0]
        q = F.embedding_bag(input // c, self.weight_q, offsets, mode="sum",
                            per_sample_weights=per_sample_weights)
        r = F.embedding_bag(torch.remainder(input, c), self.weight_r, offsets, mode="sum",
                            per_sample_weights=per_sample_weights)
        return {"mult": lambda: q * r, "add": lambda: q + r, "concat": lambda: torch.cat([q, r], 1)}[self.operation]()


class MDEmbeddingBag(nn.Module):
    """facebookresearch/dlrm mixed-dimension table (``--md-flag``): ``proj(embs(x))``.
    Kept as it is by compression."""

    def __init__(self, rows: int, small_dim: int, dim: int):
        super().__init__()
        self.embs = nn.EmbeddingBag(rows, small_dim, mode="sum")
        self.proj = nn.Linear(small_dim, dim, bias=False) if small_dim < dim else nn.Identity()

    def forward(self, input, offsets=None, per_sample_weights=None):
        return self.proj(self.embs(input, offsets, per_sample_weights=per_sample_weights))


def _feature(sparse: SparseInput, f: int):
    """``(ids, offsets)`` of feature ``f``."""
    if isinstance(sparse, torch.Tensor):
        ids = sparse[:, f]
        return ids, torch.arange(ids.shape[0], device=ids.device)
    return sparse[f]


def lookup(table: nn.Module, sparse: SparseInput, f: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pooled embeddings (B, D) of feature ``f``: one id per sample from a (B, F) tensor, or
    ``(indices, offsets)`` for multi-hot bags."""
    ids, offsets = _feature(sparse, f)
    if weights is not None:
        return table(ids, offsets, per_sample_weights=weights.gather(0, ids))
    return table(ids, offsets)


class TracedLookups:
    """What :func:`start_lookups` gives under ``torch.compile`` / ``torch.export``: each table called in
    turn (a trace has no host sync to group), one-hot features as ``(B, 1)`` bags (no offsets to build)."""

    def __init__(self, tables: Sequence[nn.Module], sparse: SparseInput,
                 weights: Optional[Sequence[Optional[torch.Tensor]]] = None):
        self._args = (tables, sparse, weights)

    def results(self) -> List[torch.Tensor]:
        from ..layers.traced import traced_dense_bag
        tables, sparse, weights = self._args
        out = []
        for f, table in enumerate(tables):
            w = weights[f] if weights is not None else None
            call = (lambda *a, t=table, **k: traced_dense_bag(t, *a, **k)) if type(table) is nn.EmbeddingBag else table
            if isinstance(sparse, torch.Tensor):
                ids = sparse[:, f:f + 1]
                out.append(call(ids) if w is None else call(ids, per_sample_weights=w[ids]))
            else:
                ids, offsets = sparse[f]
                out.append(call(ids, offsets) if w is None else call(ids, offsets, per_sample_weights=w[ids]))
        return out


def start_lookups(tables: Sequence[nn.Module], sparse: SparseInput,
                  weights: Optional[Sequence[Optional[torch.Tensor]]] = None):
    """:func:`lookup` of every table (feature ``f`` for table ``f``), begun together: the TT
    bags' GPU dedups are launched now and read in one sync by ``.results()``, so the caller can
    queue other work in between (see :mod:`fpd_convert.layers.grouped`).  Traced
    (``torch.compile``, ``torch.export``): :class:`TracedLookups`."""
    if torch.compiler.is_compiling():
        return TracedLookups(tables, sparse, weights)
    calls = []
    one_hot = None  # one id a sample: the same offsets for every feature (one arange, not one a table)
    if isinstance(sparse, torch.Tensor):
        one_hot = torch.arange(sparse.shape[0], device=sparse.device)
    for f, table in enumerate(tables):
        ids, offsets = (sparse[:, f], one_hot) if one_hot is not None else _feature(sparse, f)
        w = weights[f] if weights is not None else None
        calls.append((table, ids, offsets, w.gather(0, ids) if w is not None else None))
    return GroupedLookups(calls)


class DotInteraction(nn.Module):
    """Pairwise dot products of ``[dense, e_1, ..., e_F]`` (B, F+1, D), concatenated after
    the dense vector: (B, D + P).

    ``triangle="lower"`` (facebookresearch/dlrm): pairs (i, j), j < i (j <= i with
    ``self_interaction``), row by row: (1,0), (2,0), (2,1), ...
    ``triangle="upper"`` (TorchRec): pairs (i, j), i < j, row by row: (0,1), (0,2), ..., (1,2), ...
    """

    def __init__(self, num_sparse: int, triangle: str = "lower", self_interaction: bool = False):
        super().__init__()
        n = num_sparse + 1
        if triangle == "lower":
            offset = 1 if self_interaction else 0
            pairs = [(i, j) for i in range(n) for j in range(i + offset)]
        else:
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        # on the CPU even where the model is built on the meta device (loading a file's tensors into it)
        self.register_buffer("_rows", torch.tensor([p[0] for p in pairs], dtype=torch.long, device="cpu"),
                             persistent=False)
        self.register_buffer("_cols", torch.tensor([p[1] for p in pairs], dtype=torch.long, device="cpu"),
                             persistent=False)
        # the pairs as places in the flattened (n x n) products: an index_select, whose backward
        # is an index_add (z[:, rows, cols] backpropagates through a sorting index_put: 4.6 ms
        # of a 21 ms DLRM step at batch 65,536 on an H100)
        self.register_buffer("_flat", self._rows * n + self._cols, persistent=False)

    @property
    def num_pairs(self) -> int:
        return int(self._rows.numel())

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        t = torch.cat([dense.unsqueeze(1), sparse], dim=1)
        z = torch.bmm(t, t.transpose(1, 2)).flatten(1)
        if for_onnx():  # ONNX Runtime gathers along axis 1 an entry at a time; along axis 0 it copies rows
            # (demo model at 2,048, 1 thread: the dense model 0.64x, the compressed 0.79x the time)
            return torch.cat([dense, z.t().index_select(0, self._flat).t()], dim=1)
        return torch.cat([dense, z.index_select(1, self._flat)], dim=1)


class CatInteraction(nn.Module):
    """facebookresearch/dlrm ``--arch-interaction-op cat``: (B, (F+1) * D)."""

    def forward(self, dense, sparse):
        return torch.cat([dense, sparse.flatten(1)], dim=1)


class LowRankCrossNet(nn.Module):
    """TorchRec ``LowRankCrossNet`` (DCN-v2): ``x_{l+1} = x_0 * (W_l (V_l x_l) + b_l) + x_l``
    with ``W_l`` (N, r), ``V_l`` (r, N), ``b_l`` (N,)."""

    def __init__(self, in_features: int, num_layers: int, low_rank: int):
        super().__init__()
        self.W_kernels = nn.ParameterList(nn.Parameter(torch.zeros(in_features, low_rank)) for _ in range(num_layers))
        self.V_kernels = nn.ParameterList(nn.Parameter(torch.zeros(low_rank, in_features)) for _ in range(num_layers))
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(in_features)) for _ in range(num_layers))

    def forward(self, x0):
        x = x0
        for w, v, b in zip(self.W_kernels, self.V_kernels, self.bias):
            x = x0 * (F.linear(F.linear(x, v), w) + b) + x
        return x


class DCNInteraction(nn.Module):
    """TorchRec ``InteractionDCNArch``: crossnet over the flattened (B, (F+1) * D)."""

    def __init__(self, crossnet: LowRankCrossNet):
        super().__init__()
        self.crossnet = crossnet

    def forward(self, dense, sparse):
        return self.crossnet(torch.cat([dense.unsqueeze(1), sparse], dim=1).flatten(1))


class ProjectionInteraction(nn.Module):
    """TorchRec ``InteractionProjectionArch``: ``[dense, flat(B1(x) (B, F1, D) @ B2(x) (B, D, F2))]``."""

    def __init__(self, branch1: DenseArch, branch2: DenseArch):
        super().__init__()
        self.interaction_branch1 = branch1
        self.interaction_branch2 = branch2

    def forward(self, dense, sparse):
        b, d = dense.shape
        flat = torch.cat([dense.unsqueeze(1), sparse], dim=1).reshape(b, -1)
        y = self.interaction_branch1(flat).reshape(b, -1, d)
        z = self.interaction_branch2(flat).reshape(b, d, -1)
        return torch.cat([dense, torch.bmm(y, z).reshape(b, -1)], dim=1)


def choose2(n: int) -> int:
    return math.comb(n, 2)
