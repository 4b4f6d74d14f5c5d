"""Where a DLRM step waits on the host (GPU): for the dense model and the TT models (balanced and
long first core, with and without FPD_TT_SYNC_FREE, its tables stacked or one by one, or replayed
from CUDA graphs), the wall time of a step, the time the host
takes to queue it (steps queued back to back, no synchronize between them), and each host sync
the step makes (torch.cuda.set_sync_debug_mode, with the line of our code or the script that made it).

A step whose queueing time is close to its wall time is bound by the host (launches, Python,
syncs), not by the GPU's work.  Usage: python3 .ci/sync-probe.py [rows_cap tt_tables rank batch];
prints one JSON line per model and mode.  LAYER_PROFILE=1 also writes the TT layer's torch.profiler
table (ops by their own CPU time) to $OUT/layer_profile.txt.
"""
import collections
import json
import os
import sys
import time
import traceback
import warnings

import torch

from fpd_convert.bench.dlrm_step import _largest, _serve_fn, _step_fn, terabyte_architecture
from fpd_convert.bench.lookups import zipf_ids
from fpd_convert.layers import TTEmbeddingBag, tt_lookup
from fpd_convert.models import build_model

rows_cap, tt_tables, rank, batch = (int(a) for a in (sys.argv[1:] or [10_000_000, 5, 32, 65_536]))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a smoke test
arch = terabyte_architecture(rows_cap, 128)


def where(stack):
    """The innermost frame of ours (the package or this folder's scripts) that led to a sync."""
    for frame in reversed(stack):
        if "fpd_convert" in frame.filename or "/.ci/" in frame.filename:
            return f"{frame.filename.split('/')[-1]}:{frame.lineno} {frame.line}"
    return "elsewhere"


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def probe(name, fn, steps=10):
    for _ in range(3):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    queued = time.perf_counter() - t
    sync()
    wall = time.perf_counter() - t
    host = []
    for _ in range(5):  # one step queued on an idle GPU: the host's own time (and any waits in it)
        sync()
        t = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t)
    sync()
    syncs = collections.Counter()
    shown = warnings.showwarning

    def record(message, *args, **kwargs):
        syncs[f"{str(message)[:60]} @ {where(traceback.extract_stack()[:-1])}"] += 1
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(1)
            fn()
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    finally:
        warnings.showwarning = shown
    sync()
    print(json.dumps({"run": name, "wall_ms": wall / steps * 1e3, "queue_ms": queued / steps * 1e3,
                      "host_ms": sorted(host)[2] * 1e3,
                      "syncs_a_step": dict(syncs)}), flush=True)


# one table alone (10M x 128, rank 32, one-hot bags): the host's time against the wall time
ids = zipf_ids(rows_cap, batch, 1.1, device, torch.Generator().manual_seed(0))
offsets = torch.arange(batch, device=device)
upstream = torch.randn(batch, 128, device=device)  # a dense gradient, as a model's next layer gives


def fwd_bwd(layer):
    def run():
        layer(ids, offsets).backward(upstream)
        for p in layer.parameters():
            p.grad = None
    return run


layer = torch.nn.EmbeddingBag(rows_cap, 128, mode="sum", sparse=True, device=device)
probe("layer_dense_fwd_bwd", fwd_bwd(layer))
layer = TTEmbeddingBag(rows_cap, 128, rank=rank, mode="sum", device=device)
for mode in ("off", "on"):
    tt_lookup.SYNC_FREE = mode
    probe(f"layer_tt{'_syncfree' if mode == 'on' else ''}_fwd_bwd", fwd_bwd(layer))
    if device.type == "cuda" and os.environ.get("LAYER_PROFILE") == "1":  # the host's time by op: layer_profile.txt
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd_bwd(layer)()
            sync()
        with open(os.path.join(os.environ.get("OUT", "."), "layer_profile.txt"), "a") as f:
            f.write(f"== TT layer fwd+bwd, FPD_TT_SYNC_FREE={mode}, 3 calls\n")
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                              max_name_column_width=50) + "\n")
tt_lookup.SYNC_FREE = "off"
del layer

with device:
    models = {"dense": build_model(arch, None), "tt": build_model(arch, _largest(arch, tt_tables, rank)),
              "tt_suffix": build_model(arch, _largest(arch, tt_tables, rank, 512))}
for name, net in models.items():
    train, serve = _step_fn(net, arch, batch, 1.1, device, 0.01, 0), _serve_fn(net, arch, batch, 1.1, device, 0)
    for mode in (("off", "on", "unstacked", "graphs") if name != "dense" else ("off",)):
        tt_lookup.SYNC_FREE = "off" if mode == "off" else "on"
        tt_lookup.TABLE_BATCHED = "off" if mode == "unstacked" else "auto"  # sync-free: tables stacked or not
        tt_lookup.CUDA_GRAPHS = "on" if mode == "graphs" else "off"  # the stacked lookups replayed from graphs
        suffix = {"off": "", "on": "_syncfree", "unstacked": "_syncfree_unstacked", "graphs": "_syncfree_graphs"}[mode]
        try:
            probe(f"{name}{suffix}_train", train)
        except Exception as e:  # noqa: BLE001 - a failed capture must not cost the other figures
            print(json.dumps({"run": f"{name}{suffix}_train", "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
        if mode != "graphs":  # serving has no gradients: never graphed
            probe(f"{name}{suffix}_infer", serve)
    tt_lookup.SYNC_FREE, tt_lookup.TABLE_BATCHED, tt_lookup.CUDA_GRAPHS = "off", "auto", "off"
    models[name] = None
    del net, train, serve
    if device.type == "cuda":
        torch.cuda.empty_cache()
