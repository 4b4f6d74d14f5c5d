"""The TorchRec ``DLRM`` / ``DLRM_DCN`` / ``DLRM_Projection`` state_dict layout.

``sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight``,
``dense_arch.model._mlp.{k}._linear.*``, ``over_arch.model.0._mlp.{k}._linear.*`` then
``over_arch.model.1.*``; DCN ``inter_arch.crossnet.{W,V}_kernels.{l}`` / ``bias.{l}``;
Projection ``inter_arch.interaction_branch{1,2}.model._mlp.{k}._linear.*``.
``DLRMTrain`` adds a ``model.`` prefix, which the reader strips and the writer restores.
The state_dict carries no feature names: one feature per table, in table order, is assumed.
A ``.pt`` state_dict keeps the tables in the collection's order; a ``.safetensors`` file sorts its keys
as strings (``t_cat_0, t_cat_1, t_cat_10, ...``), so there the tables are put back in the order of the
numbers in their names (``t_cat_0, t_cat_1, t_cat_2, ...``).
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Dict, List, Optional

import torch

from .safe_load import CheckpointError

EBC = "sparse_arch.embedding_bag_collection.embedding_bags."


def is_torchrec(keys) -> bool:
    return any(k.startswith(EBC) for k in keys)


def _torchrec_mlp(state: Dict[str, torch.Tensor], prefix: str):
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)\._linear\.weight$")
    ws = [state[k] for _, k in sorted((int(m.group(1)), k) for k in state for m in [pat.match(k)] if m)]
    if not ws:
        raise CheckpointError(f"TorchRec layout without {prefix}*: missing keys")
    return [int(ws[0].shape[1])] + [int(w.shape[0]) for w in ws]


def natural_key(name: str) -> List:
    """Sort key that orders the numbers inside a name as numbers: ``t_cat_2`` before ``t_cat_10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def infer_torchrec_architecture(state: Dict[str, torch.Tensor], keys_sorted: bool = False,
                                num_features: Optional[int] = None) -> dict:
    """Architecture of a TorchRec DLRM state_dict (keys without the ``model.`` prefix).

    ``keys_sorted``: the file sorted its keys as strings (safetensors), so the tables' order is taken
    from the numbers in their names (:func:`natural_key`).  ``num_features``: the sparse features the
    interaction sees (default: one a table; a model's table configs can give several)."""
    tables = []
    for k, w in state.items():
        if k.startswith(EBC) and k.endswith(".weight"):
            name = k[len(EBC):-len(".weight")]
            tables.append({"name": name, "key": k, "rows": int(w.shape[0]), "dim": int(w.shape[1]), "kind": "dense"})
    if keys_sorted:
        tables.sort(key=lambda t: natural_key(t["name"]))
        if not all(re.search(r"\d", t["name"]) for t in tables):
            warnings.warn("a .safetensors file does not keep the order of its tables and some TorchRec table "
                          "names carry no number to order them by; they are taken in name order, which may not "
                          "be the order of the model's features: give the .pt state_dict instead", stacklevel=3)
    dims = {t["dim"] for t in tables}
    if len(dims) != 1:
        raise CheckpointError(f"TorchRec DLRM needs one embedding dim for all tables but found {sorted(dims)}")
    d = dims.pop()
    bottom = _torchrec_mlp(state, "dense_arch.model._mlp.")
    over = _torchrec_mlp(state, "over_arch.model.0._mlp.")
    if "over_arch.model.1.weight" not in state:
        raise CheckpointError("TorchRec layout without over_arch.model.1.weight (the final Linear): missing keys")
    top = over + [int(state["over_arch.model.1.weight"].shape[0])]
    f = len(tables) if num_features is None else num_features
    arch = {"family": "torchrec", "bottom": bottom, "top": top, "tables": tables, "num_dense": bottom[0],
            "embedding_dim": d}
    if "inter_arch.crossnet.W_kernels.0" in state:
        layers = sum(1 for k in state if k.startswith("inter_arch.crossnet.W_kernels."))
        arch.update(variant="dcn", dcn={"num_layers": layers,
                                        "low_rank": int(state["inter_arch.crossnet.W_kernels.0"].shape[1])})
        expected = (f + 1) * d
    elif any(k.startswith("inter_arch.interaction_branch1.") for k in state):
        b1 = _torchrec_mlp(state, "inter_arch.interaction_branch1.model._mlp.")
        b2 = _torchrec_mlp(state, "inter_arch.interaction_branch2.model._mlp.")
        arch.update(variant="projection", projection={"branch1": b1, "branch2": b2})
        expected = d + (b1[-1] // d) * (b2[-1] // d)
    else:
        arch.update(variant="dot")
        expected = d + math.comb(f, 2) + f
    if bottom[-1] != d:
        raise CheckpointError(f"dense_arch outputs {bottom[-1]} but the tables have dim {d}")
    if top[0] != expected:
        raise CheckpointError(f"over_arch takes {top[0]} inputs but a {arch['variant']} interaction of {f} tables "
                              f"of dim {d} gives {expected}")
    return arch
