"""The TT layers' forward as ``torch.compile`` and ``torch.export`` trace it.

Eager mode runs Python and numpy around the kernels (the dedup, the cached end table, the one-sync
GPU lookups); a traced graph can hold none of that.  Here a lookup is standard operators around one
registered operator, :func:`torch.ops.fpd_convert.tt_lookup` (:mod:`fpd_convert.layers.ops`), which runs
the same fast paths inside, with shapes that follow the input (a dynamic batch, dynamic bag lengths):

1. where each id lives: its TT position, or ``-1 - k`` for exact row ``k`` (a search of the layer's merged
   row index within the id's bucket, :func:`fpd_convert.layers.row_index.index_buckets`);
2. the rows: for CPU tables of at most :data:`IN_GRAPH_MAX_BYTES`, standard operators around the product
   of all cores but the first (in eval mode the layer's serving form, :mod:`fpd_convert.layers.
   serving_form`, which inductor vectorizes), else the operator; the exact rows gathered for the others;
3. pooling: a reshape for ``(B, L)`` input, a segment sum (or max) for ``(N,)`` input with offsets
   (:func:`pool_entries`), so that every mode, padding and ``include_last_offset`` give what
   ``nn.EmbeddingBag`` gives.

Within :func:`portable_lookups` the operator is lowered to standard operators instead, for programs that
must run where ``fpd_convert`` is not installed (AOTInductor packages, ONNX Runtime): a row is the
first core's slice times a precomputed product of the others where :func:`portable_products` holds one
(in the serving form's layout; for ONNX the eager end table's), else the contraction of :func:`fpd_convert.kernels.reference.tt_rows`
(index_select and bmm per id, no dedup, which inductor fuses), and an out-of-range id gives a row of
NaN instead of an error (a graph has no exceptions; a NaN score cannot pass unseen).  Ids are divided
with ``//`` only: ONNX exports ``torch.div(..., rounding_mode="floor")`` of integers through float32.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from ..kernels.cpu_suffix import rows_from_suffixes, suffix_table
from ..kernels.reference import tt_rows as reference_rows
from . import ops  # noqa: F401  (registers torch.ops.fpd_convert.*)
from . import serving_form

_PORTABLE = [False]
_ONNX = [False]


@contextlib.contextmanager
def portable_lookups(onnx: bool = False) -> Iterator[None]:
    """While open, traced TT lookups use standard operators only (no ``fpd_convert`` operator); with
    ``onnx``, only operators ONNX has (no ``searchsorted``)."""
    saved = _PORTABLE[0], _ONNX[0]
    _PORTABLE[0], _ONNX[0] = True, onnx
    try:
        yield
    finally:
        _PORTABLE[0], _ONNX[0] = saved


def for_onnx() -> bool:
    """Whether a trace is for an ONNX program (within ``portable_lookups(onnx=True)``)."""
    return _ONNX[0]


def _find_sorted(sorted_ids: torch.Tensor, query: torch.Tensor, buckets):
    """``(found, at)``: whether each query (>= 0) is in ``sorted_ids`` and where (its insertion point),
    searched within the query's bucket (``buckets``: ``(starts, shift, depth)`` of
    :func:`fpd_convert.layers.row_index.index_buckets`) in ``depth`` steps of a gather and a compare, no
    division: ONNX has no ``searchsorted``, inductor fuses the steps into one loop (``searchsorted`` is a
    call of its own), and ONNX exports integer floor division through float32 (wrong past 2**24)."""
    n = sorted_ids.numel()
    starts, shift, depth = buckets
    # a step never passes a query that is in the index: the ids of the next buckets are all above it, and a
    # step looking past the end compares the last id, which is not below it.  An absent query may end
    # anywhere: it is not found there either.
    at = starts.index_select(0, query // (1 << shift))
    for step in reversed(range(depth)):
        ahead = at + (1 << step)
        at = torch.where(sorted_ids.index_select(0, (ahead - 1).clamp(max=n - 1)) < query, ahead, at)
    at = at.clamp(max=n - 1)
    return sorted_ids.index_select(0, at) == query, at


def traced_rows(layer, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``W[ids]`` (N, D) of a TT layer for ids (N,), in traceable operators."""
    ids = ids.reshape(-1).long().contiguous()
    cores = layer._core_list()
    exact = layer._exact_rows_in_use()
    n = layer.num_embeddings
    portable = _PORTABLE[0]
    products = getattr(layer, "_portable_products", None) if portable else None
    form = getattr(layer, "_portable_form", None) if portable else None
    if not portable:
        if not in_graph(layer, ids.shape[0]):  # one operator: the eager layer's lookup, all of it
            return torch.ops.fpd_convert.tt_lookup(cores, exact, layer._index_ids, layer._index_codes, ids, n,
                                                   layer.kernel)
        torch._assert_async(((ids >= 0) & (ids < n)).all(), f"an index is out of range for a table of {n} rows")
        grad = torch.is_grad_enabled() and any([c.requires_grad for c in cores])
        # a torch.export program keeps the operator (the compact pt2 file): the serving form is for compile
        form = None if grad or torch.compiler.is_exporting() else serving_form.current(layer)
        if form is None:
            products = suffix_table(cores) if grad else torch.ops.fpd_convert.tt_products(cores)
    valid = (ids >= 0) & (ids < n)
    safe = torch.where(valid, ids, torch.zeros_like(ids)) if portable else ids
    codes = safe
    index_ids = layer._index_ids
    if index_ids is not None and index_ids.numel():
        found, at = _find_sorted(index_ids, safe, layer._index_buckets)
        codes = torch.where(found, layer._index_codes.index_select(0, at), safe)
    if portable:  # an out-of-range id: a row of NaN, kept after the exact rows (one choice of rows, not two)
        nan = cores[0].new_full((1, layer.embedding_dim), float("nan"))
        exact = nan if exact is None else torch.cat([exact.to(nan.dtype), nan])
        codes = torch.where(valid, codes, torch.full_like(codes, -exact.shape[0]))
    positions = codes.clamp(min=0) if exact is not None else codes
    if form is not None:
        rows = serving_form.rows(cores[0], form, positions)
    elif products is not None:  # ONNX Runtime's MatMul; training; no serving form (train mode, no_grad)
        rows = rows_from_suffixes(cores[0], products, positions)
    else:
        rows = reference_rows(cores, positions)
    if exact is not None:
        kept = exact.index_select(0, (-1 - codes).clamp(min=0))
        rows = torch.where((codes < 0)[:, None], kept.to(rows.dtype), rows)
    return rows


#: on the CPU, a traced lookup whose product table (all cores but the first) is at most this big is
#: traced in standard operators (a gather and a small product per id, which inductor fuses): the product
#: table is the layer's serving form (eval mode), comes from an operator that keeps it between calls
#: (inference in train mode) or is built in the graph (training).  Demo model at batch 1 / 64 / 2,048:
#: 0.21 / 0.33 / 3.2 ms against 0.48 / 0.61 / 3.2 ms for the lookup operator (2 cores, 2026-12-01, before
#: the serving form; docs/benchmarks.md).  Bigger tables, and GPUs, take the operator.
IN_GRAPH_MAX_BYTES = serving_form.MAX_BYTES


def in_graph(layer, num_ids: int) -> bool:
    """Whether a traced (non-portable) lookup of this layer runs in standard operators (see above)."""
    cores = layer._core_list()
    if layer.kernel not in ("auto", "cpu") or cores[0].device.type != "cpu" or len(cores) < 2:
        return False
    return serving_form.form_bytes(cores) <= IN_GRAPH_MAX_BYTES


#: a portable program holds a table's product of all cores but the first (the eager end table) as a
#: constant while it takes at most this many times the cores' bytes: a row is then one small product
PRODUCTS_MAX_RATIO = 8


@contextlib.contextmanager
def portable_products(model: torch.nn.Module) -> Iterator[int]:
    """While open, every TT layer of ``model`` holds, as a buffer that portable programs take as a
    constant, the product of all its cores but the first where it stays under ``PRODUCTS_MAX_RATIO`` times
    the cores' bytes: in the serving form's layout (:mod:`fpd_convert.layers.serving_form`, which inductor
    vectorizes) or, for ONNX programs, as :func:`fpd_convert.kernels.cpu_suffix.suffix_table` gives it (one
    ``MatMul``, :func:`fpd_convert.kernels.cpu_suffix.rows_from_suffixes`); yields the bytes added."""
    from .tt_table import _TTTable
    name = "_portable_products" if _ONNX[0] else "_portable_form"
    held, added = [], 0
    try:
        for m in model.modules():
            cores = m._core_list() if isinstance(m, _TTTable) else None
            if not cores or len(cores) < 2 or cores[0].device.type != "cpu":
                continue
            cores = [c.detach() for c in cores]
            if serving_form.form_bytes(cores) > PRODUCTS_MAX_RATIO * sum(c.numel() * c.element_size() for c in cores):
                continue
            with torch.no_grad():
                table = suffix_table(cores) if _ONNX[0] else serving_form.products_form(cores)
            m.register_buffer(name, table, persistent=False)
            held.append(m)
            added += table.numel() * table.element_size()
        yield added
    finally:
        for m in held:
            m._buffers.pop(name, None)


@contextlib.contextmanager
def portable(model: torch.nn.Module, onnx: bool = False) -> Iterator[None]:
    """While open, ``torch.export`` (and so ``torch.onnx.export(..., dynamo=True)`` and AOTInductor) traces the
    TT layers of ``model``, any model, in standard operators only: the program runs where fpd_convert is not
    installed (``onnx``: in operators ONNX has).  What ``fpd-convert export`` does for a loaded file::

        with torch.no_grad(), fpd_convert.portable(model, onnx=True):
            torch.onnx.export(model, args, dynamo=True).save("model.onnx")
    """
    with serving_form.hidden(model), portable_lookups(onnx=onnx), portable_products(model):
        yield


def _check_call(layer, input: torch.Tensor, offsets: Optional[torch.Tensor],
                per_sample_weights: Optional[torch.Tensor]) -> None:
    """The errors ``nn.EmbeddingBag`` gives for a malformed call that a trace can see (shapes, dtypes)."""
    layer._check_type(input)
    if input.dim() == 2 and offsets is not None:
        raise ValueError("if input is 2D, then offsets has to be None, as input is treated is a mini-batch of "
                         "fixed length sequences.")
    if input.dim() == 1 and offsets is None:
        raise ValueError("offsets has to be a 1D Tensor but got None")
    if input.dim() not in (1, 2):
        raise ValueError(f"input has to be 1D or 2D Tensor, but got Tensor of dimension {input.dim()}")
    if per_sample_weights is not None:
        if layer.mode != "sum":
            raise NotImplementedError(f"embedding_bag: per_sample_weights was not None. per_sample_weights is "
                                      f"only supported for mode='sum' (got mode='{layer.mode}'). Please open a "
                                      "feature request on GitHub.")
        if per_sample_weights.shape != input.shape:
            raise ValueError(f"embedding_bag: If per_sample_weights ({tuple(per_sample_weights.shape)}) is not "
                             f"None, then it must have the same shape as the input ({tuple(input.shape)})")


def pool_entries(rows: torch.Tensor, offsets: torch.Tensor, mode: str, include_last_offset: bool = False,
                 keep: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bags of entry rows (N, D) cut by ``offsets`` as ``nn.EmbeddingBag`` pools them, in operators every
    runtime has (a cumulative sum, ``index_add``, ``scatter_reduce``; ONNX Runtime runs ``embedding_bag``
    as a loop over bags, 400x slower at 2,048 bags).  ``keep`` (N,) 0/1 drops entries (padding, those after
    the last offset); ``weights`` (N,) scale them (mode ``sum``)."""
    n, d = rows.shape
    bags = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
    # entry e is in bag (number of offsets <= e) - 1; after the last of B + 1 offsets that is B: no bag
    marks = torch.zeros(n + 1, dtype=torch.long, device=rows.device).index_add(0, offsets, torch.ones_like(offsets))
    bag_of = torch.cumsum(marks[:n], 0) - 1
    if keep is not None:  # dropped entries go to a bag past the last, cut off below
        bag_of = torch.where(keep > 0, bag_of, torch.full_like(bag_of, bags))
    if mode == "max":
        out = rows.new_zeros(bags + 1, d).scatter_reduce(0, bag_of[:, None].expand(n, d), rows, "amax",
                                                         include_self=False)
        return out[:bags]
    scaled = rows if weights is None else rows * weights[:, None]
    out = rows.new_zeros(bags + 1, d).index_add(0, bag_of, scaled)[:bags]
    if mode == "sum":
        return out
    count = rows.new_zeros(bags + 1).index_add(0, bag_of, torch.ones_like(bag_of, dtype=rows.dtype))[:bags]
    return out / count.clamp(min=1)[:, None]


def pool_fixed(rows: torch.Tensor, b: int, length: int, mode: str, keep: Optional[torch.Tensor] = None,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bags of ``length`` consecutive entries (a (B, L) input), as ``nn.EmbeddingBag`` pools them."""
    entries = rows.reshape(b, length, rows.shape[1])
    if mode == "max":
        if keep is None:
            return entries.amax(dim=1)
        masked = torch.where(keep.reshape(b, length, 1) > 0, entries, torch.full_like(entries, float("-inf")))
        out = masked.amax(dim=1)
        return torch.where(torch.isinf(out), torch.zeros_like(out), out)
    scale = keep if weights is None else (weights if keep is None else weights * keep)
    summed = (entries * scale.reshape(b, length, 1)).sum(1) if scale is not None else entries.sum(1)
    if mode == "sum":
        return summed
    if keep is None:
        return summed / length
    return summed / keep.reshape(b, length).sum(1, keepdim=True).clamp(min=1)


def pool(rows: torch.Tensor, input: torch.Tensor, offsets: Optional[torch.Tensor], mode: str,
         include_last_offset: bool, padding_idx: Optional[int], per_sample_weights: Optional[torch.Tensor]):
    """The bags of a lookup's entry rows, for (B, L) input or (N,) input with offsets."""
    flat = input.reshape(-1)
    keep = None if padding_idx is None else (flat != padding_idx).to(rows.dtype)
    weights = None if per_sample_weights is None else per_sample_weights.reshape(-1).to(rows.dtype)
    if input.dim() == 2:
        b, length = input.shape
        if length == 1 and keep is None and weights is None:  # one id a bag (DLRM's Criteo tables)
            return rows
        return pool_fixed(rows, b, length, mode, keep, weights)
    return pool_entries(rows, offsets.long(), mode, include_last_offset, keep, weights)


def traced_bag(layer, input: torch.Tensor, offsets: Optional[torch.Tensor] = None,
               per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``TTEmbeddingBag.forward`` in traceable operators: (B, L) input, or (N,) input with offsets."""
    _check_call(layer, input, offsets, per_sample_weights)
    rows = traced_rows(layer, input.reshape(-1))
    return pool(rows, input, offsets, layer.mode, layer.include_last_offset, layer.padding_idx, per_sample_weights)


def traced_dense_bag(bag, input: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                     per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An ``nn.EmbeddingBag``'s forward in the same operators (a gather, then :func:`pool`): what the
    models' traced lookups use for the tables they keep dense."""
    if bag.max_norm is not None:
        return bag(input, offsets, per_sample_weights=per_sample_weights)
    rows = bag.weight.index_select(0, input.reshape(-1).long())
    return pool(rows, input, offsets, bag.mode, bag.include_last_offset, bag.padding_idx, per_sample_weights)


def traced_embedding(layer, input: torch.Tensor) -> torch.Tensor:
    """``TTEmbedding.forward`` in traceable operators: input (*) -> (*, D); the padding row is looked up as
    it is and learns nothing, as in ``nn.Embedding``."""
    layer._check_type(input)
    flat = input.reshape(-1)
    rows = traced_rows(layer, flat)
    if layer.padding_idx is not None:
        rows = torch.where((flat == layer.padding_idx)[:, None], rows.detach(), rows)
    return rows.reshape(*input.shape, rows.shape[1])
