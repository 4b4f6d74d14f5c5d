"""``TTEmbeddingBagCollection``: a TorchRec ``EmbeddingBagCollection`` whose largest tables are TT tables.

It implements TorchRec's ``EmbeddingBagCollectionInterface`` (``forward(KeyedJaggedTensor) ->
KeyedTensor``, ``embedding_bag_configs()``, ``is_weighted()``) with the semantics of TorchRec's own
``EmbeddingBagCollection``: the tables' ``EmbeddingBagConfig`` (feature names, several features per
table, ``feature@table`` output names for a feature that several tables read, SUM and MEAN pooling),
weighted KJTs and empty bags.  The tables it keeps dense live in a real TorchRec
``EmbeddingBagCollection`` (``dense``), which ``DistributedModelParallel``'s planner shards as usual; the
TT tables (:class:`fpd_convert.layers.TTEmbeddingBag`, small) are plain modules it replicates
data-parallel.  Its state_dict has the keys TorchRec's EBC has (``embedding_bags.<table>.weight`` for a
dense table; ``embedding_bags.<table>.cores.j`` and its row map and exact rows for a TT one).

Example::

    tables = [EmbeddingBagConfig(name="t_big", embedding_dim=16, num_embeddings=100_000, feature_names=["f0"]),
              EmbeddingBagConfig(name="t_small", embedding_dim=16, num_embeddings=50, feature_names=["f1"])]
    tt = {"t_big": TTEmbeddingBag(100_000, 16, rank=8, mode="sum", include_last_offset=True)}
    ebc = TTEmbeddingBagCollection(tables, tt)
    kt = ebc(KeyedJaggedTensor.from_lengths_sync(["f0", "f1"], torch.tensor([5, 7, 1]), torch.tensor([2, 1])))
    kt.values().shape   # (1, 32): one sample, two features of dim 16
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (EmbeddingBagCollection, EmbeddingBagCollectionInterface,
                                                get_embedding_names_by_table)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from ..layers import TTEmbeddingBag

DENSE = "dense"  # the inner EmbeddingBagCollection of the tables kept dense


def pooling_mode(config: EmbeddingBagConfig) -> str:
    """``nn.EmbeddingBag``'s mode for a config's pooling (TorchRec pools with SUM or MEAN)."""
    if config.pooling == PoolingType.SUM:
        return "sum"
    if config.pooling == PoolingType.MEAN:
        return "mean"
    raise ValueError(f"table {config.name}: pooling {config.pooling} is not SUM or MEAN")


class TTEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A TorchRec EBC over ``tables`` (their configs, in order) where the tables named in ``tt`` are TT
    tables (``TTEmbeddingBag`` with ``include_last_offset=True`` and the config's pooling); the others
    are held by a real ``EmbeddingBagCollection`` (given as ``dense``, or made here)."""

    def __init__(self, tables: List[EmbeddingBagConfig], tt: Dict[str, TTEmbeddingBag], is_weighted: bool = False,
                 dense: Optional[EmbeddingBagCollection] = None, device: Optional[torch.device] = None):
        super().__init__()
        names = check_tables(tables, tt)
        for config in tables:
            layer = tt.get(config.name)
            if layer is not None and (not layer.include_last_offset or layer.mode != pooling_mode(config)):
                raise ValueError(f"TT table {config.name} should have include_last_offset=True and mode "
                                 f"{pooling_mode(config)!r}, as TorchRec's tables do")
        self._configs = list(tables)
        self._is_weighted = is_weighted
        dense_configs = [t for t in tables if t.name not in tt]
        if dense is None and dense_configs:
            dense = EmbeddingBagCollection(dense_configs, is_weighted=is_weighted, device=device)
        self.dense = dense
        self.embedding_bags = nn.ModuleDict({name: tt[name] for name in names if name in tt})
        self._embedding_names = [e for names_ in get_embedding_names_by_table(tables) for e in names_]
        self._lengths = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._dense_features = [f for t in dense_configs for f in t.feature_names]
        self._inner_names = inner_names(dense_configs)
        keep_collection_keys(self, "embedding_bags")

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def tt_tables(self) -> Dict[str, TTEmbeddingBag]:
        return dict(self.embedding_bags.items())

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of every feature, in the configs' order (as TorchRec's EBC)."""
        dense_out: Dict[str, torch.Tensor] = {}
        if self.dense is not None:
            dense_out = self.dense(picked_features(features, self._dense_features)).to_dict()
        jagged = features.to_dict() if len(self.embedding_bags) else {}
        pooled: List[torch.Tensor] = []
        for config in self._configs:
            for feature in config.feature_names:
                if config.name not in self.embedding_bags:
                    pooled.append(dense_out[self._inner_names[config.name, feature]])
                    continue
                f = jagged[feature]
                weights = f.weights() if self._is_weighted else None
                pooled.append(self.embedding_bags[config.name](f.values(), f.offsets(), per_sample_weights=weights).float())
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths, values=torch.cat(pooled, dim=1))


def check_tables(tables: list, tt: Dict[str, nn.Module]) -> List[str]:
    """The table names, checked as both TT collections need them: unique, each TT layer with a config of its
    size.  A config without feature names reads the feature of its own name, as in TorchRec."""
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate table names in {names}")
    unknown = set(tt) - set(names)
    if unknown:
        raise ValueError(f"TT tables {sorted(unknown)} have no config among {names}")
    for config in tables:
        if not config.feature_names:
            config.feature_names = [config.name]
        layer = tt.get(config.name)
        if layer is not None and (layer.num_embeddings, layer.embedding_dim) != (config.num_embeddings,
                                                                                 config.embedding_dim):
            raise ValueError(f"TT table {config.name} is {layer.num_embeddings} x {layer.embedding_dim} but "
                             f"its config says {config.num_embeddings} x {config.embedding_dim}")
    return names


def inner_names(dense_configs: list) -> Dict[tuple, str]:
    """(table, feature) -> its output's name in the inner collection of the dense tables, which names its
    outputs by its own tables alone (a feature shared with a TT table is not shared there)."""
    inner = get_embedding_names_by_table(dense_configs)
    return {(t.name, f): n for t, names_ in zip(dense_configs, inner) for f, n in zip(t.feature_names, names_)}


def picked_features(features: KeyedJaggedTensor, names: List[str]) -> KeyedJaggedTensor:
    """``features`` holding ``names`` only, in that order (what the inner collection of dense tables takes)."""
    keys = features.keys()
    return features if keys == names else features.permute([keys.index(f) for f in names])


def keep_collection_keys(module: nn.Module, attr: str) -> None:
    """Give ``module`` (a TT collection whose dense tables sit in ``module.dense``) the state_dict keys of the
    TorchRec collection it stands for: ``dense.<attr>.<t>.weight`` is ``<attr>.<t>.weight`` (``attr``:
    ``embedding_bags`` for an EBC, ``embeddings`` for an EC), out and in."""
    module._register_state_dict_hook(partial(_keys_out, attr))
    module._register_load_state_dict_pre_hook(partial(_keys_in, attr), with_module=True)


def _keys_out(attr: str, module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    inner = f"{prefix}{DENSE}.{attr}."
    for key in [k for k in state if k.startswith(inner)]:
        state[f"{prefix}{attr}.{key[len(inner):]}"] = state.pop(key)


def _keys_in(attr: str, module: nn.Module, state: dict, prefix: str, *args) -> None:
    if module.dense is None:
        return
    dense_names = set(getattr(module.dense, attr).keys())
    outer = f"{prefix}{attr}."
    for key in [k for k in state if k.startswith(outer)]:
        table = key[len(outer):].split(".", 1)[0]
        if table in dense_names:
            state[f"{prefix}{DENSE}.{attr}.{key[len(outer):]}"] = state.pop(key)
