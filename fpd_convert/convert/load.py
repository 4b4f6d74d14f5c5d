"""``load``: a compressed file (or a source checkpoint) as an nn.Module in eval mode."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Union

import torch
from torch import nn

from ..checkpoints import (CheckpointError, TableTensors, encode_table, is_compressed, read_compressed,
                           read_source, split_tables)
from ..checkpoints.lazy_tables import file_mapping_of, release_pages
from ..models import build_model
from ..models.generic import GenericCompressedModel


def _module_path(weight_key: str) -> str:
    return weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key


def attach_tables(model: nn.Module, tables: Dict[str, TableTensors]) -> None:
    """Put each decoded table (cores, row map, exact rows) into its TT layer in ``model``."""
    for key, table in tables.items():
        model.get_submodule(_module_path(key)).load_table(table)


def _table_state_keys(key: str) -> List[str]:
    m = _module_path(key)
    return [f"{m}.row_map", f"{m}.exact_ids", f"{m}.exact_rows"]


def compressed_state_from_model(state: Dict[str, torch.Tensor], meta) -> Dict[str, torch.Tensor]:
    """File tensors from a TT model's state_dict: ``<module>.cores.j`` (and the row map and exact
    rows) -> the table's file tensors, encoded as its entry says (``core_dtype``, ...)."""
    out = dict(state)
    for key, entry in meta.tt_tables.items():
        m = _module_path(key)
        cores = [out.pop(f"{m}.cores.{j}") for j in range(len(entry["row_factors"]))]
        row_map, exact_ids, exact_rows = (out.pop(k, None) for k in _table_state_keys(key))
        out.update(encode_table(key, entry, TableTensors(cores, row_map, exact_ids, exact_rows)))
    return out


def _dense_model(path: Path, src) -> nn.Module:
    """The source's own model holding the file's tensors, not copies of them: built on the meta device,
    then given the tensors (``assign``).  A ``.pt`` file's tensors are a private (copy-on-write) mapping and
    are used as they are; a ``.safetensors`` file's big tensors are a read-only mapping, so each is copied
    and its mapped pages released before the next: the model costs its size once, not twice."""
    with torch.device("meta"):
        model = build_model(src.architecture)
    want = model.state_dict()
    state = {}
    for key, t in src.state.items():
        ref = want.get(key)
        if ref is not None and t.dtype != ref.dtype:
            state[key] = t.to(ref.dtype)
        elif src.container == "safetensors" and file_mapping_of(t) is not None:
            state[key] = t.clone()
        else:
            state[key] = t
        if state[key] is not t and file_mapping_of(t) is not None:
            release_pages(t)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing or unexpected or left:
        raise CheckpointError(f"{path}: the tensors do not fit the inferred model (missing {(missing or left)[:5]}, "
                              f"unexpected {unexpected[:5]})")
    return model.eval()


def load(path: Union[str, Path], allow_unsafe_pickle: bool = False) -> nn.Module:
    """Load a compressed file or a source checkpoint as a model in eval mode.

    DLRM layouts give :class:`~fpd_convert.models.DLRMNet` or
    :class:`~fpd_convert.models.TorchRecDLRM` (TT tables as ``TTEmbeddingBag``); a compressed
    generic state_dict gives a :class:`~fpd_convert.models.generic.GenericCompressedModel`.

    Serving on the CPU from a long-running process: call :func:`fpd_convert.keep_freed_memory` once
    first (the commands do).  With glibc's adaptive defaults, a lookup's few-MB buffers are handed
    back to the kernel after some calls and faulted in again: in 1 of 10 fresh processes one TT
    table's forward (1M x 64, 8,192 ids) took 1,099 page faults and 1.4 ms a call instead of 0.23.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and is_compressed(path):
        tensors, meta = read_compressed(path)
        shapes = {k: meta.tt_shape(k) for k in meta.tt_tables}
        tables, others = split_tables(tensors, meta)
        if meta.architecture is None:
            return GenericCompressedModel(shapes, tables, others, meta.state_keys).eval()
        if any(len(t.get("feature_names") or [0]) > 1 for t in meta.architecture["tables"]):
            raise CheckpointError(f"{path}: a TorchRec model whose tables read several features each; load it with "
                                  "fpd_convert.torchrec.load(path), which builds the TorchRec model itself")
        model = build_model(meta.architecture, shapes)
        attach_tables(model, tables)
        state = {**others, **{k: v for k, v in model.state_dict().items()
                              if any(k.startswith(_module_path(t) + ".") for t in tables)}}
    else:
        src = read_source(path, allow_unsafe=allow_unsafe_pickle)
        if src.architecture is None:
            raise CheckpointError(f"{path}: a generic state_dict has no model to build; compress it first or load "
                                  "it with torch/safetensors")
        return _dense_model(path, src)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: the tensors do not fit the inferred model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    return model.eval()
