"""The compressed model file: safetensors with documented metadata (docs/format.md).

Tensors: every parameter of the source under its own key, except compressed tables,
whose weight key ``K`` is replaced by ``K.tt_core.{j}`` (shape ``(r_{j-1}, n_j, d_j, r_j)``).
``__metadata__`` (str -> str): ``format`` = ``fpd-convert``, ``format_version``,
``tool_version``, ``source_layout``, ``source_container``, ``source_prefix``,
``source_sha256``, ``source_name``, ``architecture`` (JSON), ``tt_tables`` (JSON),
``extras`` (JSON), ``optimizer_param_groups`` (JSON), ``state_keys`` (JSON: the source's
key order).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from ..paths import not_a_file
from ..tt import TTShape
from ..tt import core_quant
from ..outputs import atomic_path
from .safe_load import CheckpointError, looks_like
from .writers import Planned, write_safetensors

FORMAT_NAME = "fpd-convert"
FORMAT_VERSION = 1
# Per-table features a reader must understand to use the table (docs/format.md).
KNOWN_TABLE_FEATURES: frozenset = frozenset({"row_map", "exact_rows", "core_dtype"})


@dataclass
class CompressedMeta:
    """Everything in ``__metadata__``; ``tt_tables`` maps weight key -> table entry
    (``TTShape`` fields + ``padding``, ``relative_error``, ``features``)."""

    source_layout: str
    tt_tables: Dict[str, dict]
    architecture: Optional[dict] = None
    source_container: str = "state_dict"
    source_prefix: str = ""
    source_sha256: str = ""
    source_name: str = ""
    tool_version: str = ""
    extras: dict = field(default_factory=dict)
    optimizer_param_groups: Optional[list] = None
    state_keys: List[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def tt_shape(self, key: str) -> TTShape:
        return TTShape.from_dict(self.tt_tables[key])

    def to_strings(self) -> Dict[str, str]:
        return {"format": FORMAT_NAME, "format_version": str(self.format_version),
                "tool_version": self.tool_version, "source_layout": self.source_layout,
                "source_container": self.source_container, "source_prefix": self.source_prefix,
                "source_sha256": self.source_sha256, "source_name": self.source_name,
                "architecture": json.dumps(self.architecture), "tt_tables": json.dumps(self.tt_tables),
                "extras": json.dumps(self.extras), "optimizer_param_groups": json.dumps(self.optimizer_param_groups),
                "state_keys": json.dumps(self.state_keys)}

    @classmethod
    def from_strings(cls, path, m: Optional[Dict[str, str]]) -> "CompressedMeta":
        if not m or m.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{path}: not an fpd-convert compressed file (no '{FORMAT_NAME}' format in its "
                                  "metadata); to read it as a source model use it as the input of compress/inspect")
        try:
            version = int(m.get("format_version", ""))
        except ValueError:
            raise CheckpointError(f"{path}: bad format_version {m.get('format_version')!r}") from None
        if version > FORMAT_VERSION or version < 1:
            raise CheckpointError(f"{path}: format version {version} is not supported by this fpd-convert "
                                  f"(it reads versions 1..{FORMAT_VERSION}); upgrade fpd-convert")
        try:
            tables = json.loads(m["tt_tables"])
            meta = cls(source_layout=m["source_layout"], tt_tables=tables,
                       architecture=json.loads(m.get("architecture", "null")),
                       source_container=m.get("source_container", "state_dict"),
                       source_prefix=m.get("source_prefix", ""), source_sha256=m.get("source_sha256", ""),
                       source_name=m.get("source_name", ""), tool_version=m.get("tool_version", ""),
                       extras=json.loads(m.get("extras", "{}")),
                       optimizer_param_groups=json.loads(m.get("optimizer_param_groups", "null")),
                       state_keys=json.loads(m.get("state_keys", "[]")),
                       format_version=version)
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: damaged fpd-convert metadata ({type(e).__name__}: {e})") from None
        for key, entry in tables.items():
            unknown = set(entry.get("features", [])) - KNOWN_TABLE_FEATURES
            if unknown:
                raise CheckpointError(f"{path}: table {key} uses {sorted(unknown)}, which this fpd-convert does not "
                                      "know; upgrade fpd-convert")
        return meta


def core_key(table_key: str, j: int) -> str:
    return f"{table_key}.tt_core.{j}"


def write_compressed(path: os.PathLike, tensors: Dict[str, torch.Tensor], meta: CompressedMeta,
                     mapped_source: bool = False) -> None:
    """Write atomically (a temp file beside ``path`` renamed over it on success); the same tensors and
    metadata give the same bytes.  ``mapped_source``: the tensors that lie in a file mapping are a source's,
    never written, and their pages are dropped once written (a big model's kept tables do not pile up in
    the process's resident memory)."""
    with atomic_path(path) as tmp:
        write_safetensors(tmp, [Planned.of(k, v, release=mapped_source) for k, v in tensors.items()],
                          meta.to_strings())


def read_compressed_meta(path: os.PathLike) -> CompressedMeta:
    """Only the metadata (no tensor is read)."""
    path = Path(path)
    if (reason := not_a_file(path)):
        raise CheckpointError(f"{path}: {reason}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return CompressedMeta.from_strings(path, f.metadata())
    except SafetensorError as e:
        kind = looks_like(path)
        hint = (f"; it looks like {kind}, not a compressed .safetensors file as `fpd-convert compress` writes"
                if kind else "")
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}){hint}") from None


def read_compressed(path: os.PathLike) -> Tuple[Dict[str, torch.Tensor], CompressedMeta]:
    """Tensors and validated metadata: core shapes are checked against the TT tables, every tensor the
    source had (``state_keys``) must be there, and every floating tensor must be finite."""
    meta = read_compressed_meta(path)
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: damaged tensor data ({e})") from None
    for key, entry in meta.tt_tables.items():
        for fk in table_file_keys(key, entry):
            if fk not in tensors:
                raise CheckpointError(f"{path}: table {key} lacks its tensor {fk}")
        shapes = meta.tt_shape(key).core_shapes
        for j, s in enumerate(shapes):
            ck = core_key(key, j)
            if ck not in tensors:
                raise CheckpointError(f"{path}: missing TT core {ck}")
            if tuple(tensors[ck].shape) != tuple(s):
                raise CheckpointError(f"{path}: TT core {ck} has shape {tuple(tensors[ck].shape)}, metadata says {s}")
    missing = [k for k in meta.state_keys if k not in meta.tt_tables and k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: the file lacks {len(missing)} tensor(s) of its source model, e.g. {missing[0]}; "
                              "it is damaged or was edited")
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {key} holds {bad:,} NaN or infinite value(s); a model with them "
                                  "gives NaN scores (was it fine-tuned with a learning rate that diverged?)")
    return tensors, meta


def file_tensor_bytes(path: os.PathLike) -> Dict[str, int]:
    """Bytes of every tensor in a safetensors file, from its header (no tensor is read)."""
    from .lazy_tables import safetensors_header
    _, header = safetensors_header(path)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def is_compressed(path: os.PathLike) -> bool:
    """True for a safetensors file with fpd-convert metadata (any version)."""
    if not Path(path).is_file():  # a FIFO would block the read
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT_NAME
    except Exception:
        return False


@dataclass
class TableTensors:
    """One compressed table, decoded to what a layer computes with (float32 cores and rows)."""

    cores: List[torch.Tensor]
    row_map: Optional[torch.Tensor] = None  # int64 (H,): table rows at TT rows 0..H-1
    exact_ids: Optional[torch.Tensor] = None  # int64 (E,), sorted
    exact_rows: Optional[torch.Tensor] = None  # float32 (E, d)


def table_file_keys(key: str, entry: dict) -> List[str]:
    """Every tensor key the file holds for table ``key``."""
    k = len(entry["row_factors"])
    keys = [core_key(key, j) for j in range(k)]
    if entry.get("core_dtype", "float32") == "int8":
        keys += [f"{key}.tt_scale.{j}" for j in range(k)]
    if "row_map" in entry.get("features", []):
        keys.append(f"{key}.row_map")
    if "exact_rows" in entry.get("features", []):
        keys += [f"{key}.exact_rows.ids", f"{key}.exact_rows.values"]
        if entry.get("exact_dtype", "float32") == "int8":
            keys.append(f"{key}.exact_rows.scales")
    return keys


def encode_table(key: str, entry: dict, table: TableTensors) -> Dict[str, torch.Tensor]:
    """File tensors of a table, in the dtypes its entry names (``core_dtype``, ``exact_dtype``)."""
    out = {}
    core_dtype = entry.get("core_dtype", "float32")
    for j, c in enumerate(table.cores):
        stored, scales = core_quant.encode(c, core_dtype, axis=1)
        out[core_key(key, j)] = stored
        if scales is not None:
            out[f"{key}.tt_scale.{j}"] = scales
    if table.row_map is not None:
        out[f"{key}.row_map"] = table.row_map.to(torch.int32).contiguous()
    if table.exact_ids is not None:
        out[f"{key}.exact_rows.ids"] = table.exact_ids.to(torch.int32).contiguous()
        stored, scales = core_quant.encode(table.exact_rows, entry.get("exact_dtype", "float32"), axis=0)
        out[f"{key}.exact_rows.values"] = stored
        if scales is not None:
            out[f"{key}.exact_rows.scales"] = scales
    return out


def decode_table(key: str, entry: dict, tensors: Dict[str, torch.Tensor]) -> TableTensors:
    k = len(entry["row_factors"])
    cores = [core_quant.decode(tensors[core_key(key, j)], tensors.get(f"{key}.tt_scale.{j}"), axis=1)
             for j in range(k)]
    out = TableTensors(cores)
    if f"{key}.row_map" in tensors:
        out.row_map = tensors[f"{key}.row_map"].long()
    if f"{key}.exact_rows.ids" in tensors:
        out.exact_ids = tensors[f"{key}.exact_rows.ids"].long()
        out.exact_rows = core_quant.decode(tensors[f"{key}.exact_rows.values"],
                                           tensors.get(f"{key}.exact_rows.scales"), axis=0)
    return out


def split_tables(tensors: Dict[str, torch.Tensor], meta: CompressedMeta) -> Tuple[Dict[str, TableTensors], Dict[str, torch.Tensor]]:
    """(decoded tables per weight key, every other tensor)."""
    tables = {k: decode_table(k, e, tensors) for k, e in meta.tt_tables.items()}
    table_keys = {fk for k, e in meta.tt_tables.items() for fk in table_file_keys(k, e)}
    return tables, {k: v for k, v in tensors.items() if k not in table_keys}
