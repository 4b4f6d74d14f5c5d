"""DLRM training step and inference on the GPU in one process: TT tables (balanced row factors) with
grouped lookups (one host sync a step for all TT tables, `fpd_convert.layers.grouped`) vs one lookup after the
other (one sync per TT table), and the dense model, in alternating blocks; the TT model also with
a long first core (row factors with `suffix_rows`, default 512: `factor_rows`) and a less long one
(`suffix_rows` 2048: a 4 MB suffix table, ~10 ids a digit pair instead of ~42); inference with
the bags pooled in one pass (the default) and through the dedup (`grouped_dedup`, FPD_TT_POOLED=off);
training from sorted entries with no host sync (`*_syncfree`, FPD_TT_SYNC_FREE=on), its TT tables
stacked into one lookup (the default there) or one by one (`*_unstacked`, FPD_TT_TABLE_BATCHED=off),
and the stacked lookup replayed from CUDA graphs (`*_graphs`, FPD_TT_CUDA_GRAPHS=on); with a long
first core the sync-free entries are sorted suffix-major (the default there: `dS` summed per digit
pair) or by id (`*_idorder`, FPD_TT_ENTRY_ORDER=id).

Usage: python3 .ci/step-ab.py [rows_cap tt_tables rank batch suffix_rows]; prints one JSON line of
milliseconds per step (median over blocks of 5 steps, after warm-up).  STEP_PROFILE=1 writes per-step profiles to $OUT/step_profile.txt.
"""
import json
import os
import sys
import time

import torch

import fpd_convert.models.dlrm as dlrm
from fpd_convert.bench.dlrm_step import _largest, _serve_fn, _step_fn, terabyte_architecture
from fpd_convert.models import build_model
from fpd_convert.kernels import triton_entries
from fpd_convert.layers import tt_lookup
from fpd_convert.models.parts import lookup

rows_cap, tt_tables, rank, batch, suffix_rows = (int(a) for a in (sys.argv[1:] or [10_000_000, 5, 32, 65_536, 512]))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
grouped_start = dlrm.start_lookups


class OneByOne:
    """The lookups as before grouping: each table's forward in turn (one sync per TT table)."""

    def __init__(self, tables, sparse, weights=None):
        self.args = (list(tables), sparse, weights)

    def results(self):
        tables, sparse, weights = self.args
        return [lookup(t, sparse, f, weights[f] if weights is not None else None) for f, t in enumerate(tables)]


def timed(fn, steps=5):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


arch = terabyte_architecture(rows_cap, 128)
out = {"rows_cap": rows_cap, "tt_tables": tt_tables, "rank": rank, "batch": batch, "device": str(device),
       "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
with device:
    models = {"dense": build_model(arch, None), "tt": build_model(arch, _largest(arch, tt_tables, rank, "balanced")),
              "tt_suffix": build_model(arch, _largest(arch, tt_tables, rank, suffix_rows)),
              "tt_suffix2048": build_model(arch, _largest(arch, tt_tables, rank, min(2048, rows_cap // 2)))}
out["suffix_row_factors"] = [t.row_factors for t in _largest(arch, tt_tables, rank, suffix_rows).values()]
out["suffix2048_row_factors"] = [t.row_factors for t in _largest(arch, tt_tables, rank, min(2048, rows_cap // 2)).values()]
fns = {}
for name, net in models.items():
    fns[f"{name}_train"] = _step_fn(net, arch, batch, 1.1, device, 0.01, 0)
    fns[f"{name}_infer"] = _serve_fn(net, arch, batch, 1.1, device, 0)
variants = {"dense": (grouped_start, "dense"), "grouped": (grouped_start, "tt"), "one_by_one": (OneByOne, "tt"),
            "grouped_suffix": (grouped_start, "tt_suffix"), "grouped_suffix2048": (grouped_start, "tt_suffix2048"),
            "grouped_dedup": (grouped_start, "tt"), "grouped_syncfree": (grouped_start, "tt"),
            "grouped_suffix_syncfree": (grouped_start, "tt_suffix"),
            "grouped_syncfree_unstacked": (grouped_start, "tt"),
            "grouped_suffix_syncfree_unstacked": (grouped_start, "tt_suffix"),
            "grouped_syncfree_graphs": (grouped_start, "tt"),
            "grouped_suffix_syncfree_graphs": (grouped_start, "tt_suffix"),
            "grouped_suffix_syncfree_idorder": (grouped_start, "tt_suffix"),
            "grouped_suffix_syncfree_graphs_idorder": (grouped_start, "tt_suffix")}
try:  # a failure of the one-pass kernel on this GPU must not cost the other figures
    fns["tt_infer"]()
    pooled = "auto"
except Exception as e:  # noqa: BLE001 - reported in the JSON
    out["pooled_error"], pooled = f"{type(e).__name__}: {e}"[:2000], "off"
    tt_lookup.POOLED = "off"
try:  # nor a failure of the sync-free training kernels
    tt_lookup.SYNC_FREE = "on"
    fns["tt_train"]()
except Exception as e:  # noqa: BLE001 - reported in the JSON
    out["syncfree_error"] = f"{type(e).__name__}: {e}"[:2000]
    for v in [v for v in variants if "_syncfree" in v]:
        del variants[v]
try:  # nor a failure to capture the stacked lookups in CUDA graphs (seen once, captured, replayed)
    tt_lookup.CUDA_GRAPHS = "on"
    for _ in range(3):
        fns["tt_train"]()
except Exception as e:  # noqa: BLE001 - reported in the JSON
    out["graphs_error"] = f"{type(e).__name__}: {e}"[:2000]
    for v in [v for v in variants if "_graphs" in v]:
        del variants[v]
tt_lookup.SYNC_FREE, tt_lookup.CUDA_GRAPHS = "off", "off"
times = {f"{v}_{w}": [] for v in variants for w in ("train", "infer")}
for block in range(7):
    for v, (start, model) in variants.items():
        dlrm.start_lookups = start
        tt_lookup.POOLED = "off" if v == "grouped_dedup" else pooled
        tt_lookup.SYNC_FREE = "on" if "_syncfree" in v else "off"
        tt_lookup.TABLE_BATCHED = "off" if v.endswith("_unstacked") else "auto"
        tt_lookup.CUDA_GRAPHS = "on" if "_graphs" in v else "off"
        triton_entries.ENTRY_ORDER = "id" if v.endswith("_idorder") else "auto"
        for w in ("train", "infer"):
            ms = timed(fns[f"{model}_{w}"])
            if block:  # block 0 warms up
                times[f"{v}_{w}"].append(ms)
dlrm.start_lookups, tt_lookup.POOLED, tt_lookup.SYNC_FREE, tt_lookup.TABLE_BATCHED = grouped_start, pooled, "off", "auto"
tt_lookup.CUDA_GRAPHS, triton_entries.ENTRY_ORDER = "off", "auto"
for k, v in times.items():
    out[f"{k}_ms"] = sorted(v)[len(v) // 2]
for w in ("train", "infer"):
    out[f"tt_vs_dense_{w}_suffix"] = out[f"dense_{w}_ms"] / out[f"grouped_suffix_{w}_ms"]
    out[f"tt_vs_dense_{w}_suffix2048"] = out[f"dense_{w}_ms"] / out[f"grouped_suffix2048_{w}_ms"]
    out[f"grouped_vs_one_by_one_{w}"] = out[f"one_by_one_{w}_ms"] / out[f"grouped_{w}_ms"]
    out[f"tt_vs_dense_{w}_grouped"] = out[f"dense_{w}_ms"] / out[f"grouped_{w}_ms"]
    out[f"tt_vs_dense_{w}_one_by_one"] = out[f"dense_{w}_ms"] / out[f"one_by_one_{w}_ms"]
out["tt_vs_dense_infer_dedup"] = out["dense_infer_ms"] / out["grouped_dedup_infer_ms"]
for v in ("grouped_syncfree", "grouped_suffix_syncfree"):  # training and serving without a host sync
    if v in variants:
        for w in ("train", "infer"):
            out[f"tt_vs_dense_{w}_{v[8:]}"] = out[f"dense_{w}_ms"] / out[f"{v}_{w}_ms"]
        # the TT tables of one shape trained as one stacked table, against one by one
        out[f"stacked_vs_unstacked_train_{v[8:]}"] = out[f"{v}_unstacked_train_ms"] / out[f"{v}_train_ms"]
for v in ("grouped_syncfree", "grouped_suffix_syncfree"):  # the stacked lookups replayed from CUDA graphs
    if f"{v}_graphs" in variants:
        out[f"tt_vs_dense_train_{v[8:]}_graphs"] = out["dense_train_ms"] / out[f"{v}_graphs_train_ms"]
        out[f"graphs_vs_ops_train_{v[8:]}"] = out[f"{v}_train_ms"] / out[f"{v}_graphs_train_ms"]
for v in ("grouped_suffix_syncfree", "grouped_suffix_syncfree_graphs"):  # suffix-major entries vs by id
    if f"{v}_idorder" in variants:
        out[f"suffix_order_vs_id_order_train_{v[8:]}"] = out[f"{v}_idorder_train_ms"] / out[f"{v}_train_ms"]
out["pooled_vs_dedup_infer"] = out["grouped_dedup_infer_ms"] / out["grouped_infer_ms"]
print(json.dumps(out))

if os.environ.get("STEP_PROFILE") and device.type == "cuda":
    # where a step's time goes: GPU kernel time per step against its wall time, top kernels
    from torch.profiler import ProfilerActivity, profile
    path = os.path.join(os.environ.get("OUT", "."), "step_profile.txt")
    with open(path, "w") as f:
        for name, model in (("dense", "dense"), ("grouped", "tt"), ("grouped_suffix", "tt_suffix"),
                            ("grouped_suffix_syncfree", "tt_suffix"), ("grouped_suffix_syncfree_idorder", "tt_suffix")):
            if "_syncfree" in name and name not in variants:
                continue
            tt_lookup.SYNC_FREE = "on" if "_syncfree" in name else "off"
            triton_entries.ENTRY_ORDER = "id" if name.endswith("_idorder") else "auto"
            for w in ("train", "infer"):
                fn = fns[f"{model}_{w}"]
                fn()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    wall = timed(fn, 3)
                events = prof.key_averages()
                gpu_us = sum(e.self_device_time_total for e in events) / 3
                f.write(f"== {name} {w}: wall {wall:.2f} ms a step (profiled), GPU kernels {gpu_us / 1e3:.2f} ms a step\n")
                f.write(events.table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=60) + "\n")
