"""``TTEmbeddingCollection``: a TorchRec ``EmbeddingCollection`` (unpooled: one embedding per id, as
sequence models take them) whose largest tables are TT tables.

It implements TorchRec's ``EmbeddingCollectionInterface`` (``forward(KeyedJaggedTensor) -> Dict[str,
JaggedTensor]``, ``embedding_configs()``, ``need_indices()``, ``embedding_dim()``,
``embedding_names_by_table()``) with the semantics of TorchRec's own ``EmbeddingCollection``: the
tables' ``EmbeddingConfig`` (feature names, several features per table, ``feature@table`` output names for a
feature that several tables read), the ids passed on as the jagged tensors' weights with ``need_indices``,
empty bags.  As in :class:`~fpd_convert.torchrec.collection.TTEmbeddingBagCollection`, the tables kept
dense live in a real TorchRec ``EmbeddingCollection`` (``dense``), which ``DistributedModelParallel``
shards as usual, and the TT tables (:class:`fpd_convert.layers.TTEmbedding`) are plain modules it
replicates; the state_dict has TorchRec's keys (``embeddings.<table>.weight`` for a dense table,
``embeddings.<table>.cores.j`` and its row map and exact rows for a TT one).

Example::

    tables = [EmbeddingConfig(name="item", embedding_dim=16, num_embeddings=100_000, feature_names=["history"]),
              EmbeddingConfig(name="category", embedding_dim=16, num_embeddings=50, feature_names=["cat"])]
    ec = TTEmbeddingCollection(tables, {"item": TTEmbedding(100_000, 16, rank=8)})
    out = ec(KeyedJaggedTensor.from_lengths_sync(["history", "cat"], torch.tensor([5, 7, 1]), torch.tensor([2, 1])))
    out["history"].values().shape   # (2, 16): one embedding per id of the sample's history
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import (EmbeddingCollection, EmbeddingCollectionInterface,
                                                get_embedding_names_by_table)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from ..layers import TTEmbedding
from .collection import check_tables, inner_names, keep_collection_keys, picked_features


class TTEmbeddingCollection(EmbeddingCollectionInterface):
    """A TorchRec EC over ``tables`` (their configs, in order, all of one dim) where the tables named in ``tt``
    are TT tables (``TTEmbedding``); the others are held by a real ``EmbeddingCollection`` (given as
    ``dense``, or made here)."""

    def __init__(self, tables: List[EmbeddingConfig], tt: Dict[str, TTEmbedding], need_indices: bool = False,
                 dense: Optional[EmbeddingCollection] = None, device: Optional[torch.device] = None):
        super().__init__()
        names = check_tables(tables, tt)
        dims = sorted({t.embedding_dim for t in tables})
        if len(dims) > 1:
            raise ValueError(f"the tables of an EmbeddingCollection have one dim, as TorchRec's do; got {dims}")
        pooled = [name for name, layer in tt.items() if not isinstance(layer, TTEmbedding)]
        if pooled:
            raise ValueError(f"TT table {pooled[0]} is a {type(tt[pooled[0]]).__name__}; an EmbeddingCollection's "
                             "tables are unpooled (TTEmbedding)")
        self._configs = list(tables)
        self._need_indices = need_indices
        self._embedding_dim = dims[0] if dims else -1
        dense_configs = [t for t in tables if t.name not in tt]
        if dense is None and dense_configs:
            dense = EmbeddingCollection(dense_configs, device=device, need_indices=need_indices)
        self.dense = dense
        self.embeddings = nn.ModuleDict({name: tt[name] for name in names if name in tt})
        self._names_by_table = get_embedding_names_by_table(tables)
        self._dense_features = list(dict.fromkeys(f for t in dense_configs for f in t.feature_names))
        self._inner_names = inner_names(dense_configs)
        keep_collection_keys(self, "embeddings")

    def embedding_configs(self) -> List[EmbeddingConfig]:
        return self._configs

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_dim(self) -> int:
        return self._embedding_dim

    def embedding_names_by_table(self) -> List[List[str]]:
        return self._names_by_table

    def tt_tables(self) -> Dict[str, TTEmbedding]:
        return dict(self.embeddings.items())

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        """One embedding per id of every feature, keyed by the configs' embedding names (as TorchRec's EC)."""
        dense_out: Dict[str, JaggedTensor] = {}
        if self.dense is not None:
            dense_out = self.dense(picked_features(features, self._dense_features))
        jagged = features.to_dict() if len(self.embeddings) else {}
        out: Dict[str, JaggedTensor] = {}
        for config, names in zip(self._configs, self._names_by_table):
            for feature, name in zip(config.feature_names, names):
                if config.name not in self.embeddings:
                    out[name] = dense_out[self._inner_names[config.name, feature]]
                    continue
                f = jagged[feature]
                out[name] = JaggedTensor(values=self.embeddings[config.name](f.values()).float(), lengths=f.lengths(),
                                         weights=f.values() if self._need_indices else None)
        return out
