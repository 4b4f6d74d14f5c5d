"""The whole TT layer on the GPU in one process: suffix path vs per-index kernels vs nn.EmbeddingBag,
and for inference the one-pass pooled kernel (no dedup) against the suffix path's dedup + gather.

Usage: python3 .ci/layer-ab.py [rows dim rank batch]; prints one JSON line of milliseconds per
training step (fwd+bwd) and per inference call (no gradients), median of 20 after 3 warm-ups.
LAYER_AB_QUICK=1: dense and the suffix path's training step only (for an A/B of a setting read
at import, e.g. FPD_TT_ATOMIC_SEM=acq_rel, run in a second process).
"""
import json
import os
import sys
import time

import torch

from fpd_convert.bench.lookups import zipf_ids
from fpd_convert.kernels import triton_entries, triton_suffix, triton_tt
from fpd_convert.layers import TTEmbeddingBag, tt_lookup

rows, dim, rank, batch = (int(a) for a in (sys.argv[1:] or [10_000_000, 128, 32, 65_536]))
device = "cuda" if torch.cuda.is_available() else "cpu"
ids = zipf_ids(rows, batch, 1.1, device, torch.Generator().manual_seed(0))
offsets = torch.arange(batch, device=device)
upstream = torch.randn(batch, dim, device=device)  # a dense gradient, not sum()'s expanded one


def median_ms(fn, reps=20):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2] * 1e3


def infer(layer):
    with torch.no_grad():
        layer(ids, offsets)


def train(layer):
    layer(ids, offsets).backward(upstream)
    for p in layer.parameters():
        p.grad = None


quick = os.environ.get("LAYER_AB_QUICK") == "1"
out = {"rows": rows, "dim": dim, "rank": rank, "batch": batch, "unique": torch.unique(ids).numel(),
       "atomic_sem": triton_tt.ATOMIC_SEM.value if triton_tt.available() else None}
dense = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, device=device)
out.update(dense_train_ms=median_ms(lambda: train(dense)))
if not quick:
    out.update(dense_infer_ms=median_ms(lambda: infer(dense)))
dense = None  # its 5 GB freed before the TT layer
bag = TTEmbeddingBag(rows, dim, rank=rank, mode="sum", device=device)
bag.kernel = "triton"
factor = triton_suffix.FACTOR
for name, f, cache in (("suffix", factor, 256 << 20), ("per_index", 0.0, 0))[:1 if quick else 2]:
    triton_suffix.FACTOR, bag.row_cache_bytes = f, cache
    tt_lookup.POOLED = "off"  # the dedup path (cached suffix table, then the gather)
    out[f"{name}_train_ms"] = median_ms(lambda: train(bag))
    if quick:
        print(json.dumps(out))
        sys.exit(0)
    out[f"{name}_infer_ms"] = median_ms(lambda: infer(bag))
triton_suffix.FACTOR, bag.row_cache_bytes, tt_lookup.POOLED = factor, 256 << 20, "auto"
try:  # training from sorted entries, no host sync (FPD_TT_SYNC_FREE=on), at two chunk sizes
    tt_lookup.SYNC_FREE = "on"
    for chunk in (8, 32):
        triton_entries.CHUNK = chunk
        out[f"syncfree{chunk}_train_ms"] = median_ms(lambda: train(bag))
except Exception as e:  # noqa: BLE001 - reported in the JSON, the other figures kept
    out["syncfree_error"] = f"{type(e).__name__}: {e}"[:2000]
finally:
    tt_lookup.SYNC_FREE, triton_entries.CHUNK = "off", 8
try:  # training without the dedup (one-hot bags): the suffix kernels on the batch's raw ids, duplicates
    # and all, with the range check's one sync; the backward adds per entry (3x the atomic adds)
    cores = list(bag.cores)

    def train_nodedup():
        torch.stack(torch.aminmax(ids)).tolist()
        triton_suffix.suffix_rows(cores, ids).backward(upstream)
        for p in bag.parameters():
            p.grad = None
    out["nodedup_train_ms"] = median_ms(train_nodedup)
except Exception as e:  # noqa: BLE001 - reported in the JSON, the other figures kept
    out["nodedup_error"] = f"{type(e).__name__}: {e}"[:2000]
try:  # one pass: no dedup, no gather
    out["pooled_infer_ms"] = median_ms(lambda: infer(bag))
    out["pooled_vs_dedup_infer"] = out["suffix_infer_ms"] / out["pooled_infer_ms"]
except Exception as e:  # noqa: BLE001 - reported in the JSON, the other figures kept
    out["pooled_error"] = f"{type(e).__name__}: {e}"[:2000]
print(json.dumps(out))
