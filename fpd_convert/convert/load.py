"""``load``: a compressed file (or a source checkpoint) as an nn.Module in eval mode."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

import torch
from torch import nn

from ..checkpoints import CheckpointError, is_compressed, read_compressed, read_source, split_tables
from ..models import build_model
from ..models.generic import GenericCompressedModel


def _module_path(weight_key: str) -> str:
    return weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key


def model_state_from_compressed(tensors: Dict[str, torch.Tensor], meta) -> Dict[str, torch.Tensor]:
    """The state_dict of the TT model: ``K.tt_core.j`` -> ``<module of K>.cores.j``."""
    cores, others = split_tables(tensors, meta)
    state = dict(others)
    for key, cs in cores.items():
        for j, c in enumerate(cs):
            state[f"{_module_path(key)}.cores.{j}"] = c
    return state


def compressed_state_from_model(state: Dict[str, torch.Tensor], meta) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`model_state_from_compressed`: ``<module>.cores.j`` -> ``K.tt_core.j``."""
    out = dict(state)
    for key, entry in meta.tt_tables.items():
        for j in range(len(entry["row_factors"])):
            out[f"{key}.tt_core.{j}"] = out.pop(f"{_module_path(key)}.cores.{j}")
    return out


def load(path: Union[str, Path], allow_unsafe_pickle: bool = False) -> nn.Module:
    """Load a compressed file or a source checkpoint as a model in eval mode.

    DLRM layouts give :class:`~fpd_convert.models.DLRMNet` or
    :class:`~fpd_convert.models.TorchRecDLRM` (TT tables as ``TTEmbeddingBag``); a compressed
    generic state_dict gives a :class:`~fpd_convert.models.generic.GenericCompressedModel`.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and is_compressed(path):
        tensors, meta = read_compressed(path)
        shapes = {k: meta.tt_shape(k) for k in meta.tt_tables}
        if meta.architecture is None:
            cores, others = split_tables(tensors, meta)
            return GenericCompressedModel(shapes, cores, others, meta.state_keys).eval()
        model = build_model(meta.architecture, shapes)
        state = model_state_from_compressed(tensors, meta)
    else:
        src = read_source(path, allow_unsafe=allow_unsafe_pickle)
        if src.architecture is None:
            raise CheckpointError(f"{path}: a generic state_dict has no model to build; compress it first or load "
                                  "it with torch/safetensors")
        model, state = build_model(src.architecture), src.state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: the tensors do not fit the inferred model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    return model.eval()
