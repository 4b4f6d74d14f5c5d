"""The serving form of a TT table: what traced CPU inference reads, built when the layer goes to eval mode.

A row is ``G_1[i_1] @ S[s]`` (:mod:`fpd_convert.kernels.cpu_suffix`): ``d_1 x r_1`` by ``r_1 x D/d_1``.
The serving form is the product table ``S`` of all cores but the first, transposed to ``(N_suffix, D/d_1,
r_1)``, so that each of a row's ``D`` entries is a dot product of two contiguous ``r_1``-vectors, a slice
of the first core (``(n_1, d_1, r_1)`` as it is stored) and one of the form: inductor vectorizes the sum
and fuses it with the gathers and the row index's search into the model's loop (demo model, batch 2,048,
2 cores, 2026-12-02: the compiled model 1.18-1.25x the dense one, against 1.5-1.6x with the products' ``r_1``
multiply-adds written out over ``S``, each entry of a row a strided gather of its own, and a product
operator call a table; the form repeated to the row's width, ``d_1`` times the memory, 1.14-1.19x).

It is derived data, the size of the product table that eager inference caches (the end table): built by
``eval()`` (and by ``load_state_dict``, ``to()`` and ``load_table`` in eval mode), dropped by ``train()``,
never saved; at most :data:`MAX_BYTES` a table, else the table has none and its traced lookups take the
lookup operator.  A compiled graph cannot see that a core changed after the form was built: it compares
:data:`PROBES` entries of each core with their values at build time and stops with an error if one
differs (an edit that leaves those entries as they were passes unseen: call ``eval()`` again after
changing cores in eval mode).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch

from ..kernels.cpu_suffix import suffix_table

#: the most bytes a table's serving form may take (the traced lookups' limit, ``traced.IN_GRAPH_MAX_BYTES``)
MAX_BYTES = 16 << 20
#: entries of each core a compiled lookup compares with their values when the form was built
PROBES = 16
_NAMES = ("_serving_products", "_serving_probes")
STALE = ("a TT table's cores changed after its serving form was built (in eval mode, on eval()): call "
         "model.eval() again after changing cores in eval mode")


def form_bytes(cores: List[torch.Tensor]) -> int:
    """Bytes of the serving form of these cores (those of the product table): ``cpu_suffix.table_bytes`` in
    plain loops, which dynamo traces (its generator expression fails under ``fullgraph``)."""
    count, width = 1, 1
    for c in cores[1:]:
        count, width = count * int(c.shape[1]), width * int(c.shape[2])
    return count * int(cores[0].shape[3]) * width * cores[0].element_size()


def products_form(cores: List[torch.Tensor]) -> torch.Tensor:
    """The product of all cores but the first as ``(N_suffix, D/d_1, r_1)``, contiguous."""
    return suffix_table(cores).transpose(1, 2).contiguous()


def _probes(cores: List[torch.Tensor]) -> torch.Tensor:
    """:data:`PROBES` evenly spaced entries of each core (slices only: a graph reads them as views)."""
    return torch.cat([c.reshape(-1)[::max(1, c.numel() // PROBES)][:PROBES] for c in cores])


def eligible(layer) -> bool:
    cores = layer._core_list()
    return (not layer.training and layer.kernel in ("auto", "cpu") and len(cores) >= 2
            and cores[0].device.type == "cpu" and form_bytes(cores) <= MAX_BYTES)


def refresh(layer) -> None:
    """Builds (eval mode, where :func:`eligible`) or drops the layer's serving form."""
    if not eligible(layer):
        for name in _NAMES:
            layer._buffers.pop(name, None)
        return
    with torch.no_grad():
        cores = [c.detach() for c in layer._core_list()]
        for name, value in zip(_NAMES, (products_form(cores), _probes(cores).clone())):
            old = layer._buffers.get(name)
            if old is not None and old.shape == value.shape and old.dtype == value.dtype:
                old.copy_(value)  # the same tensors: a compiled graph keeps reading them
            else:
                layer.register_buffer(name, value, persistent=False)


def after_load(layer, incompatible_keys) -> None:
    """``load_state_dict``'s post hook: the new cores' form (a module-level function, so layers pickle)."""
    refresh(layer)


@contextlib.contextmanager
def hidden(model: torch.nn.Module) -> Iterator[None]:
    """While open, no layer of ``model`` holds a serving form: ``torch.export`` keeps every buffer of a module,
    used or not, so an exported program would carry each table's form beside what its lookups read (the
    portable form, the operator's cores).  The same tensors are put back after."""
    held = []
    for m in model.modules():
        forms = {name: m._buffers.pop(name) for name in _NAMES if m._buffers.get(name) is not None}
        if forms:
            held.append((m, forms))
    try:
        yield
    finally:
        for m, forms in held:
            m._buffers.update(forms)


def current(layer) -> Optional[torch.Tensor]:
    """The layer's serving form for this trace, checked against its cores, or None without one."""
    form = layer._buffers.get("_serving_products")
    if form is None:
        return None
    probes = layer._buffers["_serving_probes"]
    now = _probes(layer._core_list())
    torch._assert_async(((now == probes) | (now.isnan() & probes.isnan())).all(), STALE)
    return form


def rows(first: torch.Tensor, form: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows (N, D) at TT positions from the first core ``(1, n_1, d_1, r_1)`` and the form: entry ``(a, c)``
    of a row is ``G_1[i_1, a, :] . S^T[s, c, :]``."""
    n_s = form.shape[0]
    end = positions // n_s
    lhs, rhs = first[0][end], form[positions - end * n_s]  # (N, d_1, r), (N, D/d_1, r)
    return (lhs[:, :, None, :] * rhs[:, None, :, :]).sum(-1).reshape(positions.numel(), -1)
