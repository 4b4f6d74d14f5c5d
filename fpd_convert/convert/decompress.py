"""``decompress``: rebuild dense tables and write the checkpoint in its source layout."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from ..checkpoints import read_compressed, split_tables
from ..outputs import atomic_path, check_output, releases_outputs
from ..layers import TTEmbeddingBag


@releases_outputs
def decompress(compressed: Union[str, Path], output: Union[str, Path], force: bool = False) -> dict:
    """Write ``output`` loadable by the source's own code.

    facebookresearch/dlrm checkpoints come back as a dict with ``state_dict``, the training
    scalars and ``opt_state_dict`` (param_groups only: optimizer moments were not kept);
    TorchRec and generic ``.pt`` files as a state_dict (with their ``model.``/``module.``
    prefix); ``.safetensors`` sources as safetensors.  Returns what was written.
    """
    compressed, output = Path(compressed), Path(output)
    check_output(output, [compressed], force)
    tensors, meta = read_compressed(compressed)
    tables, others = split_tables(tensors, meta)
    dense = {}
    for key, tt in tables.items():
        s = meta.tt_shape(key)
        table = TTEmbeddingBag(s.num_rows, s.dim, rank=s.ranks, row_factors=s.row_factors,
                               dim_factors=s.dim_factors, _cores=tt.cores)
        table.load_table(tt)
        dtype = getattr(torch, meta.tt_tables[key].get("source_dtype", "float32"), torch.float32)
        dense[key] = table.to_dense().to(dtype)
    merged = {**others, **dense}
    order = [k for k in meta.state_keys if k in merged] + [k for k in merged if k not in meta.state_keys]
    state = {meta.source_prefix + k: merged[k].contiguous() for k in order}
    with atomic_path(output) as tmp:
        if meta.source_container == "safetensors":
            from safetensors.torch import save_file
            save_file(state, str(tmp))
        elif meta.source_container == "dlrm_checkpoint":
            obj = {"state_dict": state, **meta.extras}
            if meta.optimizer_param_groups is not None:
                obj["opt_state_dict"] = {"state": {}, "param_groups": meta.optimizer_param_groups}
            torch.save(obj, tmp)
        else:
            torch.save(state, tmp)
    return {"output": str(output), "container": meta.source_container, "tables_rebuilt": sorted(dense),
            "tensors": len(state)}
