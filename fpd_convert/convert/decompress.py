"""``decompress``: rebuild dense tables and write the checkpoint in its source layout."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..checkpoints import read_compressed, read_compressed_meta, split_tables
from ..checkpoints.writers import Planned, write_safetensors, write_torch
from ..default_outputs import dense_output
from ..outputs import atomic_path, check_output, releases_outputs
from ..layers import TTEmbeddingBag


@releases_outputs
def decompress(compressed: Union[str, Path], output: Union[str, Path, None] = None, force: bool = False,
               log: Optional[Callable[[str], None]] = None) -> dict:
    """Write ``output`` loadable by the source's own code, rebuilding and writing one table at a time
    (peak memory: the compressed file, one dense table and a chunk).

    facebookresearch/dlrm checkpoints come back as a dict with ``state_dict``, the training
    scalars and ``opt_state_dict`` (param_groups only: optimizer moments were not kept);
    TorchRec and generic ``.pt`` files as a state_dict (with their ``model.``/``module.``
    prefix); ``.safetensors`` sources as safetensors; a torch.distributed.checkpoint folder as a ``.pt``
    state_dict (``torch.distributed.checkpoint.format_utils.torch_save_to_dcp`` makes a folder of it).  ``output`` defaults to ``model.dense.pt`` beside
    ``model.tt.safetensors`` (``.dense.safetensors`` for a safetensors source).  ``log`` gets a line per
    table rebuilt (a big model takes minutes).  Returns what was written.
    """
    compressed = Path(compressed)
    if output is None:
        output = dense_output(compressed, read_compressed_meta(compressed).source_container)
    output = Path(output)
    check_output(output, [compressed], force)
    tensors, meta = read_compressed(compressed)
    tables, others = split_tables(tensors, meta)

    say = log or (lambda text: None)

    def rebuilt(key: str, k: int) -> Planned:
        s = meta.tt_shape(key)
        dtype = getattr(torch, meta.tt_tables[key].get("source_dtype", "float32"), torch.float32)

        def make() -> torch.Tensor:  # one table at a time, when the writer reaches it
            start = time.perf_counter()
            table = TTEmbeddingBag(s.num_rows, s.dim, rank=s.ranks, row_factors=s.row_factors,
                                   dim_factors=s.dim_factors, _cores=tables[key].cores)
            table.load_table(tables[key])
            with torch.no_grad():
                dense = table.to_dense(dtype=dtype)
            say(f"decompress: table {k}/{len(tables)} {key} ({s.num_rows:,} x {s.dim}) rebuilt in "
                f"{time.perf_counter() - start:.1f} s")
            return dense
        return Planned(meta.source_prefix + key, dtype, (s.num_rows, s.dim), make)

    planned = {k: Planned.of(meta.source_prefix + k, v, release=True) for k, v in others.items()}  # read-only mapped
    planned.update({key: rebuilt(key, k) for k, key in enumerate(tables, 1)})
    order = [k for k in meta.state_keys if k in planned] + [k for k in planned if k not in meta.state_keys]
    state = {meta.source_prefix + k: planned[k] for k in order}
    with atomic_path(output) as tmp:
        if meta.source_container == "safetensors":
            write_safetensors(tmp, list(state.values()))
        elif meta.source_container == "dlrm_checkpoint":
            obj = {"state_dict": state, **meta.extras}
            if meta.optimizer_param_groups is not None:
                obj["opt_state_dict"] = {"state": {}, "param_groups": meta.optimizer_param_groups}
            write_torch(tmp, obj)
        else:
            write_torch(tmp, state)
    written = meta.source_container if meta.source_container in ("safetensors", "dlrm_checkpoint") else "state_dict"
    return {"output": str(output), "container": written, "tables_rebuilt": sorted(tables),
            "tensors": len(state)}
