"""DLRM models assembled from named parts, one per source layout.

``architecture`` is the JSON-able description inferred from a checkpoint (see
``fpd_convert.checkpoints``); ``tt_shapes`` maps a table's weight key to the
:class:`TTShape` of its TT replacement.  Parameter names equal the source's, so a
source state_dict loads with ``strict=True`` and TT cores sit at ``<table>.cores.{j}``.

Both models take ``dense`` (B, num_dense) float features and ``sparse``: a (B, F)
LongTensor (one id per feature, Criteo style) or F ``(indices, offsets)`` pairs.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..layers import TTEmbeddingBag
from ..layers.grouped import GroupedLookups
from ..tt import TTShape
from .parts import (CatInteraction, DCNInteraction, DDPShell, DenseArch, DotInteraction, LowRankCrossNet,
                    MDEmbeddingBag, OverArch, ProjectionInteraction, QREmbeddingBag, SparseInput,
                    sequential_mlp, start_lookups)


def make_table(spec: dict, tt: Optional[TTShape]) -> nn.Module:
    """The module for one table spec: TT when ``tt`` is given, else as in the source."""
    if tt is not None:
        return TTEmbeddingBag(tt.num_rows, tt.dim, rank=tt.ranks, row_factors=tt.row_factors,
                              dim_factors=tt.dim_factors, mode="sum")
    kind = spec.get("kind", "dense")
    if kind == "dense":
        return nn.EmbeddingBag(spec["rows"], spec["dim"], mode="sum")
    if kind == "qr":
        return QREmbeddingBag(spec["rows_q"], spec["rows_r"], spec["dim"], spec.get("operation", "mult"))
    if kind == "md":
        return MDEmbeddingBag(spec["rows"], spec["small_dim"], spec["dim"])
    raise ValueError(f"unknown table kind {kind!r}")


class DLRMNet(nn.Module):
    """facebookresearch/dlrm ``DLRM_Net``: ``emb_l``, ``bot_l``, ``top_l`` (+ ``v_W_l``).

    ``forward`` returns click probabilities (B, 1): the top MLP ends with a Sigmoid.

    Example::

        arch = {"family": "dlrm", "variant": "dot", "interaction_itself": False,
                "bottom": [13, 64, 16], "top": [16 + 6, 32, 1], "weighted_pooling": False,
                "tables": [{"key": f"emb_l.{i}.weight", "rows": 100, "dim": 16} for i in range(3)]}
        model = DLRMNet(arch)
        p = model(torch.rand(8, 13), torch.randint(0, 100, (8, 3)))   # (8, 1) in (0, 1)
    """

    output = "probability"

    def __init__(self, architecture: dict, tt_shapes: Optional[Dict[str, TTShape]] = None):
        super().__init__()
        tt_shapes = tt_shapes or {}
        self.architecture = architecture
        tables = architecture["tables"]
        self.emb_l = nn.ModuleList(make_table(t, tt_shapes.get(t["key"])) for t in tables)
        if architecture.get("weighted_pooling"):
            self.v_W_l = nn.ParameterList(nn.Parameter(torch.ones(t["rows"])) for t in tables)
        else:
            self.v_W_l = None
        bottom = sequential_mlp(architecture["bottom"], "relu")
        top = sequential_mlp(architecture["top"], "sigmoid")
        self.bot_l = DDPShell(bottom) if architecture.get("ddp_bottom") else bottom
        self.top_l = DDPShell(top) if architecture.get("ddp_top") else top
        if architecture["variant"] == "cat":
            self.interaction = CatInteraction()
        else:
            self.interaction = DotInteraction(len(tables), "lower", bool(architecture.get("interaction_itself")))

    def _features(self, dense: torch.Tensor, sparse: SparseInput) -> torch.Tensor:
        lookups = start_lookups(self.emb_l, sparse, self.v_W_l)  # TT dedups first: one sync, after the MLP is queued
        x = self.bot_l(dense)
        ly = torch.stack(lookups.results(), dim=1)
        return self.interaction(x, ly.to(x.dtype))

    def logits(self, dense: torch.Tensor, sparse: SparseInput) -> torch.Tensor:
        """Pre-sigmoid scores (B, 1), for numerically stable training losses."""
        top = self.top_l.module if isinstance(self.top_l, DDPShell) else self.top_l
        return top[:-1](self._features(dense, sparse))

    def forward(self, dense: torch.Tensor, sparse: SparseInput) -> torch.Tensor:
        return self.top_l(self._features(dense, sparse))


class EmbeddingBagCollection(nn.Module):
    """Holds tables at ``embedding_bags.<name>`` as TorchRec's collection does."""

    def __init__(self, bags: Dict[str, nn.Module]):
        super().__init__()
        self.embedding_bags = nn.ModuleDict(bags)


class SparseArch(nn.Module):
    """TorchRec ``SparseArch``: pooled embeddings (B, F, D), one feature per table, in table order."""

    def __init__(self, bags: Dict[str, nn.Module]):
        super().__init__()
        self.embedding_bag_collection = EmbeddingBagCollection(bags)

    def start(self, sparse: SparseInput) -> GroupedLookups:
        """The lookups begun (see :func:`start_lookups`); ``torch.stack(.results(), 1)`` is the output."""
        return start_lookups(list(self.embedding_bag_collection.embedding_bags.values()), sparse)

    def forward(self, sparse: SparseInput) -> torch.Tensor:
        return torch.stack(self.start(sparse).results(), dim=1)


class TorchRecDLRM(nn.Module):
    """TorchRec ``DLRM`` / ``DLRM_DCN`` / ``DLRM_Projection``: ``sparse_arch``, ``dense_arch``,
    ``inter_arch``, ``over_arch``.  ``forward`` returns logits (B, 1)."""

    output = "logit"

    def __init__(self, architecture: dict, tt_shapes: Optional[Dict[str, TTShape]] = None):
        super().__init__()
        tt_shapes = tt_shapes or {}
        self.architecture = architecture
        tables = architecture["tables"]
        self.sparse_arch = SparseArch({t["name"]: make_table(t, tt_shapes.get(t["key"])) for t in tables})
        self.dense_arch = DenseArch(architecture["bottom"][0], architecture["bottom"][1:])
        variant = architecture["variant"]
        if variant == "dcn":
            dcn = architecture["dcn"]
            self.inter_arch = DCNInteraction(LowRankCrossNet((len(tables) + 1) * tables[0]["dim"],
                                                             dcn["num_layers"], dcn["low_rank"]))
        elif variant == "projection":
            p = architecture["projection"]
            self.inter_arch = ProjectionInteraction(DenseArch(p["branch1"][0], p["branch1"][1:]),
                                                    DenseArch(p["branch2"][0], p["branch2"][1:]))
        else:
            self.inter_arch = DotInteraction(len(tables), "upper")
        self.over_arch = OverArch(architecture["top"][0], architecture["top"][1:])

    def logits(self, dense: torch.Tensor, sparse: SparseInput) -> torch.Tensor:
        lookups = self.sparse_arch.start(sparse)  # TT dedups first: one sync, after the dense arch is queued
        x = self.dense_arch(dense)
        return self.over_arch(self.inter_arch(x, torch.stack(lookups.results(), dim=1).to(x.dtype)))

    forward = logits


def build_model(architecture: dict, tt_shapes: Optional[Dict[str, TTShape]] = None) -> nn.Module:
    """The model for an inferred architecture (``family`` ``dlrm`` or ``torchrec``)."""
    family = architecture.get("family")
    if family == "dlrm":
        return DLRMNet(architecture, tt_shapes)
    if family == "torchrec":
        return TorchRecDLRM(architecture, tt_shapes)
    raise ValueError(f"no model for architecture family {family!r}")


def probabilities(model: nn.Module, dense: torch.Tensor, sparse: SparseInput) -> torch.Tensor:
    """Click probabilities (B,) whatever the model outputs."""
    return torch.sigmoid(model.logits(dense, sparse)).reshape(-1)
