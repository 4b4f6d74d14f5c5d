"""The facebookresearch/dlrm checkpoint layout (``dlrm_s_pytorch.py --save-model``).

State_dict keys: ``emb_l.{i}.weight`` (n_i, m) nn.EmbeddingBag(sum); ``bot_l.{0,2,..}`` and
``top_l.{0,2,..}`` Linear layers (``bot_l.module.{k}`` when DDP-wrapped); optional
``v_W_l.{i}`` (n_i,) weighted pooling; ``emb_l.{i}.weight_q/weight_r`` (``--qr-flag``) and
``emb_l.{i}.embs.weight`` / ``proj.weight`` (``--md-flag``), kept as they are.
"""
from __future__ import annotations

import re
from typing import Dict, List

import torch

from .safe_load import CheckpointError

_EMB = re.compile(r"^emb_l\.(\d+)\.(weight|weight_q|weight_r|embs\.weight|proj\.weight)$")


def is_dlrm(keys) -> bool:
    keys = list(keys)
    return any(_EMB.match(k) for k in keys) and any(k.startswith(("bot_l.", "top_l.")) for k in keys)


def _mlp_sizes(state: Dict[str, torch.Tensor], name: str):
    """(layer sizes, DDP-wrapped) of ``bot_l``/``top_l``."""
    pat = re.compile(rf"^{name}\.(module\.)?(\d+)\.weight$")
    found = sorted((int(m.group(2)), bool(m.group(1)), k) for k in state for m in [pat.match(k)] if m)
    if not found:
        raise CheckpointError(f"facebookresearch/dlrm layout without {name}.* weights: missing keys")
    ws = [state[k] for _, _, k in found]
    sizes = [ws[0].shape[1]] + [w.shape[0] for w in ws]
    for a, b in zip(ws[:-1], ws[1:]):
        if b.shape[1] != a.shape[0]:
            raise CheckpointError(f"{name}: layer widths do not chain ({tuple(a.shape)} then {tuple(b.shape)})")
    return sizes, found[0][1]


def infer_dlrm_architecture(state: Dict[str, torch.Tensor]) -> dict:
    """Architecture of a facebookresearch/dlrm state_dict (keys without any outer prefix)."""
    idx: Dict[int, Dict[str, str]] = {}
    for k in state:
        m = _EMB.match(k)
        if m:
            idx.setdefault(int(m.group(1)), {})[m.group(2)] = k
    if sorted(idx) != list(range(len(idx))):
        raise CheckpointError(f"facebookresearch/dlrm layout with table indices {sorted(idx)}: tables are missing")
    bottom, ddp_bottom = _mlp_sizes(state, "bot_l")
    top, ddp_top = _mlp_sizes(state, "top_l")
    m = bottom[-1]
    tables: List[dict] = []
    for i in range(len(idx)):
        parts = idx[i]
        if "weight" in parts:
            w = state[parts["weight"]]
            tables.append({"name": str(i), "key": parts["weight"], "rows": int(w.shape[0]), "dim": int(w.shape[1]),
                           "kind": "dense"})
        elif "weight_q" in parts and "weight_r" in parts:
            q, r = state[parts["weight_q"]], state[parts["weight_r"]]
            tables.append({"name": str(i), "key": f"emb_l.{i}", "rows": int(q.shape[0] * r.shape[0]),
                           "rows_q": int(q.shape[0]), "rows_r": int(r.shape[0]), "dim": int(q.shape[1]),
                           "kind": "qr", "operation": "mult"})
        elif "embs.weight" in parts:
            e = state[parts["embs.weight"]]
            tables.append({"name": str(i), "key": f"emb_l.{i}", "rows": int(e.shape[0]), "dim": m,
                           "small_dim": int(e.shape[1]), "kind": "md"})
        else:
            raise CheckpointError(f"table emb_l.{i} has keys {sorted(parts)}, a kind this tool does not know")
    for t in tables:
        if t["kind"] == "dense" and t["dim"] != m:
            raise CheckpointError(f"table {t['key']} has dim {t['dim']} but the bottom MLP outputs {m}")
    n = len(tables) + 1
    width = top[0]
    options = {("dot", False): m + n * (n - 1) // 2, ("dot", True): m + n * (n + 1) // 2, ("cat", False): n * m}
    matches = [opt for opt, w in options.items() if w == width]
    if not matches:
        raise CheckpointError(
            f"cannot infer the interaction: top_l.0.weight takes {width} inputs, but {len(tables)} tables of dim {m} "
            f"give {options[('dot', False)]} (dot), {options[('dot', True)]} (dot with self-interaction) "
            f"or {options[('cat', False)]} (cat)")
    variant, itself = matches[0]
    weighted = any(k.startswith("v_W_l.") for k in state)
    return {"family": "dlrm", "variant": variant, "interaction_itself": itself, "bottom": bottom, "top": top,
            "ddp_bottom": ddp_bottom, "ddp_top": ddp_top, "weighted_pooling": weighted, "tables": tables,
            "num_dense": bottom[0], "embedding_dim": m}
