"""Lookup throughput of TTEmbeddingBag against nn.EmbeddingBag of the same shape, one run.

Warm-up, several repetitions taken in turn by every layer, median; ratios are TT / dense
measured in the same process.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..kernels import triton_suffix
from ..layers import TTEmbeddingBag, choose_kernel
from ..tt import choose_row_factors, factor_dims
from ..devices import resolve_device
from .timing import device_name, interleaved_medians


def zipf_ids(rows: int, n: int, exponent: float, device, generator=None) -> torch.Tensor:
    """``n`` ids in ``[0, rows)`` with Zipf-like popularity, hot ids scattered (hashed)."""
    u = torch.rand(n, generator=generator)
    # inverse CDF of p(k) ~ k^-s on [1, rows], continuous approximation
    s = exponent
    if abs(s - 1.0) < 1e-6:
        k = torch.exp(u * torch.log(torch.tensor(float(rows))))
    else:
        k = (1 + u * (rows ** (1 - s) - 1)) ** (1 / (1 - s))
    ids = (k.long() - 1).clamp(0, rows - 1)
    return ((ids * 2654435761) % rows).to(device)  # scatter hot ids over the table


class RowwiseQuantizedBag:
    """``nn.EmbeddingBag(mode="sum")`` lookups from an int8 or int4 row-wise quantized copy of a
    table (FBGEMM's CPU kernels in torch): what users pick instead of a TT table.  Forward only."""

    def __init__(self, weight: torch.Tensor, bits: int):
        ops = torch.ops.quantized
        if bits == 8:
            self.packed, self._bag = ops.embedding_bag_byte_prepack(weight), ops.embedding_bag_byte_rowwise_offsets
        elif bits == 4:
            self.packed, self._bag = ops.embedding_bag_4bit_prepack(weight), ops.embedding_bag_4bit_rowwise_offsets
        else:
            raise ValueError(f"bits should be 8 or 4 but got {bits}")

    @staticmethod
    def available(device: torch.device) -> bool:
        """FBGEMM's quantized bags exist in CPU builds of torch; CUDA ones need fbgemm_gpu."""
        return device.type == "cpu" and hasattr(torch.ops.quantized, "embedding_bag_4bit_rowwise_offsets")

    def __call__(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self._bag(self.packed, ids, offsets, False, 0, False, None, None, False)


def bench_lookups(rows: int = 1_000_000, dim: int = 64, rank: int = 16, batch: int = 8192, pooling: int = 1,
                  zipf: float = 1.1, device: str = "auto", reps: int = 10, seed: int = 0,
                  dense: Optional[bool] = None, kernel: str = "auto", reference: bool = True,
                  hot_rows: float = 0.0, exact_rows: float = 0.0, batches: int = 1, quantized: bool = True,
                  dim_factors: Optional[Sequence[int]] = None, suffix_rows: Union[str, int, None] = "auto") -> dict:
    """Lookups per second (forward, forward+backward) of TT and dense bags, and their ratios.

    ``kernel`` picks the TT path (see :mod:`fpd_convert.layers.tt_lookup`); with
    ``reference`` the plain PyTorch path is timed too, in the same run.  ``hot_rows`` /
    ``exact_rows`` (fractions) give the TT layer a row map / exact rows for the hottest ids,
    and the same layer without them is timed beside it.  ``batches`` > 1 cycles through that
    many distinct batches from the same distribution, as real traffic does: one batch repeated
    keeps the dense table's few touched rows in the CPU caches, which flatters the baseline.
    With ``quantized`` (CPU), int8 and int4 row-wise quantized copies of the dense table are
    timed too (forward only): the usual alternative to a TT table.  ``dim_factors`` sets the
    TT's factorization of ``dim`` (default: :func:`fpd_convert.tt.factor_dims`); ``suffix_rows``
    its row factors (:func:`fpd_convert.tt.choose_row_factors`: ``"auto"``, as ``compress``
    picks them at ``rank``; ``"balanced"``; or a suffix row count).
    """
    if batches < 1:
        raise ValueError(f"batches should be >= 1 but got {batches}")
    dev = resolve_device(device)
    g = torch.Generator().manual_seed(seed)
    pool = [zipf_ids(rows, batch * pooling, zipf, dev, g) for _ in range(batches)]
    turn = itertools.count()
    offsets = torch.arange(0, batch * pooling, pooling, device=dev)
    # the gradient a model's next layer hands back: dense and contiguous.  `.sum().backward()` would
    # hand the layers an expanded one (stride 0), which made nn.EmbeddingBag's backward 2.4x faster
    # and the TT layer's output-gather backward 6x slower (CPU, 1M x 64, 8,192 ids)
    upstream = torch.randn(batch, dim, generator=g).to(dev)
    df = list(dim_factors) if dim_factors else factor_dims(dim, 3)
    shape = dict(dim_factors=df, row_factors=choose_row_factors(rows, df, rank, suffix_rows))
    tt = TTEmbeddingBag(rows, dim, rank=rank, mode="sum", device=dev, **shape)
    tt.kernel = kernel
    out = {"rows": rows, "dim": dim, "rank": rank, "row_factors": tt.tt_shape.row_factors,
           "dim_factors": tt.tt_shape.dim_factors, "batch": batch,
           "pooling": pooling, "zipf": zipf,
           "device": device_name(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "unique_ids": round(sum(int(b.unique().numel()) for b in pool) / batches), "lookups": batch * pooling,
           "batches": batches,
           "kernel": choose_kernel(kernel, list(tt.cores))}
    cores = list(tt.cores)
    if out["kernel"] == "cpu" and tt._row_cache.fits(cores):  # which end CPU serving reads, and its table
        out["cpu_serving"] = {"end": "first" if tt._row_cache._first_is_end(cores) else "last",
                              "table_bytes": tt._row_cache.nbytes_for(cores)}
    if out["kernel"] == "triton":  # which Triton kernels a training batch of this size takes
        out["triton_rows"] = "suffix" if triton_suffix.worthwhile(list(tt.cores), out["unique_ids"]) else "per-index"
    layers = {"tt": tt}
    if hot_rows or exact_rows:
        plain = TTEmbeddingBag(rows, dim, rank=rank, mode="sum", device=dev, _cores=[c.detach() for c in tt.cores],
                               **shape)
        plain.kernel = kernel
        layers["tt_plain"] = plain
        hottest = (torch.arange(int((hot_rows + exact_rows) * rows)) * 2654435761) % rows  # zipf_ids' hot ids
        n_exact = int(exact_rows * rows)
        if n_exact:
            tt.set_exact_rows(hottest[:n_exact], torch.randn(n_exact, dim) * 0.01)
        if hot_rows:
            tt.set_row_map(hottest[n_exact:])
        out.update(hot_rows=int(hot_rows * rows), exact_rows=n_exact)
    if reference and out["kernel"] != "reference":  # the same table (map, exact rows) on the reference path
        ref = TTEmbeddingBag(rows, dim, rank=rank, mode="sum", device=dev, _cores=[c.detach() for c in tt.cores],
                             **shape)
        if tt.row_map is not None:
            ref.set_row_map(tt.row_map)
        if tt.exact_ids is not None:
            ref.set_exact_rows(tt.exact_ids, tt.exact_rows.detach())
        ref.kernel = "reference"
        layers["tt_reference"] = ref
    if dense is not False:
        layers["dense"] = nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, device=dev)
    out["bytes"] = {"tt": tt.param_count() * tt.cores[0].element_size(), "dense": rows * dim * 4}
    forward, fwd_bwd = {}, {}
    if "dense" in layers and quantized and RowwiseQuantizedBag.available(dev):
        for bits in (8, 4):
            q = RowwiseQuantizedBag(layers["dense"].weight.detach(), bits)
            out["bytes"][f"int{bits}"] = q.packed.numel() * q.packed.element_size()
            forward[f"int{bits}_forward_lookups_s"] = lambda q=q: q(pool[next(turn) % batches], offsets)
    for name, layer in layers.items():
        def fwd(layer=layer):
            with torch.no_grad():
                layer(pool[next(turn) % batches], offsets)

        def train_step(layer=layer):
            layer(pool[next(turn) % batches], offsets).backward(upstream)
            for p in layer.parameters():
                p.grad = None
        forward[f"{name}_forward_lookups_s"], fwd_bwd[f"{name}_fwd_bwd_lookups_s"] = fwd, train_step
    # inference and training are timed apart: each in the steady state of its own loop
    for fns in (forward, fwd_bwd):
        for key, seconds in interleaved_medians(fns, dev, reps).items():
            out[key] = batch * pooling / seconds
    if "dense" in layers:
        out["forward_ratio"] = out["tt_forward_lookups_s"] / out["dense_forward_lookups_s"]
        out["fwd_bwd_ratio"] = out["tt_fwd_bwd_lookups_s"] / out["dense_fwd_bwd_lookups_s"]
        for bits in (8, 4):
            if f"int{bits}_forward_lookups_s" in out:
                out[f"int{bits}_forward_ratio"] = out[f"int{bits}_forward_lookups_s"] / out["dense_forward_lookups_s"]
    if "tt_reference" in layers:
        out["speedup_forward_vs_reference"] = out["tt_forward_lookups_s"] / out["tt_reference_forward_lookups_s"]
        out["speedup_fwd_bwd_vs_reference"] = out["tt_fwd_bwd_lookups_s"] / out["tt_reference_fwd_bwd_lookups_s"]
    return out


def format_lookups(r: dict) -> str:
    batches = (f" a batch, {r['batches']} batches in turn" if r.get("batches", 1) > 1
               else ", one batch repeated: --batches N for fresh ones")
    lines = [f"{r['rows']:,} x {r['dim']} (rows {r.get('row_factors')}, dims {r.get('dim_factors')}), rank {r['rank']}, "
             f"batch {r['batch']:,} x pooling {r['pooling']}, "
             f"Zipf {r['zipf']} ({r['unique_ids']:,} unique ids{batches}), "
             f"{r['device']}, torch {r['torch']}, "
             f"TT path: {r['kernel']}" + (f" ({r['triton_rows']} kernels)" if "triton_rows" in r else "")
             + (f", serving from the {r['cpu_serving']['end']} core's end "
                f"({r['cpu_serving']['table_bytes'] / 2**20:.1f} MB table)" if "cpu_serving" in r else "")
             + (f", row map {r['hot_rows']:,} + exact {r['exact_rows']:,} rows"
                                          if "hot_rows" in r else "")]
    for what in ("forward", "fwd_bwd"):
        tt = r[f"tt_{what}_lookups_s"]
        line = f"{what:8s} TT {tt / 1e6:8.2f} M lookups/s"
        if f"tt_reference_{what}_lookups_s" in r:
            line += f"  (reference {r[f'tt_reference_{what}_lookups_s'] / 1e6:8.2f})"
        if f"tt_plain_{what}_lookups_s" in r:
            line += f"  (without row map/exact rows {r[f'tt_plain_{what}_lookups_s'] / 1e6:8.2f})"
        if f"dense_{what}_lookups_s" in r:
            line += f"   nn.EmbeddingBag {r[f'dense_{what}_lookups_s'] / 1e6:8.2f} M/s   ratio {r[f'{what}_ratio']:.3f}x"
        lines.append(line)
    size = r.get("bytes", {})
    for bits in (8, 4):
        name = f"int{bits}"
        if f"{name}_forward_lookups_s" in r:
            lines.append(f"forward  {name} row-wise {r[f'{name}_forward_lookups_s'] / 1e6:8.2f} M lookups/s   "
                         f"ratio {r[f'{name}_forward_ratio']:.3f}x   {size['dense'] / size[name]:.1f}x smaller")
    if "tt" in size:
        lines.append(f"bytes    TT {size['tt']:,} "
                     f"({size['dense'] / size['tt']:.0f}x smaller than dense {size['dense']:,})")
    return "\n".join(lines)
