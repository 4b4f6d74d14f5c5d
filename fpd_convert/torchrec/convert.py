"""Compressing a live TorchRec model, and loading a compressed file as a TorchRec model.

- :func:`compress_module` takes a TorchRec model (``DLRM``, ``DLRM_DCN``, ``DLRM_Projection``, any module
  holding ``EmbeddingBagCollection`` s or ``EmbeddingCollection`` s) or a collection, and returns it with its
  largest tables in TT: each EBC becomes a :class:`~fpd_convert.torchrec.collection.TTEmbeddingBagCollection`,
  each EC a :class:`~fpd_convert.torchrec.unpooled.TTEmbeddingCollection`, by the steps and options of
  ``fpd_convert.compress``; :func:`tt_collections` does the same for collections that already hold TT layers.
- :func:`save` writes such a model in the compressed format (its table configs included), and
  :func:`load` reads a compressed file of the TorchRec layout back as a real
  ``torchrec.models.dlrm.DLRM`` / ``DLRM_DCN`` / ``DLRM_Projection``.
- :func:`to_kjt` turns a batch's (B, F) one-id-per-feature tensor into the ``KeyedJaggedTensor`` those
  models take.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..checkpoints import CompressedMeta, TableTensors, encode_table, read_compressed, split_tables, write_compressed
from ..convert.compress import CompressionSummary, compress_tables
from ..convert.importance import FidelityOptions
from ..convert.measure import layer_of
from ..convert.modules import table_entry
from ..convert.selection import select_tables
from ..layers import TTEmbedding, TTEmbeddingBag
from ..outputs import check_output, releases_outputs
from .collection import TTEmbeddingBagCollection, pooling_mode
from .unpooled import TTEmbeddingCollection


#: the TorchRec collections that compress: the attribute holding their tables, their configs' method
_KINDS = {EmbeddingBagCollection: ("embedding_bags", "embedding_bag_configs"),
          EmbeddingCollection: ("embeddings", "embedding_configs")}


def _collections(module: nn.Module) -> Dict[str, nn.Module]:
    """Every EmbeddingBagCollection and EmbeddingCollection in ``module`` by its path ("" for the module itself)."""
    return {name: m for name, m in module.named_modules() if type(m) in _KINDS}


def _tables_of(collection: nn.Module):
    attr, configs = _KINDS[type(collection)]
    return getattr(collection, attr), getattr(collection, configs)()


def _tt_layer(shape, table: TableTensors, config) -> nn.Module:
    """The TT layer of a config: pooled as the config says for an EBC's table, unpooled for an EC's."""
    if isinstance(config, EmbeddingBagConfig):
        layer = layer_of(shape, table)
        layer.mode, layer.include_last_offset = pooling_mode(config), True
    else:
        layer = layer_of(shape, table, TTEmbedding)
    return layer.requires_grad_(True)


def _with_tt(collection: nn.Module, tt: Dict[str, nn.Module]) -> nn.Module:
    """The TT collection standing for a TorchRec ``collection`` whose tables named in ``tt`` become those TT
    layers; its other tables, with their weights, stay in a real collection of their own (``.dense``)."""
    modules, configs = _tables_of(collection)
    dense_configs = [c for c in configs if c.name not in tt]
    dense = None
    if isinstance(collection, EmbeddingBagCollection):
        if dense_configs:
            dense = EmbeddingBagCollection(dense_configs, is_weighted=collection.is_weighted(), device=collection.device)
        new = TTEmbeddingBagCollection(configs, tt, is_weighted=collection.is_weighted(), dense=dense)
    else:
        if dense_configs:
            dense = EmbeddingCollection(dense_configs, device=collection.device,
                                        need_indices=collection.need_indices())
        new = TTEmbeddingCollection(configs, tt, need_indices=collection.need_indices(), dense=dense)
    if dense is not None:
        inner, _ = _tables_of(dense)
        with torch.no_grad():
            for c in dense_configs:
                inner[c.name].weight.copy_(modules[c.name].weight)
    return new


def _put(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    if not path:
        return new
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def compress_module(module: nn.Module, tables: Optional[Sequence[str]] = None, min_rows: Optional[int] = None,
                    num_largest: int = 5, rank=None, ratio: Optional[float] = None, budget=None,
                    tol: Optional[float] = None, importance: str = "auto", hot_rows: float = 0.02,
                    exact_rows: Optional[float] = None, core_dtype: str = "float32", exact_dtype: str = "float32",
                    counts: Optional[Dict[str, np.ndarray]] = None, data=None, data_rows: int = 1_000_000,
                    seed: int = 0, progress: bool = False, inplace: bool = False, **options):
    """``module`` (a TorchRec model, an EmbeddingBagCollection or an EmbeddingCollection) with the chosen
    tables of each of its collections in TT: an EBC becomes a :class:`TTEmbeddingBagCollection`, an EC (a
    sequence model's unpooled tables) a :class:`TTEmbeddingCollection`.

    The options are ``fpd_convert.compress``'s (one of ``rank``, ``ratio``, ``budget``, ``tol``; the
    importance options; ``options`` passes the others: ``order``, ``dim_factors``, ``suffix_rows``, ...),
    applied to each collection's tables (``num_largest``, ``min_rows`` select in each; ``tables`` names tables
    of any, a collection holding none of them stays as it is).  Row importance from data: ``counts`` (table
    name -> lookup count per row), or ``data`` (a Criteo file in any format the readers take, its 26
    categorical features feeding the tables in config order).  Returns ``(model, summary)`` (a list of summaries, one per collection, where
    the model has several); the model is a copy unless ``inplace``."""
    model = module if inplace else copy.deepcopy(module)
    found = _collections(model)
    if not found:
        raise ValueError(f"{type(module).__name__} holds no torchrec EmbeddingBagCollection or EmbeddingCollection "
                         "to compress (plain nn.Embedding / nn.EmbeddingBag modules: fpd_convert.compress_module)")
    fidelity = FidelityOptions(importance, hot_rows, exact_rows, core_dtype, exact_dtype)
    every = [c.name for m in found.values() for c in _tables_of(m)[1]]
    unknown = [str(t) for t in tables or () if str(t) not in every] if len(found) > 1 else []
    if unknown:
        raise ValueError(f"no table named {unknown[0]!r} in the collections of {type(module).__name__}; their "
                         f"tables: {', '.join(every[:12])}")
    summaries = []
    for path, collection in found.items():
        modules, configs = _tables_of(collection)
        specs = [{"name": c.name, "key": c.name, "rows": c.num_embeddings, "dim": c.embedding_dim, "kind": "dense"}
                 for c in configs]
        mine = tables
        if len(found) > 1:  # several collections: each compresses the named tables it holds, or what it selects
            mine = None if tables is None else [str(t) for t in tables if str(t) in {c.name for c in configs}]
            if mine == [] or not select_tables(specs, mine, min_rows, num_largest):
                continue
        state = {c.name: modules[c.name].weight.detach() for c in configs}
        counts_of = None
        if counts is not None:
            counts_of = lambda chosen, counts=counts: {t["key"]: counts[t["key"]] for t in chosen if t["key"] in counts}
        elif data is not None:
            from ..data.frequency import lookup_counts
            by_table = dict(zip([c.name for c in configs], lookup_counts(data, [c.num_embeddings for c in configs],
                                                                         max_rows=data_rows)))
            counts_of = lambda chosen, by_table=by_table: {t["key"]: by_table[t["key"]] for t in chosen}
        done = compress_tables(specs, state, False, tables=mine, min_rows=min_rows, num_largest=num_largest,
                               rank=rank, ratio=ratio, budget=budget, tol=tol, seed=seed, fidelity=fidelity,
                               counts_of=counts_of, progress=progress, source=path or type(module).__name__,
                               **options)
        by_name = {c.name: c for c in configs}
        new = _with_tt(collection, {t["name"]: _tt_layer(res.shape, res.table, by_name[t["name"]])
                                    for t, res in done.compressed})
        for t, res in done.compressed:
            new.tt_tables()[t["name"]]._fpd_entry = res.entry_for_file
        model = _put(model, path, new)
        summaries.append(CompressionSummary("", "", "torchrec", done.summaries, done.skipped))
    if not summaries:
        raise ValueError(f"no table matches the selection in the collections of {type(module).__name__}; their "
                         f"tables: {', '.join(every[:12])}")
    return model, summaries[0] if len(summaries) == 1 else summaries


def tt_collections(model: nn.Module) -> nn.Module:
    """``model`` with every TorchRec collection that holds TT layers (as ``fpd_convert.load_into`` or
    ``fpd_convert.compress_module`` leave them, inside TorchRec's own ``EmbeddingBagCollection`` /
    ``EmbeddingCollection``) turned into a :class:`TTEmbeddingBagCollection` / :class:`TTEmbeddingCollection`
    (its dense tables in a real collection, which DistributedModelParallel shards; the TT tables apart, which
    it replicates), in place.  The state_dict keys and the outputs stay the same."""
    for path, collection in _collections(model).items():
        modules, _ = _tables_of(collection)
        tt = {name: m for name, m in modules.items() if isinstance(m, (TTEmbedding, TTEmbeddingBag))}
        if tt:
            new = _with_tt(collection, tt)
            model = _put(model, path, new.train(collection.training))
    return model


def to_kjt(sparse: torch.Tensor, feature_names: Sequence[str], weights: Optional[torch.Tensor] = None
           ) -> KeyedJaggedTensor:
    """A (B, F) tensor of one id per sample and feature (Criteo-style) as a KeyedJaggedTensor."""
    b, f = sparse.shape
    if f != len(feature_names):
        raise ValueError(f"{f} sparse features but the model has {len(feature_names)}: {list(feature_names)}")
    return KeyedJaggedTensor.from_lengths_sync(keys=list(feature_names), values=sparse.t().reshape(-1),
                                               lengths=torch.ones(b * f, dtype=torch.int32, device=sparse.device),
                                               weights=None if weights is None else weights.t().reshape(-1))


# --- the compressed file of a TorchRec model --------------------------------------------------

def _configs_from(arch: dict) -> List[EmbeddingBagConfig]:
    out = []
    for t in arch["tables"]:
        pooling = PoolingType.MEAN if t.get("pooling", "sum") == "mean" else PoolingType.SUM
        out.append(EmbeddingBagConfig(name=t["name"], embedding_dim=t["dim"], num_embeddings=t["rows"],
                                      feature_names=list(t.get("feature_names") or [t["name"]]), pooling=pooling))
    return out


def _build(arch: dict, ebc) -> nn.Module:
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection
    variant, bottom, top = arch["variant"], arch["bottom"], arch["top"]
    common = dict(embedding_bag_collection=ebc, dense_in_features=bottom[0], dense_arch_layer_sizes=bottom[1:],
                  over_arch_layer_sizes=top[1:])
    if variant == "dcn":
        return DLRM_DCN(dcn_num_layers=arch["dcn"]["num_layers"], dcn_low_rank_dim=arch["dcn"]["low_rank"], **common)
    if variant == "projection":
        p = arch["projection"]
        return DLRM_Projection(interaction_branch1_layer_sizes=p["branch1"][1:],
                               interaction_branch2_layer_sizes=p["branch2"][1:], **common)
    return DLRM(**common)


def load(path: Union[str, Path]) -> nn.Module:
    """A compressed file of the TorchRec layout as a real ``torchrec.models.dlrm`` model (in eval mode)
    whose sparse arch holds a :class:`TTEmbeddingBagCollection`.  Its feature names are the tables' own
    where the file has none (a file compressed from a state_dict)."""
    tensors, meta = read_compressed(path)
    arch = meta.architecture
    if meta.source_layout != "torchrec" or arch is None or arch.get("family") != "torchrec":
        raise ValueError(f"{path}: a {meta.source_layout} file; torchrec=True loads files of TorchRec models "
                         "(use fpd_convert.load(path) for this one)")
    tables, others = split_tables(tensors, meta)
    configs = _configs_from(arch)
    by_key = {t["key"]: t["name"] for t in arch["tables"]}
    tt = {}
    for key, table in tables.items():
        config = next(c for c in configs if c.name == by_key[key])
        tt[config.name] = _tt_layer(meta.tt_shape(key), table, config)
    ebc = TTEmbeddingBagCollection(configs, tt, is_weighted=bool(arch.get("is_weighted", False)))
    model = _build(arch, ebc)
    state = {k: v for k, v in others.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not any(f".embedding_bags.{n}." in k for n in tt)]
    if missing or unexpected:
        raise ValueError(f"{path}: the tensors do not fit a TorchRec {arch['variant']} model (missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()


@releases_outputs
def save(model: nn.Module, output: Union[str, Path], force: bool = False) -> Path:
    """Write a TorchRec DLRM from :func:`compress_module` in the compressed format, with its table configs
    (feature names, pooling), so that ``load(output, torchrec=True)`` gives it back and the commands
    (``inspect``, ``finetune``, ``report``, ``export``) read it."""
    output = check_output(output, [], force)
    ebc = model.sparse_arch.embedding_bag_collection if hasattr(model, "sparse_arch") else None
    if not isinstance(ebc, TTEmbeddingBagCollection):
        raise ValueError("save takes a TorchRec DLRM whose sparse arch is a TTEmbeddingBagCollection "
                         "(from compress_module); your own model: fpd_convert.save(model, path), which "
                         "fpd_convert.load_into(YourModel(), path) reads")
    prefix = "sparse_arch.embedding_bag_collection.embedding_bags."
    state = {k: v for k, v in model.state_dict().items()}
    arch = architecture_of(model, ebc)
    tt_tables = {}
    for name, layer in ebc.tt_tables().items():
        key = f"{prefix}{name}.weight"
        entry = table_entry(layer)
        table = TableTensors([c.detach() for c in layer.cores], layer.row_map, layer.exact_ids,
                             None if layer.exact_rows is None else layer.exact_rows.detach())
        for k in [k for k in state if k.startswith(f"{prefix}{name}.")]:
            del state[k]
        state.update(encode_table(key, entry, table))
        tt_tables[key] = entry
    tt_prefixes = tuple(f"{prefix}{name}." for name in ebc.tt_tables())
    source_keys = [k for k in model.state_dict() if not k.startswith(tt_prefixes)] + list(tt_tables)
    meta = CompressedMeta(source_layout="torchrec", tt_tables=tt_tables, architecture=arch,
                          source_container="state_dict", source_name=type(model).__name__, state_keys=source_keys)
    write_compressed(output, state, meta)
    return output


def architecture_of(model: nn.Module, ebc: TTEmbeddingBagCollection) -> dict:
    """The file's ``architecture`` for a TorchRec DLRM (as the TorchRec layout reader infers it), with
    the EBC's configs: feature names and pooling per table."""
    from ..checkpoints.torchrec_layout import infer_torchrec_architecture
    state = {k: v for k, v in model.state_dict().items()}
    prefix = "sparse_arch.embedding_bag_collection.embedding_bags."
    for c in ebc.embedding_bag_configs():  # the reader wants every table as a weight: shapes only
        if c.name in ebc.tt_tables():
            state[f"{prefix}{c.name}.weight"] = torch.empty(c.num_embeddings, c.embedding_dim, device="meta")
    ordered = {f"{prefix}{c.name}.weight": state[f"{prefix}{c.name}.weight"] for c in ebc.embedding_bag_configs()}
    ordered.update({k: v for k, v in state.items() if not k.startswith(prefix)})
    arch = infer_torchrec_architecture(ordered, num_features=sum(len(c.feature_names)
                                                                 for c in ebc.embedding_bag_configs()))
    by_name = {c.name: c for c in ebc.embedding_bag_configs()}
    for t in arch["tables"]:
        c = by_name[t["name"]]
        t.update(feature_names=list(c.feature_names), pooling=pooling_mode(c))
    arch["is_weighted"] = ebc.is_weighted()
    return arch


def distribute(model: nn.Module, device: Optional[torch.device] = None, sharders=None, plan=None, env=None):
    """``DistributedModelParallel`` of a TorchRec model that holds TT tables: TorchRec's planner shards the
    tables kept dense (they are a real ``EmbeddingBagCollection`` / ``EmbeddingCollection``), and the TT
    tables, which no sharder claims, are replicated data-parallel with the MLPs.  A collection that holds TT
    layers inside TorchRec's own module (your model after ``fpd_convert.load_into``) is first made a TT
    collection (:func:`tt_collections`).  DMP initializes the tables it shards anew; the model's own weights
    are loaded back into it here.  Call it in every process of a ``torchrun`` group, after
    ``torch.distributed.init_process_group``.

    Example::

        torch.distributed.init_process_group("gloo")          # "nccl" on GPUs
        dmp = distribute(fpd_convert.torchrec.load("model.tt.safetensors").train())
        logits = dmp(dense, to_kjt(sparse, feature_names))
    """
    import torch.distributed as dist
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv
    model = tt_collections(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    device = device or next(model.parameters()).device
    dmp = DistributedModelParallel(model, device=device, plan=plan,
                                   env=env or ShardingEnv.from_process_group(dist.group.WORLD),
                                   sharders=sharders or [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()])
    dmp.load_state_dict(dict(state))
    return dmp
