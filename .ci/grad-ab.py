"""The bench's forward+backward both ways: handed `.sum().backward()`'s expanded gradient (how the
eighth session's GPU figures were taken) and a dense upstream gradient (how `bench` takes them since
the twelfth session), for nn.EmbeddingBag(sparse=True) and the TT layer, in one process.

Usage: python3 .ci/grad-ab.py [rows dim rank batch]; prints one JSON line of milliseconds and ratios.
"""
import itertools
import json
import sys

import torch

from fpd_convert.bench.lookups import zipf_ids
from fpd_convert.bench.timing import interleaved_medians
from fpd_convert.devices import resolve_device
from fpd_convert.layers import TTEmbeddingBag
from fpd_convert.tt import choose_row_factors, factor_dims

rows, dim, rank, batch = (int(a) for a in (sys.argv[1:] or [10_000_000, 128, 32, 65_536]))
device = resolve_device("auto")
g = torch.Generator().manual_seed(0)
pool = [zipf_ids(rows, batch, 1.1, device, g) for _ in range(4)]
offsets = torch.arange(batch, device=device)
upstream = torch.randn(batch, dim, generator=g).to(device)
df = factor_dims(dim, 3)
layers = {"dense": torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, device=device),
          "tt": TTEmbeddingBag(rows, dim, rank=rank, mode="sum", device=device, dim_factors=df,
                               row_factors=choose_row_factors(rows, df, rank))}
turn = itertools.count()


def step(layer, how):
    def run():
        out = layer(pool[next(turn) % len(pool)], offsets)
        out.sum().backward() if how == "sum" else out.backward(upstream)
        for p in layer.parameters():
            p.grad = None
    return run


fns = {f"{name}_{how}": step(layer, how) for name, layer in layers.items() for how in ("sum", "upstream")}
ms = {k: v * 1e3 for k, v in interleaved_medians(fns, device, 20).items()}
out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "rows": rows, "dim": dim,
       "rank": rank, "batch": batch, "ms": ms,
       "ratio_sum": ms["dense_sum"] / ms["tt_sum"], "ratio_upstream": ms["dense_upstream"] / ms["tt_upstream"]}
print(json.dumps(out), flush=True)
