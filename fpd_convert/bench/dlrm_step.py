"""Samples/s of a DLRM training step with dense tables and with TT tables, in one run.

Default model: the step of ../shared/BENCHMARKS.md — the 26 Criteo-Terabyte tables
(MLPerf DLRM v1 sizes) capped at ``rows_cap`` rows, d=128, bottom 13-512-256-128,
top 1024-1024-512-256-1, dot interaction, SGD, bf16 autocast on CUDA; the
``tt_tables`` largest tables in TT of rank ``rank``.  With ``model=`` a compressed
file's own model is loaded (its TT tables with their row maps and exact rows) and timed
against the same architecture with dense tables.  Dense tables train with sparse gradients, as
facebookresearch/dlrm does.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TTEmbeddingBag
from ..models import build_model
from ..tt import TTShape, choose_row_factors, clamp_ranks, factor_dims
from .lookups import zipf_ids
from ..devices import resolve_device
from .timing import device_name, median_seconds

# Criteo Terabyte (day 0-23) table sizes, as in the MLPerf DLRM v1 reference.
TERABYTE_ROWS = [39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10,
                 2208, 11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36]


def terabyte_architecture(rows_cap: int, dim: int = 128, bottom=(512, 256), top=(1024, 1024, 512, 256)) -> dict:
    rows = [min(n, rows_cap) for n in TERABYTE_ROWS]
    features = len(rows) + 1
    return {"family": "dlrm", "variant": "dot", "interaction_itself": False, "weighted_pooling": False,
            "bottom": [13, *bottom, dim], "top": [dim + features * (features - 1) // 2, *top, 1],
            "tables": [{"key": f"emb_l.{i}.weight", "rows": n, "dim": dim} for i, n in enumerate(rows)]}


def _largest(architecture: dict, count: int, rank: int, suffix_rows: Union[str, int, None] = "auto"):
    tables = sorted(architecture["tables"], key=lambda t: -t["rows"] * t["dim"])[:count]
    shapes = {}
    for t in tables:
        df = factor_dims(t["dim"], 3)
        rf = choose_row_factors(t["rows"], df, rank, suffix_rows)
        shapes[t["key"]] = TTShape(t["rows"], t["dim"], rf, df, clamp_ranks(rank, rf, df))
    return shapes


def _embedding_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.EmbeddingBag, nn.Embedding, TTEmbeddingBag)):
            total += sum(p.numel() * p.element_size() for p in m.parameters())
    return total


def _step_fn(model: nn.Module, architecture: dict, batch: int, zipf: float, device, lr: float, seed: int):
    for m in model.modules():
        if isinstance(m, nn.EmbeddingBag):
            m.sparse = True
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, 13, generator=g).to(device)
    sparse = torch.stack([zipf_ids(t["rows"], batch, zipf, device, g) for t in architecture["tables"]], 1)
    labels = (torch.rand(batch, generator=g) < 0.25).float().to(device)
    bf16 = device.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model.logits(dense, sparse).reshape(-1)
        F.binary_cross_entropy_with_logits(logits.float(), labels).backward()
        opt.step()
    return step


def _serve_fn(model: nn.Module, architecture: dict, batch: int, zipf: float, device, seed: int):
    """One inference batch: the forward pass alone, without gradients (what serving runs)."""
    model.to(device).eval()
    g = torch.Generator().manual_seed(seed + 1)
    dense = torch.rand(batch, 13, generator=g).to(device)
    sparse = torch.stack([zipf_ids(t["rows"], batch, zipf, device, g) for t in architecture["tables"]], 1)
    bf16 = device.type == "cuda"

    def serve():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model.logits(dense, sparse)
    return serve


def bench_dlrm_step(model: Optional[str] = None, rows_cap: Optional[int] = None, dim: int = 128,
                    tt_tables: int = 5, rank: int = 32, batch: Optional[int] = None, zipf: float = 1.1,
                    device: str = "auto", reps: int = 10, lr: float = 0.01, seed: int = 0,
                    suffix_rows: Union[str, int, None] = "auto") -> dict:
    """Samples/s of the training step, dense vs TT, and their ratio; the same for inference
    (forward alone, without gradients, after the training steps).  ``suffix_rows``: the TT
    tables' row factors (see :func:`fpd_convert.tt.choose_row_factors`; ``"auto"`` as ``compress``)."""
    dev = resolve_device(device)
    if batch is None:
        batch = 65_536 if dev.type == "cuda" else 2_048
    if model is not None:
        from ..checkpoints.compressed_format import read_compressed_meta
        meta = read_compressed_meta(model)
        if meta.architecture is None:
            raise ValueError(f"{model}: a generic compressed state_dict has no model to run a DLRM step on")
        architecture = meta.architecture
        shapes = {k: meta.tt_shape(k) for k in meta.tt_tables}
        what = f"{model} ({len(shapes)} TT tables from the file)"
    else:
        rows_cap = rows_cap or (10_000_000 if dev.type == "cuda" else 200_000)
        architecture = terabyte_architecture(rows_cap, dim)
        shapes = _largest(architecture, tt_tables, rank, suffix_rows)
        what = f"Criteo-Terabyte DLRM, tables capped at {rows_cap:,} rows, {tt_tables} largest in TT rank {rank}"
        what += ", row factors " + ", ".join(sorted({"x".join(map(str, s.row_factors)) for s in shapes.values()}))
    out = {"model": what, "batch": batch, "device": device_name(dev), "torch": torch.__version__,
           "tt_tables": len(shapes)}
    for name, tt in (("dense", None), ("tt", shapes)):
        if name == "tt" and model is not None:  # the file's own tables: cores, row maps, exact rows
            from ..convert.load import load
            net = load(model)
        else:
            with dev:  # allocate and initialize the tables on the device itself
                net = build_model(architecture, tt)
        out[f"{name}_embedding_bytes"] = _embedding_bytes(net)
        step = _step_fn(net, architecture, batch, zipf, dev, lr, seed)
        out[f"{name}_samples_s"] = batch / median_seconds(step, dev, reps)
        seconds = median_seconds(_serve_fn(net, architecture, batch, zipf, dev, seed), dev, reps)
        out[f"{name}_inference_samples_s"] = batch / seconds
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out["ratio"] = out["tt_samples_s"] / out["dense_samples_s"]
    out["inference_ratio"] = out["tt_inference_samples_s"] / out["dense_inference_samples_s"]
    return out


def format_dlrm_step(r: dict) -> str:
    return "\n".join([
        f"DLRM training step: {r['model']}, batch {r['batch']:,}, {r['device']}, torch {r['torch']}",
        f"dense tables  {r['dense_samples_s'] / 1e6:8.3f} M samples/s   embeddings {r['dense_embedding_bytes'] / 1e9:7.2f} GB",
        f"TT tables     {r['tt_samples_s'] / 1e6:8.3f} M samples/s   embeddings {r['tt_embedding_bytes'] / 1e9:7.2f} GB",
        f"ratio TT / dense: {r['ratio']:.3f}x"]
        + ([f"inference (forward only): dense {r['dense_inference_samples_s'] / 1e6:.3f}, TT "
            f"{r['tt_inference_samples_s'] / 1e6:.3f} M samples/s, ratio {r['inference_ratio']:.3f}x"]
           if "inference_ratio" in r else []))
