"""Reading a source model: the file, its layout, its architecture and its tables."""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .dcp_folder import METADATA, folder_sha256, is_dcp_folder, read_dcp_tensors
from .dlrm_layout import infer_dlrm_architecture, is_dlrm
from .lazy_tables import map_safetensors
from .safe_load import CheckpointError, load_torch_file, to_plain
from .torchrec_layout import infer_torchrec_architecture, is_torchrec

LAYOUTS = ("dlrm", "torchrec", "generic")


@dataclass
class Source:
    """A source checkpoint, read.

    ``state`` has the keys of the layout without any outer prefix (``prefix`` holds it);
    ``container`` says how the file wrapped the state_dict: ``dlrm_checkpoint`` (a dict with
    ``state_dict`` and training scalars), ``state_dict``, ``safetensors`` or ``dcp`` (a
    torch.distributed.checkpoint folder, :mod:`.dcp_folder`).
    """

    path: Path
    layout: str
    architecture: Optional[dict]
    state: Dict[str, torch.Tensor]
    prefix: str = ""
    container: str = "state_dict"
    extras: dict = field(default_factory=dict)
    optimizer_param_groups: Optional[list] = None
    dropped: List[str] = field(default_factory=list)
    #: big tensors are views of a read-only file mapping (see :mod:`.lazy_tables`)
    mapped: bool = False
    #: per table key, the optimizer's per-element squared-gradient accumulator the checkpoint holds
    #: (Adagrad's ``sum``, Adam's ``exp_avg_sq``), for row importance without data
    optimizer_accumulators: Dict[str, torch.Tensor] = field(default_factory=dict)

    def tables(self) -> List[dict]:
        """Table specs (``key``, ``name``, ``rows``, ``dim``, ``kind``), largest first for generic files, whose
        specs also say whether the key names an embedding table (``named_as_table``, :func:`named_as_table`)."""
        if self.architecture is not None:
            return self.architecture["tables"]
        specs = [{"name": k, "key": k, "rows": int(v.shape[0]), "dim": int(v.shape[1]), "kind": "dense",
                  "named_as_table": named_as_table(k)}
                 for k, v in self.state.items() if v.ndim == 2 and v.is_floating_point()]
        return sorted(specs, key=lambda t: -t["rows"] * t["dim"])

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.state.values())


_TABLE_NAME = re.compile(r"(?:^|[^a-z])emb|embedding|(?:^|[^a-z])tables?(?:[^a-z]|$)")


def named_as_table(key: str) -> bool:
    """Whether a generic state_dict's key names an embedding table (``emb_l.0.weight``, ``user_emb.weight``,
    ``item_embeddings.weight``, ``ebc.embedding_bags.t0.weight``, ``tables.3``), not an MLP's weight."""
    return bool(_TABLE_NAME.search(key.lower()))


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    if Path(path).is_dir():  # a DCP folder: its files, by name and content
        return folder_sha256(path, chunk)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def _strip(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items()}


#: top-level names of an app state's parts that are not the model (``dcp.save({"model": ..., "optimizer": ...})``)
_NOT_MODEL = {"optimizer", "optim", "opt", "lr_scheduler", "scheduler", "step", "epoch", "train_state"}


def _model_of_app_state(state: Dict[str, torch.Tensor], places: Dict[str, tuple]):
    """``(state, left out, optimizer)``: a DCP folder that saved an app state keeps only its ``model.*``
    tensors (the prefix stays, as a TorchRec ``model.`` prefix does), and its optimizer's per-parameter state
    (``{"<param>": {"<name>": tensor}}``, for row importance); any other folder stays as it is."""
    heads = {k.split(".", 1)[0] for k in state}
    if "model" not in heads or not heads - {"model"} or not heads - {"model"} <= _NOT_MODEL:
        return state, [], None
    left = sorted(heads - {"model"})
    count = sum(1 for k in state if not k.startswith("model."))
    optimizer: Dict[str, dict] = {}
    for k, v in state.items():
        place = places.get(k, ())
        if len(place) >= 4 and place[0] in ("optimizer", "optim", "opt") and place[1] == "state":
            optimizer.setdefault(str(place[2]), {})[".".join(map(str, place[3:]))] = v
    return ({k: v for k, v in state.items() if k.startswith("model.")},
            [f"{', '.join(left)} ({count} tensors of the app state beside the model)"], optimizer or None)


def _json_or_none(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return None


def read_source(path, allow_unsafe: bool = False, layout: Optional[str] = None, data: bool = True,
                log=None) -> Source:
    """Read a ``.pt`` checkpoint, a ``.safetensors`` file or a torch.distributed.checkpoint folder and detect
    its layout.

    ``layout`` forces ``dlrm``, ``torchrec`` or ``generic`` instead of detecting it.  ``data=False``: for what
    the shapes tell (inspect, sizes); a DCP folder's tensors are then on the meta device, none read (a file's
    are mapped either way), and no optimizer state is paired.  ``log`` gets a line per big tensor a DCP folder
    has read (a long read of a big folder, said as it goes).
    """
    path = Path(path)
    if layout is not None and layout not in LAYOUTS:
        raise CheckpointError(f"layout should be one of {LAYOUTS} but got {layout!r}")
    extras, groups, dropped, container, opt_state, dcp_optimizer = {}, None, [], "state_dict", None, None
    if path.is_dir():
        if not is_dcp_folder(path):
            raise CheckpointError(f"{path}: a directory, not a file (nor a torch.distributed.checkpoint folder: "
                                  f"it has no {METADATA}); give a .pt or .safetensors file, or a DCP folder")
        state, others, places = read_dcp_tensors(path, allow_unsafe, data, log)
        state, left_out, dcp_optimizer = _model_of_app_state(state, places)
        dropped += left_out + [f"{k} (not a tensor)" for k in others]
        container, mapped = "dcp", True  # its big tensors: file mappings of their own (.dcp_folder)
    elif path.suffix == ".safetensors":
        state, _ = map_safetensors(path)
        container, mapped = "safetensors", True
    else:
        obj = load_torch_file(path, allow_unsafe=allow_unsafe)
        mapped = zipfile.is_zipfile(path)  # zip checkpoints are memory-mapped by load_torch_file
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            container = "dlrm_checkpoint"
            state = obj["state_dict"]
            for k, v in obj.items():
                if k == "state_dict":
                    continue
                if k == "opt_state_dict" and isinstance(v, dict):
                    groups = _json_or_none([{a: to_plain(b) for a, b in g.items()} for g in v.get("param_groups", [])])
                    dropped.append("opt_state_dict.state (optimizer moments; param_groups kept)")
                    opt_state = v
                    continue
                plain = to_plain(v)
                if _json_or_none(plain) is not None or plain is None:
                    extras[k] = plain
                else:
                    dropped.append(k)
        elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            state = obj
        else:
            what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path}: expected a state_dict or a checkpoint dict with 'state_dict', got {what}")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    prefix = ""
    keys = list(state)
    if all(k.startswith("module.") for k in keys):
        prefix = "module."
    elif is_torchrec([k[len("model."):] for k in keys if k.startswith("model.")]) and \
            all(k.startswith("model.") for k in keys):
        prefix = "model."
    state = _strip(state, prefix)
    detected = "dlrm" if is_dlrm(state) else "torchrec" if is_torchrec(state) else "generic"
    layout = layout or detected
    if layout != "generic" and detected != layout:
        raise CheckpointError(f"{path}: asked for the {layout} layout but the keys look like {detected} "
                              f"(first keys: {keys[:4]})")
    empty = [k for k, v in state.items() if v.ndim == 2 and v.is_floating_point() and 0 in v.shape]
    if empty:
        raise CheckpointError(f"{path}: tensor {empty[0]} has shape {tuple(state[empty[0]].shape)}: a table needs "
                              "at least one row and one column")
    arch = (infer_dlrm_architecture(state) if layout == "dlrm"
            else infer_torchrec_architecture(state, keys_sorted=container == "safetensors") if layout == "torchrec"
            else None)
    src = Source(path, layout, arch, state, prefix, container, extras, groups, dropped, mapped)
    if opt_state is not None:
        src.optimizer_accumulators = optimizer_accumulators(opt_state, state, [t["key"] for t in src.tables()])
    if dcp_optimizer and data:  # an app state's optimizer, keyed by parameter names (TorchRec's KeyedOptimizer)
        src.optimizer_accumulators = named_accumulators(dcp_optimizer, state, [t["key"] for t in src.tables()], prefix)
    return src


ACCUMULATORS = ("sum", "exp_avg_sq")  # Adagrad's, Adam's (and AdamW's) squared-gradient accumulators
# TorchRec's fused (FBGEMM) optimizers name theirs ``<param>.momentum_1`` (``<table>.momentum1`` for a table
# sharded by DMP; Adagrad, row-wise Adagrad: one value a row) or, with a first moment beside, ``momentum_2`` (Adam)
FUSED_ACCUMULATORS = ("momentum_2", "momentum2", "momentum_1", "momentum1")


def read_optimizer_state(path, src: Source, allow_unsafe: bool = False) -> Dict[str, torch.Tensor]:
    """The tables' accumulators from an optimizer state saved apart from the model (``compress
    --optimizer-state``): a ``torch.optim`` state_dict, or one keyed by parameter names as TorchRec's
    ``KeyedOptimizer.state_dict()`` gives (``{"state": {fqn: {"sum": ..., "step": ...}}}``) or a fused
    collection's ``fused_optimizer.state_dict()`` (``{"state": {"t_0.weight": {"t_0.weight.momentum_1": ...}}}``),
    alone or under an ``"optimizer"`` key.  Refused when it pairs with none of the tables."""
    obj = load_torch_file(Path(path), allow_unsafe=allow_unsafe)
    if isinstance(obj, dict) and isinstance(obj.get("optimizer"), dict):
        obj = obj["optimizer"]
    if not isinstance(obj, dict) or not isinstance(obj.get("state"), dict):
        raise CheckpointError(f"{path}: not an optimizer state_dict (a dict with 'state')")
    keys = [t["key"] for t in src.tables()]
    named = all(isinstance(k, str) for k in obj["state"])
    found = (named_accumulators(obj["state"], src.state, keys, src.prefix) if named
             else optimizer_accumulators(obj, src.state, keys))
    if not found:
        names = ", ".join(ACCUMULATORS + FUSED_ACCUMULATORS)
        raise CheckpointError(f"{path}: holds no squared-gradient accumulator ({names}) of the "
                              f"shape of any of the tables {', '.join(keys[:5])}" +
                              ("" if named else " (a state numbered by parameter pairs only with a state_dict of "
                               "parameters in the model's order)"))
    return found


def named_accumulators(per_param: dict, state: Dict[str, torch.Tensor], table_keys, prefix: str = ""
                       ) -> Dict[str, torch.Tensor]:
    """Accumulators of a state keyed by parameter names: TorchRec's ``KeyedOptimizer`` (the table's name,
    with or without the checkpoint's outer prefix, whose ``sum``/``exp_avg_sq`` has the table's shape) or
    a fused ``EmbeddingBagCollection``'s optimizer (the name within the collection, ``t_0.weight``, whose
    ``momentum_2``, else ``momentum_1``, has the table's shape or one value a row: row-wise Adagrad's mean
    square, returned as ``rows x 1`` times the dim, the row's sum).  An accumulator with a negative value is
    no sum of squares (SGD's momentum) and pairs with nothing."""
    out = {}
    for key in table_keys:
        names = [n for n in (key, prefix + key, "model." + key, "module." + key) if isinstance(per_param.get(n), dict)]
        if not names:  # a fused collection's own names: the end of one table key only
            ends = [n for n in per_param if isinstance(n, str) and key.endswith("." + n)]
            names = ends if len(ends) == 1 and sum(k.endswith("." + ends[0]) for k in table_keys) == 1 else []
        if not names:
            continue
        entry = per_param[names[0]]
        acc = next((entry[a] for a in ACCUMULATORS if isinstance(entry.get(a), torch.Tensor)), None)
        if acc is None:
            acc = next((v for a in FUSED_ACCUMULATORS for k, v in entry.items()
                        if isinstance(v, torch.Tensor) and (k == a or str(k).endswith("." + a))), None)
        if acc is None or bool((acc < 0).any()):
            continue
        rows, dim = state[key].shape
        if tuple(acc.shape) == (rows, dim):
            out[key] = acc
        elif tuple(acc.shape) == (rows,):
            out[key] = acc.reshape(rows, 1) * dim
    return out


def optimizer_accumulators(opt_state: dict, state: Dict[str, torch.Tensor], table_keys) -> Dict[str, torch.Tensor]:
    """The accumulator of each table in a ``torch.optim`` state_dict saved beside the model.

    ``param_groups[*]["params"]`` number the parameters in the model's order, which is its state_dict's
    order when the state_dict holds parameters only (facebookresearch/dlrm's DLRM_Net, ours); anything
    else (buffers, a count or a shape that does not match) gives nothing rather than a wrong pairing."""
    try:
        ids = [i for g in opt_state.get("param_groups", []) for i in g["params"]]
        per_param = opt_state.get("state", {})
    except (TypeError, KeyError, AttributeError):
        return {}
    keys = list(state)
    if len(ids) != len(keys):
        return {}
    out = {}
    for key, i in zip(keys, ids):
        if key not in table_keys:
            continue
        entry = per_param.get(i, {}) if isinstance(per_param, dict) else {}
        acc = next((entry[a] for a in ACCUMULATORS if isinstance(entry.get(a), torch.Tensor)), None)
        if acc is None or tuple(acc.shape) != tuple(state[key].shape):
            return {}
        out[key] = acc
    return out
