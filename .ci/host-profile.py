"""Where the host's time goes (cProfile) in a TT table's forward+backward and in a DLRM training
step with TT tables (GPU): the Python functions by their own time.  On an H100 a TT table's
fwd+bwd took ~2.4 ms of host time for ~0.55 ms of GPU work (.ci/sync-probe.py), so the host,
not the GPU, sets its speed.

Usage: python3 .ci/host-profile.py [rows_cap rank batch]; writes $OUT/host_profile.txt.
"""
import cProfile
import io
import os
import pstats
import sys

import torch

from fpd_convert.bench.dlrm_step import _largest, _step_fn, terabyte_architecture
from fpd_convert.bench.lookups import zipf_ids
from fpd_convert.layers import TTEmbeddingBag, tt_lookup
from fpd_convert.models import build_model

rows, rank, batch = (int(a) for a in (sys.argv[1:] or [10_000_000, 32, 65_536]))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ids = zipf_ids(rows, batch, 1.1, device, torch.Generator().manual_seed(0))
offsets = torch.arange(batch, device=device)
upstream = torch.randn(batch, 128, device=device)  # a dense gradient, not sum()'s expanded one
path = os.path.join(os.environ.get("OUT", "."), "host_profile.txt")


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def report(title, fn, calls):
    for _ in range(3):
        fn()
    sync()
    prof = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):  # the backward's Python on this thread
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
    sync()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(30)
    with open(path, "a") as f:
        f.write(f"===== {title}: {calls} calls, {stats.total_tt / calls * 1e3:.3f} ms of host time a call\n")
        f.write(text.getvalue() + "\n")
    print(f"{title}: {stats.total_tt / calls * 1e3:.3f} ms of host time a call (profiled)", flush=True)


layer = TTEmbeddingBag(rows, 128, rank=rank, mode="sum", device=device)


def fwd_bwd():
    layer(ids, offsets).backward(upstream)
    for p in layer.parameters():
        p.grad = None


for mode in ("on", "off"):
    tt_lookup.SYNC_FREE = mode
    report(f"TT layer fwd+bwd, FPD_TT_SYNC_FREE={mode}", fwd_bwd, 20)
    with torch.no_grad():
        report(f"TT layer forward (no grad), FPD_TT_SYNC_FREE={mode}", lambda: layer(ids, offsets), 20)
layer = None  # its memory back before the DLRM model
arch = terabyte_architecture(rows, 128)
with device:
    net = build_model(arch, _largest(arch, 5, rank, 512))
tt_lookup.SYNC_FREE = "on"
report("DLRM step, 5 TT tables (suffix 512), FPD_TT_SYNC_FREE=on", _step_fn(net, arch, batch, 1.1, device, 0.01, 0), 5)
