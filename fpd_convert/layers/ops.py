"""The TT lookup as registered PyTorch operators: what ``torch.compile`` and ``torch.export`` trace.

``torch.ops.fpd_convert.tt_lookup(cores, exact_rows, index_ids, index_codes, ids, num_rows, kernel)``
returns the rows ``W[ids]`` (N, D) of a TT table for ids (N,): it checks them against ``num_rows`` (the
layer's ``TTIndexError``), deduplicates them, finds where each distinct id lives (its TT position, a
position the row map gives it, or an exact row: ``index_ids`` / ``index_codes``,
:mod:`fpd_convert.layers.row_index`) and builds the TT rows by the eager layers' own paths
(:func:`fpd_convert.layers.tt_lookup.lookup_rows`: the cached end table on the CPU, Triton on a GPU),
numpy included where it pays, all inside the operator and never in the traced graph.  Its fake
implementation gives the output's shape for tracing; its autograd formula calls
``torch.ops.fpd_convert.tt_lookup_backward``, which sums the rows' gradients per distinct id, adds
those of exact rows to theirs and differentiates the row contraction of the rest (the forward is
recomputed there rather than saved: under ``torch.compile`` the forward runs without autograd).

A program that holds these operators needs them registered to run: ``import fpd_convert.layers``
(docs/deploying.md); the portable formats lower the lookup to standard operators instead
(:mod:`fpd_convert.layers.traced`).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from ..kernels.cpu_suffix import suffix_table
from ..kernels.cpu_tt import EndTable
from ..kernels.triton_suffix import SuffixCache
from . import dedup
from .row_index import BitRank, row_codes
from .tt_lookup import lookup_rows


class _TableState:
    """What the eager layer keeps on itself between lookups: the inference caches, the bit set of its
    row index and the product of all cores but the first (each rebuilt when what it comes from changes)."""

    def __init__(self):
        self.row_cache, self.suffix_cache = EndTable(), SuffixCache()
        self.bit_rank: Tuple[Optional[int], Optional[BitRank]] = (None, None)
        self.products: Tuple[Optional[tuple], Optional[torch.Tensor]] = (None, None)

    def suffix_products(self, cores: List[torch.Tensor]) -> torch.Tensor:
        key = tuple((c.data_ptr(), c._version, tuple(c.shape)) for c in cores[1:])
        if self.products[0] != key:
            self.products = (None, None)  # the old table goes first
            with torch.no_grad():
                self.products = (key, suffix_table([c.detach() for c in cores]))
        return self.products[1]

    def codes(self, index_ids, index_codes, ids: torch.Tensor, num_rows: int) -> Optional[torch.Tensor]:
        if index_ids is None or index_ids.numel() == 0:
            return None
        bit_rank = None
        if ids.device.type == "cpu":
            key = (index_ids.data_ptr(), index_ids._version, index_ids.numel())
            if self.bit_rank[0] != key:
                self.bit_rank = (key, BitRank(index_ids.numpy(), num_rows))
            bit_rank = self.bit_rank[1]
        return row_codes(index_ids, index_codes, ids, bit_rank)


#: per table (its first core, by id: tensors compare elementwise); an entry goes when its core does
_STATES: Dict[int, Tuple["weakref.ref[torch.Tensor]", _TableState]] = {}


def _state(cores: List[torch.Tensor]) -> _TableState:
    key = id(cores[0])
    found = _STATES.get(key)
    if found is None or found[0]() is not cores[0]:
        found = (weakref.ref(cores[0], lambda _, key=key: _STATES.pop(key, None)), _TableState())
        _STATES[key] = found
    return found[1]


def _width(cores: List[torch.Tensor]) -> int:
    return math.prod(int(c.shape[2]) for c in cores)


def _check(ids: torch.Tensor, num_rows: int) -> None:
    if ids.numel():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())
        if lo < 0 or hi >= num_rows:
            from .tt_table import TTIndexError
            bad = lo if lo < 0 else hi
            raise TTIndexError(f"index {bad} is out of range for a table of {num_rows} rows "
                               f"(valid: 0..{num_rows - 1})")


def _distinct(flat: torch.Tensor, num_rows: int, any_order: bool):
    """``(distinct ids, inverse)`` of checked ids; in no particular order where ``any_order``."""
    if flat.device.type == "cpu":
        if any_order:
            found = dedup.unique_any_order(flat, num_rows)
            if found is not None:
                return found[0], found[1].long()
        _check(flat, num_rows)
        return dedup.unique_sorted(flat, num_rows)
    _check(flat, num_rows)
    return torch.unique(flat, return_inverse=True)


@torch.library.custom_op("fpd_convert::tt_lookup", mutates_args=())
def tt_lookup(cores: List[torch.Tensor], exact_rows: Optional[torch.Tensor], index_ids: Optional[torch.Tensor],
              index_codes: Optional[torch.Tensor], ids: torch.Tensor, num_rows: int, kernel: str) -> torch.Tensor:
    """Rows ``W[ids]`` (N, D) of a TT table with its row index and exact rows (see the module)."""
    flat = ids.reshape(-1).long()
    if flat.numel() == 0:
        return cores[0].new_zeros(0, _width(cores))
    state = _state(cores)
    uniq, inverse = _distinct(flat, num_rows, any_order=True)  # lookup_rows sorts where its path needs it
    codes = state.codes(index_ids, index_codes, uniq, num_rows)
    with torch.no_grad():
        if codes is None:
            rows = lookup_rows(cores, uniq, kernel, state.row_cache, is_sorted=False, suffix_cache=state.suffix_cache)
        else:  # exact hits are few among a batch's distinct ids: they get a TT row too, then overwritten
            rows = lookup_rows(cores, codes.clamp(min=0), kernel, state.row_cache, is_sorted=False,
                               suffix_cache=state.suffix_cache)
            if exact_rows is not None:
                hits = (codes < 0).nonzero().reshape(-1)
                if hits.numel():
                    rows = rows.index_copy(0, hits, exact_rows.index_select(0, -1 - codes[hits]).to(rows.dtype))
    return rows.index_select(0, inverse.reshape(-1).to(rows.device))


@tt_lookup.register_fake
def _(cores, exact_rows, index_ids, index_codes, ids, num_rows, kernel):
    return cores[0].new_empty(ids.numel(), _width(cores))


@torch.library.custom_op("fpd_convert::tt_lookup_backward", mutates_args=())
def tt_lookup_backward(grad: torch.Tensor, cores: List[torch.Tensor], exact_rows: Optional[torch.Tensor],
                       index_ids: Optional[torch.Tensor], index_codes: Optional[torch.Tensor], ids: torch.Tensor,
                       num_rows: int, kernel: str) -> List[torch.Tensor]:
    """The gradients of :func:`tt_lookup` for the rows' gradient ``grad`` (N, D): one per core, then the
    exact rows' (an empty tensor without exact rows)."""
    exact_grad = torch.zeros_like(exact_rows) if exact_rows is not None else grad.new_zeros(0)
    flat = ids.reshape(-1).long()
    if flat.numel() == 0:
        return [torch.zeros_like(c) for c in cores] + [exact_grad]
    uniq, inverse = dedup.unique_sorted(flat, num_rows)
    per_row = grad.new_zeros(uniq.numel(), grad.shape[1]).index_add_(0, inverse.to(grad.device), grad)
    codes = _state(cores).codes(index_ids, index_codes, uniq, num_rows)
    positions = uniq if codes is None else codes
    if codes is not None and exact_rows is not None:
        hits = codes < 0
        exact_grad.index_add_(0, -1 - codes[hits], per_row[hits].to(exact_grad.dtype))
        positions, per_row = codes[~hits], per_row[~hits]
    with _autograd_inside(), torch.enable_grad():
        leaves = [c.detach().requires_grad_() for c in cores]
        rows = lookup_rows(leaves, positions, kernel, None, is_sorted=codes is None)
        grads = torch.autograd.grad(rows, leaves, per_row.to(rows.dtype), allow_unused=True)
    return [torch.zeros_like(c) if g is None else g.to(c.dtype).contiguous() for g, c in zip(grads, cores)] + [exact_grad]


@tt_lookup_backward.register_fake
def _(grad, cores, exact_rows, index_ids, index_codes, ids, num_rows, kernel):
    return [torch.empty_like(c) for c in cores] + [torch.empty_like(exact_rows) if exact_rows is not None
                                                   else grad.new_empty(0)]


@torch.library.custom_op("fpd_convert::tt_products", mutates_args=())
def tt_products(cores: List[torch.Tensor]) -> torch.Tensor:
    """The product of all cores but the first, ``(N_suffix, r_1, D / d_1)``, for lookups without gradients
    (:func:`fpd_convert.kernels.cpu_suffix.suffix_table`): kept between calls and rebuilt only when a core
    changes, as the eager end table is.  A copy is returned: a compiled graph may reuse its outputs' memory."""
    return _state(cores).suffix_products(cores).clone()


@tt_products.register_fake
def _(cores):
    n_suffix = math.prod(int(c.shape[1]) for c in cores[1:])
    return cores[0].new_empty(n_suffix, int(cores[0].shape[3]), _width(cores) // int(cores[0].shape[2]))


@contextlib.contextmanager
def _autograd_inside():
    """Autograd for the ops an operator's own implementation runs: it is called below the autograd
    dispatch keys (``torch.library`` excludes them for the call), which are let back in here so that the
    row contraction of the eager kernels can be differentiated."""
    with contextlib.ExitStack() as stack:
        for key in _AUTOGRAD_KEYS:
            if torch._C._dispatch_tls_is_dispatch_key_excluded(key):
                stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        yield


_AUTOGRAD_KEYS = [getattr(torch._C.DispatchKey, k) for k in ("AutogradFunctionality", "AutogradOther",
                                                            "AutogradNestedTensor", "ADInplaceOrView")
                  if hasattr(torch._C.DispatchKey, k)]


def _setup(ctx, inputs, output):
    cores, exact_rows, index_ids, index_codes, ids, num_rows, kernel = inputs
    ctx.save_for_backward(ids, exact_rows, index_ids, index_codes, *cores)
    ctx.num_rows, ctx.kernel = num_rows, kernel


def _backward(ctx, grad):
    ids, exact_rows, index_ids, index_codes, *cores = ctx.saved_tensors
    grads = torch.ops.fpd_convert.tt_lookup_backward(grad.contiguous(), cores, exact_rows, index_ids, index_codes,
                                                     ids, ctx.num_rows, ctx.kernel)
    return list(grads[:-1]), (grads[-1] if exact_rows is not None else None), None, None, None, None, None


tt_lookup.register_autograd(_backward, setup_context=_setup)

__all__ = ["tt_lookup", "tt_lookup_backward", "tt_products"]
