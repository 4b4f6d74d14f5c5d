"""Device-side tuning run: times the Triton TT kernels' forward and backward for launch settings.

Usage: python3 .ci/kernel-sweep.py [rows dim rank batch]; prints one JSON line per setting.
"""
import json
import sys
import time

import torch

from fpd_convert.bench.lookups import zipf_ids
from fpd_convert.kernels import triton_tt
from fpd_convert.layers import TTEmbeddingBag

rows, dim, rank, batch = (int(a) for a in (sys.argv[1:] or [10_000_000, 128, 32, 65_536]))
bag = TTEmbeddingBag(rows, dim, rank=rank, mode="sum", device="cuda")
ids = zipf_ids(rows, batch, 1.1, "cuda", torch.Generator().manual_seed(0))
uniq = torch.unique(ids)
cores = list(bag.cores)


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


grad = torch.randn(uniq.numel(), dim, device="cuda")
print(json.dumps({"unique": uniq.numel(), "unique_ms": timed(lambda: torch.unique(ids, return_inverse=True))}))
for warps in (1, 2):
    triton_tt.FWD_WARPS = warps
    print(json.dumps({"fwd_warps": warps, "fwd_ms": timed(lambda: triton_tt.tt3_rows(cores, uniq))}))
triton_tt.FWD_WARPS = 1
for chunk in (4, 8, 16):
    for warps in (1, 2, 4):
        triton_tt.CHUNK, triton_tt.BWD_WARPS = chunk, warps
        out = triton_tt.tt3_rows(cores, uniq)
        ms = timed(lambda: torch.autograd.grad(out, cores, grad, retain_graph=True))
        print(json.dumps({"chunk": chunk, "bwd_warps": warps, "bwd_ms": ms}), flush=True)
triton_tt.CHUNK, triton_tt.BWD_WARPS = 8, 2
out = triton_tt.tt3_rows(cores, uniq)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        torch.autograd.grad(out, cores, grad, retain_graph=True)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
