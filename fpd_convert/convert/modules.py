"""Your own model with TT tables: its ``nn.Embedding`` / ``nn.EmbeddingBag`` modules swapped for TT layers.

- :func:`load_into` puts a compressed file's tables and tensors into a model you built (the file's keys are
  the model's: ``user_emb.weight`` is ``model.user_emb``);
- :func:`compress_module` compresses a live model's largest embedding modules in memory, by the steps and
  options of ``fpd_convert.compress``;
- :func:`save` writes such a model (fine-tuned, say) back as a compressed file.

Either way each TT layer keeps the replaced module's options (``mode``, ``padding_idx``,
``include_last_offset``), device, dtype and train/eval mode, and the model's ``forward`` stays yours:
``torch.compile``, ``torch.export`` and, within ``fpd_convert.portable``, ONNX and AOTInductor trace it.
(TorchRec collections: :func:`fpd_convert.torchrec.compress_module`.)
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from torch import nn

from .. import __version__
from ..checkpoints import (CheckpointError, CompressedMeta, TableTensors, is_compressed, read_compressed, split_tables,
                           write_compressed)
from ..layers import TTEmbedding, TTEmbeddingBag
from ..outputs import check_output, releases_outputs
from ..tt import TTShape
from ..tt.core_quant import element_bytes
from .compress import CompressionSummary, compress_tables
from .importance import FidelityOptions
from .load import _module_path, compressed_state_from_model

_TABLES = (nn.Embedding, nn.EmbeddingBag, TTEmbedding, TTEmbeddingBag)


def _replace(model: nn.Module, name: str, shape: TTShape, table: TableTensors, where: str, entry: dict) -> None:
    """``model.<name>`` (an embedding module of ``shape``'s size) replaced by a TT layer holding ``table``, which
    keeps the table's file ``entry`` (how :func:`save` encodes it again)."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{where}: the model has no module {name!r} for the table {name}.weight") from None
    if not isinstance(old, _TABLES):
        raise CheckpointError(f"{where}: table {name}.weight is a {type(old).__name__} in the model, not an "
                              "nn.Embedding or nn.EmbeddingBag")
    if (old.num_embeddings, old.embedding_dim) != (shape.num_rows, shape.dim):
        raise CheckpointError(f"{where}: table {name}.weight is {shape.num_rows:,} x {shape.dim} in the file but "
                              f"{old.num_embeddings:,} x {old.embedding_dim} in the model")
    if getattr(old, "max_norm", None) is not None:
        raise CheckpointError(f"{where}: {name} has max_norm, which renormalizes stored rows in place; a TT table "
                              "cannot: build the model with max_norm=None")
    options = dict(rank=shape.ranks, row_factors=shape.row_factors, dim_factors=shape.dim_factors,
                   padding_idx=old.padding_idx, _cores=table.cores)
    bag = isinstance(old, (nn.EmbeddingBag, TTEmbeddingBag))
    if bag:
        options.update(mode=old.mode, include_last_offset=old.include_last_offset)
    weight = next(iter(old.parameters()))
    new = (TTEmbeddingBag if bag else TTEmbedding)(shape.num_rows, shape.dim, **options).train(old.training)
    new.load_table(table)
    new._fpd_entry = dict(entry)
    parent, _, child = name.rpartition(".")  # the module's device (the CPU for meta) and dtype (bf16 stays bf16)
    device = "cpu" if weight.is_meta else weight.device
    setattr(model.get_submodule(parent) if parent else model, child, new.to(device, weight.dtype))


def load_into(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Your own model, given a compressed file's tables and tensors: each ``nn.EmbeddingBag`` / ``nn.Embedding``
    whose weight the file holds as a TT table becomes a :class:`TTEmbeddingBag` / :class:`TTEmbedding` (see
    the module's docstring); every other tensor of the file is loaded into the model (keys saved through a
    ``DistributedDataParallel`` or ``torch.compile`` wrapper, ``module.`` / ``_orig_mod.``, or as the model
    part of a torch.distributed.checkpoint app state, ``{"model": model.state_dict()}``: ``model.``, fit the
    bare model).  The model is changed in place and returned.  For a compressed generic state_dict (``fpd-convert compress my_model.pt``), a
    facebookresearch/dlrm file into that repository's ``DLRM_Net``, or a TorchRec state_dict's into your
    TorchRec model (one process; DistributedModelParallel takes :func:`fpd_convert.torchrec.load`'s).
    Example::

        model = fpd_convert.load_into(MyModel(), "my_model.tt.safetensors")
    """
    path = Path(path)
    if not (path.suffix == ".safetensors" and is_compressed(path)):
        raise CheckpointError(f"{path}: load_into takes a compressed file written by `fpd-convert compress` or "
                              "`finetune`; this is not one")
    tensors, meta = read_compressed(path)
    tables, others = split_tables(tensors, meta)
    # saved from a DistributedDataParallel / torch.compile wrapper, or a DCP app state's model part
    for wrapper in ("module.", "_orig_mod.", "model."):
        keys = [*tables, *others]
        if keys and all(k.startswith(wrapper) for k in keys) and not hasattr(model, wrapper[:-1]):
            tables = {k[len(wrapper):]: v for k, v in tables.items()}
            others = {k[len(wrapper):]: v for k, v in others.items()}
            meta.tt_tables = {k[len(wrapper):]: v for k, v in meta.tt_tables.items()}
    for key, table in tables.items():
        _replace(model, _module_path(key), meta.tt_shape(key), table, str(path), meta.tt_tables[key])
    made = [_module_path(k) for k in tables]
    meta_model = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    if meta_model:  # the file's tensors become the model's, in the model's floating dtype
        own = model.state_dict(keep_vars=True)
        others = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() and own[k].is_floating_point()
                  else v for k, v in others.items()}
    missing, unexpected = model.load_state_dict(others, strict=False, assign=meta_model)
    missing = [k for k in missing if not any(k.startswith(m + ".") for m in made)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: the file's tensors do not fit the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: the model was built on the meta device and the file does not hold "
                              f"{left[:5]} (buffers not in a state_dict, persistent=False): set them after "
                              "load_into, or build the model on the CPU")
    return model


def compress_module(module: nn.Module, tables: Optional[Sequence[str]] = None, min_rows: Optional[int] = None,
                    num_largest: int = 5, rank=None, ratio: Optional[float] = None, budget=None,
                    tol: Optional[float] = None, importance: str = "auto", hot_rows: float = 0.02,
                    exact_rows: Optional[float] = None, core_dtype: str = "float32", exact_dtype: str = "float32",
                    counts: Optional[Dict[str, np.ndarray]] = None, seed: int = 0, progress: bool = False,
                    inplace: bool = False, **options) -> Tuple[nn.Module, CompressionSummary]:
    """``module`` with its chosen ``nn.Embedding`` / ``nn.EmbeddingBag`` modules as TT layers (see the module's
    docstring), chosen and compressed as ``fpd_convert.compress`` does a file's tables: ``tables`` by module
    name (``"user_emb"``) or weight key, else ``min_rows`` or the ``num_largest`` largest; one of ``rank``,
    ``ratio``, ``budget``, ``tol``; row importance from ``counts`` (module name -> lookup count per row), else
    the rows' norms (``importance``); ``options`` passes the others (``order``, ``dim_factors``, ...).
    Returns ``(model, summary)``; the model is a copy unless ``inplace``.  Example::

        model, summary = fpd_convert.compress_module(MyModel(), ratio=20)
    """
    model = module if inplace else copy.deepcopy(module)
    found = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    if not found:
        raise ValueError(f"{type(module).__name__} holds no nn.Embedding or nn.EmbeddingBag to compress")
    specs = [{"name": name, "key": f"{name}.weight", "rows": m.num_embeddings, "dim": m.embedding_dim,
              "kind": "dense"} for name, m in found.items()]
    state = {f"{name}.weight": m.weight.detach() for name, m in found.items()}
    counts_of = None
    if counts is not None:
        counts_of = lambda chosen: {t["key"]: counts[t["name"]] for t in chosen if t["name"] in counts}  # noqa: E731
    done = compress_tables(specs, state, False, tables=tables, min_rows=min_rows, num_largest=num_largest,
                           rank=rank, ratio=ratio, budget=budget, tol=tol, seed=seed, progress=progress,
                           fidelity=FidelityOptions(importance, hot_rows, exact_rows, core_dtype, exact_dtype),
                           counts_of=counts_of, source=type(module).__name__, **options)
    for t, res in done.compressed:
        _replace(model, t["name"], res.shape, res.table, type(module).__name__, res.entry_for_file)
    return model, CompressionSummary("", "", "module", done.summaries, done.skipped)


def table_entry(layer: nn.Module, core_dtype: Optional[str] = None) -> dict:
    """A TT layer's file entry: the one of the file or compression it came from (its ``core_dtype``, its
    errors as measured then), else its shape with float32 cores; ``core_dtype`` replaces the cores' dtype."""
    entry = getattr(layer, "_fpd_entry", None)
    if entry is None:
        entry = layer.tt_shape.to_dict()
        features = ((["row_map"] if layer.row_map is not None else []) +
                    (["exact_rows"] if layer.exact_ids is not None else []))
        entry.update(padding=layer.tt_shape.padded_rows - layer.num_embeddings, relative_error=float("nan"),
                     features=features, core_dtype="float32", exact_dtype="float32")
    entry = dict(entry, features=list(entry.get("features", [])))
    if core_dtype is not None:
        element_bytes(core_dtype)  # a dtype the format stores
        entry["core_dtype"] = core_dtype
        entry["features"] = [f for f in entry["features"] if f != "core_dtype"] + (
            ["core_dtype"] if core_dtype != "float32" else [])
    return entry


@releases_outputs
def save(model: nn.Module, output: Union[str, Path], force: bool = False, core_dtype: Optional[str] = None) -> Path:
    """Write your own model, holding TT layers (from :func:`load_into` or :func:`compress_module`, fine-tuned
    or not), as a compressed file of the generic layout: each TT layer as the table ``<module>.weight``,
    encoded as the file or compression it came from said (int8 cores are quantized again, as ``finetune``
    does; ``core_dtype="float32"`` keeps fine-tuned cores exactly), every other tensor of its state_dict as
    it is.  ``load_into(YourModel(), output)`` gives the model back; ``fpd-convert inspect``
    and ``decompress`` (a dense state_dict of your class) read the file.  Example::

        model = fpd_convert.load_into(MyModel(), "mine.tt.safetensors")
        train(model)
        fpd_convert.save(model, "mine.ft.safetensors")
    """
    output = check_output(output, [], force)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (TTEmbedding, TTEmbeddingBag))}
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no TT layer (TTEmbedding / TTEmbeddingBag); "
                         "fpd_convert.compress_module or load_into give it some")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tt_tables = {f"{name}.weight": table_entry(layer, core_dtype) for name, layer in layers.items()}
    prefixes = tuple(f"{name}." for name in layers)
    meta = CompressedMeta(source_layout="generic", tt_tables=tt_tables, source_container="state_dict",
                          source_name=type(model).__name__, tool_version=__version__,
                          state_keys=[k for k in state if not k.startswith(prefixes)] + list(tt_tables))
    write_compressed(output, compressed_state_from_model(state, meta), meta)
    return output
