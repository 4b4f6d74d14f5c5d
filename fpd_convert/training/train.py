"""``train``: a baseline DLRM in the facebookresearch/dlrm layout, saved as that code saves it."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..outputs import atomic_path, check_output, releases_outputs
from ..data import DEFAULT_TABLE_ROWS, NUM_DENSE, NUM_SPARSE, CriteoData, DataError, load_arrays
from ..devices import resolve_device
from ..models import DLRMNet
from .loop import fit
from .optim import make_optimizer


def dlrm_architecture(table_rows: Sequence[int], dim: int = 16, bottom: Sequence[int] = (64,),
                      top: Sequence[int] = (64, 32)) -> dict:
    """A facebookresearch/dlrm dot-interaction architecture (``--arch-mlp-bot 13-64-dim``)."""
    f = len(table_rows) + 1
    return {"family": "dlrm", "variant": "dot", "interaction_itself": False,
            "bottom": [NUM_DENSE, *bottom, dim], "top": [dim + f * (f - 1) // 2, *top, 1],
            "ddp_bottom": False, "ddp_top": False, "weighted_pooling": False, "num_dense": NUM_DENSE,
            "embedding_dim": dim,
            "tables": [{"name": str(i), "key": f"emb_l.{i}.weight", "rows": int(n), "dim": dim, "kind": "dense"}
                       for i, n in enumerate(table_rows)]}


def init_dlrm(model: DLRMNet, seed: int) -> None:
    """dlrm_s_pytorch.py's init: tables U(-sqrt(1/n), sqrt(1/n)), MLPs N(0, sqrt(2/(in+out)))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.emb_l:
            n = t.weight.shape[0]
            t.weight.copy_((torch.rand(t.weight.shape, generator=g) * 2 - 1) * np.sqrt(1 / n))
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                fan_out, fan_in = m.weight.shape
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * np.sqrt(2 / (fan_in + fan_out)))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * np.sqrt(1 / fan_out))


def table_rows_of(path) -> Optional[list]:
    """Table sizes stored with the data (``counts`` in a dlrm .npz), else None."""
    if str(path).endswith(".npz"):
        counts = load_arrays(path)[3]
        return [int(c) for c in counts] if counts is not None else None
    return None


def _on_cpu(obj):
    """An optimizer's state with every tensor on the CPU (what a checkpoint file holds)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_on_cpu(v) for v in obj]
    return obj


@releases_outputs
def train(train_data, output, val_data=None, table_rows: Optional[Sequence[int]] = None, dim: int = 16,
          bottom=(64,), top=(64, 32), epochs: int = 1, batch_size: int = 512, lr: float = 0.05,
          optimizer: str = "adagrad", max_steps: Optional[int] = None, seed: int = 0, force: bool = False,
          progress: bool = True, workers: int = 0, strict: bool = False, dense_transform: str = "log",
          device: str = "cpu", log: Optional[Callable[[str], None]] = None) -> dict:
    """Train a baseline DLRM and write it like ``dlrm_s_pytorch.py --save-model`` does.

    The table sizes come from ``table_rows``, else the ``counts`` of a dlrm ``.npz``, else the sizes of
    :func:`fpd_convert.data.synth` (text ids are hashed modulo them); the result says which
    (``table_rows_from``) and ``log`` is told before the work starts."""
    output = Path(output)
    check_output(output, [train_data] + ([val_data] if val_data else []), force)
    if log is None:
        log = (lambda s: print(s, file=sys.stderr)) if progress else (lambda s: None)
    stored = None if table_rows else table_rows_of(train_data)
    rows = list(table_rows or stored or DEFAULT_TABLE_ROWS)
    source = ("--table-rows" if table_rows else f"the counts stored in {Path(train_data).name}" if stored else
              "the synth default sizes (give --table-rows for your data's)")
    if len(rows) != NUM_SPARSE or min(rows) < 1:
        raise DataError(f"the model needs {NUM_SPARSE} table sizes of at least 1 row each but got {rows}")
    train_set = CriteoData(train_data, rows, batch_size, dense_transform, strict)
    val_set = CriteoData(val_data, rows, 8192, dense_transform, strict) if val_data else None
    torch.manual_seed(seed)
    model = DLRMNet(dlrm_architecture(rows, dim, bottom, top))
    init_dlrm(model, seed)
    opt = make_optimizer(model, optimizer, lr)
    log(f"tables: {len(rows)} of {min(rows):,}-{max(rows):,} rows ({sum(rows):,} in all) from {source}"
        + ("; text ids are hashed modulo them" if train_set.format == "text" else ""))
    res = fit(model, train_set, val_set, opt, epochs=epochs, max_steps=max_steps, progress=progress, log=log,
              device=resolve_device(device))
    model.cpu().load_state_dict(res.best_state)
    m = res.best_metrics or {}
    ckpt = {"state_dict": model.state_dict(), "epoch": epochs - 1, "nepochs": epochs, "iter": res.steps,
            "nbatches": res.steps, "nbatches_test": 0, "train_loss": np.float32(0.0), "total_loss": 0.0,
            "test_acc": np.float64(0.0), "test_auc": np.float64(m.get("auc", float("nan"))),
            "opt_state_dict": _on_cpu(opt.state_dict())}
    with atomic_path(output) as tmp:
        torch.save(ckpt, tmp)
    return {"output": str(output), "steps": res.steps, "samples": res.samples, "seconds": res.seconds,
            "val": m, "table_rows": rows, "table_rows_from": source, "device": str(resolve_device(device))}
