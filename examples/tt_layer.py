"""Use the TT layer directly, as a drop-in for ``nn.EmbeddingBag``.

1. TT-SVD of a table (here a generated one with low TT rank plus noise; a trained table has far
   less structure, so its relative error is high and fine-tuning recovers the AUC, docs/benchmarks.md);
2. the same row layout ``fpd-convert compress`` picks (``choose_row_factors``);
3. lookups with ``(input, offsets, per_sample_weights)`` as ``nn.EmbeddingBag`` takes them;
4. a training step (gradients reach the TT cores), and the layer's state saved with safetensors.

    python examples/tt_layer.py --rows 200000 --dim 64 --rank 16
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fpd_convert import TTEmbeddingBag
from fpd_convert.bench.svd import structured_rows
from fpd_convert.tt import choose_row_factors, factor_dims


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=1024)
    args = p.parse_args(argv)

    row_factors = choose_row_factors(args.rows, factor_dims(args.dim, 3), args.rank)
    weight = structured_rows(args.rows, args.dim, rank=8, row_factors=row_factors)(0, args.rows)
    dense = nn.EmbeddingBag.from_pretrained(weight, mode="sum", freeze=False)
    tt = TTEmbeddingBag.from_dense(weight, mode="sum", rank=args.rank, row_factors=row_factors)
    print(f"TT table: row factors {tt.tt_shape.row_factors}, dim factors {tt.tt_shape.dim_factors}, "
          f"ranks {tt.tt_shape.ranks}, {tt.param_count():,} parameters against {weight.numel():,} "
          f"({weight.numel() / tt.param_count():.0f}x smaller), relative error {tt.reconstruction_error:.3f}")

    # bags of 1-3 ids with weights, the nn.EmbeddingBag way
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 4, (args.batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    ids = torch.randint(0, args.rows, (int(lengths.sum()),), generator=g)
    w = torch.rand(ids.numel(), generator=g)
    with torch.no_grad():
        got, want = tt(ids, offsets, per_sample_weights=w), dense(ids, offsets, per_sample_weights=w)
    print(f"bags: {args.batch:,}, output {tuple(got.shape)}, relative difference from the dense table "
          f"{float((got - want).norm() / want.norm()):.3f}")

    # one training step: the gradients land on the TT cores
    opt = torch.optim.Adagrad(tt.parameters(), lr=1e-3)
    loss = (tt(ids, offsets, per_sample_weights=w) - want).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = (tt(ids, offsets, per_sample_weights=w) - want).pow(2).mean()
    print(f"one Adagrad step toward the dense outputs: loss {loss.detach().item():.3e} -> {after.item():.3e}")

    # the layer's state in safetensors, and back into a layer of the same shape
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tt_table.safetensors")
        save_file({k: v.contiguous() for k, v in tt.state_dict().items()}, path)
        again = TTEmbeddingBag(args.rows, args.dim, rank=args.rank, mode="sum", row_factors=row_factors)
        again.load_state_dict(load_file(path))
        with torch.no_grad():
            same = torch.equal(again(ids, offsets, per_sample_weights=w), tt(ids, offsets, per_sample_weights=w))
        print(f"saved {os.path.getsize(path):,} bytes of safetensors; reloaded layer gives the same bags: {same}")


if __name__ == "__main__":
    main()
