"""Device-side tuning run: times the TT row kernels forward and backward (the suffix-table
kernels against the per-index ones at three batch sizes, both per-index variants, the torch
paths), profiles the whole layer per path, and times the dedup.

Usage: python3 .ci/kernel-sweep.py [rows dim rank batch]; prints one JSON line per setting and
finally {"best": variant} (the variant with the lowest forward + backward time).
SWEEP_QUICK=1: only the suffix kernels' launch settings (ids per backward program, warps) at the
full batch, then the suffix kernels on long-first-core shapes (suffix_rows 512 and 2048).
"""
import os
import json
import sys
import time
import traceback

import torch

from fpd_convert.bench.lookups import zipf_ids
from fpd_convert.kernels import triton_tt
from fpd_convert.layers import TTEmbeddingBag

rows, dim, rank, batch = (int(a) for a in (sys.argv[1:] or [10_000_000, 128, 32, 65_536]))
# on the CPU (with TRITON_INTERPRET=1 and a small shape) it is a dry run of this script
device = "cuda" if torch.cuda.is_available() else "cpu"
bag = TTEmbeddingBag(rows, dim, rank=rank, mode="sum", device=device)
ids = zipf_ids(rows, batch, 1.1, device, torch.Generator().manual_seed(0))
uniq = torch.unique(ids)
cores = list(bag.cores)
grad = torch.randn(uniq.numel(), dim, device=device)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps * 1e3


quick = os.environ.get("SWEEP_QUICK") == "1"
print(json.dumps({"unique": uniq.numel(), "unique_ms": timed(lambda: torch.unique(ids, return_inverse=True))}))
if quick:
    from fpd_convert.kernels import triton_suffix
    from fpd_convert.tt import factor_rows
    best = None
    for chunk, fwd_warps, bwd_warps in ((1, 2, 2), (4, 2, 2), (16, 2, 2), (1, 2, 4), (4, 2, 4)):
        triton_suffix.CHUNK, triton_suffix.FWD_WARPS, triton_suffix.BWD_WARPS = chunk, fwd_warps, bwd_warps
        r = {"suffix_variant": "dot", "suffix_launch": [chunk, fwd_warps, bwd_warps]}
        try:
            r["fwd_ms"] = timed(lambda: triton_suffix.suffix_rows(cores, uniq))
            out = triton_suffix.suffix_rows(cores, uniq)
            r["bwd_ms"] = timed(lambda: torch.autograd.grad(out, cores, grad, retain_graph=True))
            if best is None or r["fwd_ms"] + r["bwd_ms"] < best[0]:
                best = (r["fwd_ms"] + r["bwd_ms"], chunk, fwd_warps, bwd_warps)
        except Exception as e:  # a failure of one setting must not stop the sweep
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(r), flush=True)
    if best:
        triton_suffix.CHUNK, triton_suffix.FWD_WARPS, triton_suffix.BWD_WARPS = best[1:]
    for suffix in (512, 2048):  # a long first core: S small, dS atomics shared by ~42 / ~10 ids a pair
        try:
            long_bag = TTEmbeddingBag(rows, dim, rank=rank, mode="sum", device=device,
                                      row_factors=factor_rows(rows, 3, suffix))
            lc = list(long_bag.cores)
            r = {"suffix_rows": suffix, "row_factors": long_bag.tt_shape.row_factors,
                 "fwd_ms": timed(lambda: triton_suffix.suffix_rows(lc, uniq))}
            out = triton_suffix.suffix_rows(lc, uniq)
            r["bwd_ms"] = timed(lambda: torch.autograd.grad(out, lc, grad, retain_graph=True))
        except Exception as e:
            r = {"suffix_rows": suffix, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(r), flush=True)
    print(json.dumps({"best": "dot", "suffix_variant": "dot",
                      "suffix_launch": ",".join(str(v) for v in best[1:]) if best else "1,2,2"}))
    sys.exit(0)
# inference alternative to the Triton forward: the cached end table + one weighted embedding_bag
try:
    from fpd_convert.kernels.cpu_tt import EndTable
    table = EndTable(max_bytes=1 << 30)
    with torch.no_grad():
        ms = timed(lambda: table.rows(cores, uniq))
    print(json.dumps({"end_table_fwd_ms": ms, "end_table_mb": table.nbytes_for(cores) / 1e6}), flush=True)
except Exception as e:  # a failure here must not stop the sweep
    print(json.dumps({"end_table_error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
# training alternative to the Triton kernels: the torch path (prefixes grouped by digit, batched GEMMs)
try:
    from fpd_convert.kernels.cpu_tt import tt_rows_shared
    fwd = timed(lambda: tt_rows_shared(cores, uniq))
    out = tt_rows_shared(cores, uniq)
    bwd = timed(lambda: torch.autograd.grad(out, cores, grad, retain_graph=True))
    print(json.dumps({"variant": "torch-grouped", "fwd_ms": fwd, "bwd_ms": bwd}), flush=True)
except Exception as e:
    print(json.dumps({"variant": "torch-grouped", "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
# the suffix-table kernels (training and cached inference) against the per-index ones, at several
# batch sizes: where they cross sets triton_suffix.FACTOR
from fpd_convert.kernels import triton_suffix  # noqa: E402
for b in (batch // 32, batch // 8, batch):
    try:
        u_ids = torch.unique(zipf_ids(rows, b, 1.1, device, torch.Generator().manual_seed(1)))
        g_u = torch.randn(u_ids.numel(), dim, device=device)
        r = {"suffix_batch": b, "unique": u_ids.numel(), "worthwhile": triton_suffix.worthwhile(cores, u_ids.numel())}
        for name, fn in (("suffix", triton_suffix.suffix_rows), ("per_index_dot", triton_tt.tt3_rows)):
            triton_tt.VARIANT = "dot"
            r[f"{name}_fwd_ms"] = timed(lambda: fn(cores, u_ids))
            out = fn(cores, u_ids)
            r[f"{name}_bwd_ms"] = timed(lambda: torch.autograd.grad(out, cores, g_u, retain_graph=True))
        cache = triton_suffix.SuffixCache(1 << 30)
        with torch.no_grad():
            r["suffix_cached_fwd_ms"] = timed(lambda: triton_suffix.suffix_rows(cores, u_ids, cache))
    except Exception as e:
        r = {"suffix_batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        traceback.print_exc()
    print(json.dumps(r), flush=True)
# launch settings of the suffix kernels at the full batch: ids per backward program, warps
suffix_best = None
u_ids = torch.unique(ids)
for variant, launches in (("fma", ((8, 1, 2), (1, 2, 2), (4, 1, 2))),
                          ("dot", ((8, 1, 2), (1, 1, 1), (1, 2, 2), (1, 4, 4), (4, 2, 2)))):
    triton_suffix.VARIANT = variant
    for chunk, fwd_warps, bwd_warps in launches:
        triton_suffix.CHUNK, triton_suffix.FWD_WARPS, triton_suffix.BWD_WARPS = chunk, fwd_warps, bwd_warps
        r = {"suffix_variant": variant, "suffix_launch": [chunk, fwd_warps, bwd_warps]}
        try:
            fwd = timed(lambda: triton_suffix.suffix_rows(cores, u_ids))
            out = triton_suffix.suffix_rows(cores, u_ids)
            bwd = timed(lambda: torch.autograd.grad(out, cores, grad, retain_graph=True))
            r.update(fwd_ms=fwd, bwd_ms=bwd)
            if suffix_best is None or fwd + bwd < suffix_best[0]:
                suffix_best = (fwd + bwd, variant, chunk, fwd_warps, bwd_warps)
        except Exception as e:  # a compile failure of one variant must not stop the sweep
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(r), flush=True)
if suffix_best:
    _, triton_suffix.VARIANT, triton_suffix.CHUNK, triton_suffix.FWD_WARPS, triton_suffix.BWD_WARPS = suffix_best
best = {}
for variant, settings in (("fma", [(8, 1, 2)]), ("dot", [(8, 1, 1), (8, 1, 2)])):
    triton_tt.VARIANT = variant
    for chunk, fwd_warps, warps in settings:
        triton_tt.CHUNK, triton_tt.FWD_WARPS = chunk, fwd_warps
        if variant == "dot":
            triton_tt.DOT_WARPS = warps
        else:
            triton_tt.BWD_WARPS = warps
        try:
            fwd = timed(lambda: triton_tt.tt3_rows(cores, uniq))
            out = triton_tt.tt3_rows(cores, uniq)
            bwd = timed(lambda: torch.autograd.grad(out, cores, grad, retain_graph=True))
            r = {"variant": variant, "chunk": chunk, "warps": warps, "fwd_ms": fwd, "bwd_ms": bwd}
            if fwd + bwd < best.get(variant, (1e9,))[0]:
                best[variant] = (fwd + bwd, chunk, warps)
        except Exception as e:  # a compile failure of one variant must not hide the other's numbers
            r = {"variant": variant, "chunk": chunk, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
        print(json.dumps(r), flush=True)
winner = min(best, key=lambda v: best[v][0]) if best else "fma"
if best:  # the profile below runs the winner with its best settings
    triton_tt.CHUNK = best[winner][1]
    if winner == "dot":
        triton_tt.DOT_WARPS = best[winner][2]
    else:
        triton_tt.BWD_WARPS = best[winner][2]


def profile(name, step, n=5):
    """Kernel-by-kernel time of ``n`` steps (after two untimed ones), top 15, into $OUT/profile.txt."""
    import os
    for _ in range(2):
        step()
    sync()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            step()
        sync()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "profile.txt"), "a") as f:
        f.write(f"== {name}, {n} steps of fwd+bwd, batch {batch}\n{table}\n")


try:  # where the whole layer's time goes (dedup, index check, rows, pooling, backward), per path
    triton_tt.VARIANT = winner
    offsets = torch.arange(batch, device=device)
    upstream = torch.randn(batch, dim, device=device)  # a dense gradient, not sum()'s expanded one
    for kernel in ("triton", "cpu"):
        bag.kernel = kernel
        profile(f"TTEmbeddingBag kernel={kernel}", lambda: bag(ids, offsets).backward(upstream))
    dense = torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, device=device)
    profile("nn.EmbeddingBag sparse", lambda: dense(ids, offsets).backward(upstream))
except Exception as e:
    print(json.dumps({"profile_error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
for dtype in (torch.int64, torch.int32):  # dedup: the layer's torch.unique on the batch's ids
    x = ids.to(dtype)
    print(json.dumps({"unique_dtype": str(dtype), "ms": timed(lambda: torch.unique(x, return_inverse=True)),
                      "sort_ms": timed(lambda: torch.sort(x))}), flush=True)
print(json.dumps({"best": winner, "settings": best,
                  "suffix_variant": suffix_best[1] if suffix_best else "fma",
                  "suffix_launch": ",".join(str(v) for v in suffix_best[2:]) if suffix_best else "8,1,2"}))
