"""Bags of a 3-core TT table from the batch's entries sorted by id: training with no host sync.

The dedup path (:mod:`fpd_convert.kernels.triton_suffix` behind ``TTEmbeddingBag``) compacts a
batch to its distinct ids: their count sizes the rows it builds, so the host must read it, and
that read waits for all the GPU work queued before it.  It then gathers the rows into the bags
and, in the backward, ``index_add``\\ s the bags' gradients back into rows.  Here the ``N``
entries stay as they are, only sorted by id (``codes``, with ``pos``: each sorted entry's
place in the batch); every buffer is sized by ``N`` or the bag count, which the host knows.

Forward: a program walks a chunk of ``CHUNK`` sorted entries; it builds the row of an id once
per run of that id in the chunk (``G1[i1] S[(i2, i3)]`` from the suffix table ``S``, or an exact
row) and adds it, times the entry's weight, to the entry's bag (relaxed atomic adds: bags may
hold several entries).  Backward: the same walk gathers each entry's bag gradient (times its
weight), sums it over the run and adds the run's contributions once: ``dG1[i1] += g S^T``,
``dS[(i2, i3)] += G1[i1]^T g`` (or ``d exact[k] += g``); ``dG2``, ``dG3`` then come from ``dS``
by two GEMMs.  No gather of rows, no ``index_add``, no compaction, no count on the host.

Entries are given as codes (as :mod:`triton_pooled`): TT position, ``-1 - k`` for exact row
``k``, or ``skip`` (padding, left out).  Bags: ``bag = pos // bag_len`` for a ``(B, L)`` input,
else ``bag_of[pos]`` (-1: after the last offset, left out).  Pooling is ``sum``.

Works under ``TRITON_INTERPRET=1`` on CPU tensors (how the tests check it without a GPU).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .triton_suffix import _shapes, dot_tiles, stacked_core_grads, stacked_tables, supports
from .triton_tt import triton, tl

if triton is not None:
    from .triton_suffix import _code_row, _pair_tile, _row_pt
    from .triton_tt import _accumulate, _digits, _slice_first

    @triton.jit
    def _chunk(E, CH, D1, D2, D3, P1: tl.constexpr, BD2: tl.constexpr, QC: tl.constexpr):
        """This program's sorted entries ``[start, end)``, the row width and a row's tile."""
        start = tl.program_id(0).to(tl.int64) * CH
        offs, mask = _row_pt(D1, D2, D3, P1, BD2, QC)
        return start, tl.minimum(start + CH, E), D1 * D2 * D3, offs, mask

    @triton.jit
    def _entry(s, code_ptr, pos_ptr, bag_ptr, L, SKIP, BY_LEN: tl.constexpr):
        """``(code, pos, bag, keep)`` of sorted entry ``s``: its code, its batch position, its bag
        (-1: none) and whether it counts (not padding, in a bag)."""
        code = tl.load(code_ptr + s).to(tl.int64)
        pos = tl.load(pos_ptr + s).to(tl.int64)
        if BY_LEN:
            bag = pos // L
        else:
            bag = tl.load(bag_ptr + pos).to(tl.int64)
        return code, pos, bag, (code != SKIP) & (bag >= 0)

    @triton.jit
    def _table(code, NT: tl.constexpr):
        """The table of a TT code when the tables are stacked (``t NT + position``; 0 for one table)."""
        return tl.maximum(code, 0) // NT

    @triton.jit
    def _id_major(code, NT: tl.constexpr, N1: tl.constexpr, SM: tl.constexpr):
        """The TT code in id-major order (``t NT + i1 NS + s``, what the row helpers read) of an
        entry's code: itself, or, for suffix-major codes (``SM``: ``t NT + s N1 + i1``), reordered.
        Negative codes (exact rows, padding) are returned as they are."""
        if SM:
            t = tl.maximum(code, 0) // NT
            local = tl.maximum(code, 0) - t * NT
            s = local // N1
            moved = t * NT + (local - s * N1) * (NT // N1) + s
            code = tl.where(code >= 0, moved, code)
        return code

    @triton.jit
    def _suffix_of(code, N1: tl.constexpr):
        """Table and digit pair ``t NS + s`` of a suffix-major TT code; -1 for negative codes."""
        return tl.where(code >= 0, tl.maximum(code, 0) // N1, -1)

    # (a 0-d condition joins a mask through tl.where: `mask & cond` gives an int32 mask in Triton's
    # interpreter, which its atomic adds refuse)

    @triton.jit
    def _entries_fwd_kernel(code_ptr, pos_ptr, bag_ptr, w_ptr, c1, s_ptr, exact_ptr, out_ptr, E, CH, L, SKIP,
                            NT: tl.constexpr, SS: tl.constexpr, N1: tl.constexpr, SM: tl.constexpr,
                            N2: tl.constexpr, N3: tl.constexpr, R1: tl.constexpr,
                            D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
                            BY_LEN: tl.constexpr, HAS_W: tl.constexpr, HAS_EXACT: tl.constexpr,
                            P1: tl.constexpr, Q1: tl.constexpr, BD2: tl.constexpr, QC: tl.constexpr,
                            PREC: tl.constexpr):
        start, end, D, offs, mask = _chunk(E, CH, D1, D2, D3, P1, BD2, QC)
        row = tl.zeros((P1, QC), dtype=tl.float32)
        cur = tl.load(code_ptr + start).to(tl.int64) - 1  # differs from the first code: its row is built
        for s in range(start, end):
            code, pos, bag, keep = _entry(s, code_ptr, pos_ptr, bag_ptr, L, SKIP, BY_LEN)
            if code != cur:  # a new id: its row, once for the run
                cur = code
                safe = _id_major(tl.where(code == SKIP, 0, code), NT, N1, SM)
                row = _code_row(safe, c1, s_ptr + _table(safe, NT) * SS, exact_ptr, offs, mask,
                                N2, N3, R1, D1, D2, D3, HAS_EXACT, P1, Q1, BD2, QC, PREC)
            val = row
            if HAS_W:
                val = row * tl.load(w_ptr + pos).to(tl.float32)
            _accumulate(out_ptr + tl.maximum(bag, 0) * D + offs, val, tl.where(keep, mask, False))

    @triton.jit
    def _flush(acc, code, c1, s_ptr, d1_ptr, ds_ptr, dx_ptr, SKIP, NT: tl.constexpr, SS: tl.constexpr,
               N2: tl.constexpr, N3: tl.constexpr, R1: tl.constexpr,
               D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
               NEED1: tl.constexpr, NEEDS: tl.constexpr, NEEDX: tl.constexpr, HAS_EXACT: tl.constexpr,
               P1: tl.constexpr, Q1: tl.constexpr, BD2: tl.constexpr, QC: tl.constexpr, PREC: tl.constexpr):
        """Adds the gradient contributions of one id, whose summed row gradient is ``acc``."""
        D = D1 * D2 * D3
        offs, mask = _row_pt(D1, D2, D3, P1, BD2, QC)
        p1 = tl.arange(0, P1)
        a = tl.arange(0, Q1)
        valid = code != SKIP
        if HAS_EXACT:
            if NEEDX:
                _accumulate(dx_ptr + tl.maximum(-1 - code, 0) * D + offs, acc, tl.where(valid & (code < 0), mask, False))
        tt = valid & (code >= 0)
        safe = tl.where(tt, code, 0)
        i1, i2, i3 = _digits(safe, N2, N3)  # i1 counts the first cores of the tables before: stacked
        s_offs, s_mask = _pair_tile(i2, i3, N2, R1, D2, D3, Q1, BD2, QC)
        s_offs += _table(safe, NT) * SS
        if NEEDS:
            g1 = _slice_first(c1, i1, R1, D1, P1, Q1)
            _accumulate(ds_ptr + s_offs, tl.dot(tl.trans(g1), acc, input_precision=PREC), tl.where(tt, s_mask, False))
        if NEED1:
            sl = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0)
            _accumulate(d1_ptr + (i1 * D1 + p1[:, None]) * R1 + a[None, :],
                        tl.dot(acc, tl.trans(sl), input_precision=PREC),
                        tl.where(tt, (p1[:, None] < D1) & (a[None, :] < R1), False))

    @triton.jit
    def _ds_part(acc, code, c1, SKIP, N2: tl.constexpr, N3: tl.constexpr, R1: tl.constexpr, D1: tl.constexpr,
                 P1: tl.constexpr, Q1: tl.constexpr, PREC: tl.constexpr):
        """``G1[i1]^T acc``: one id's contribution to its digit pair's ``dS`` as a (Q1, QC) tile
        (zero for exact rows and padding); ``code`` in id-major order."""
        tt = (code != SKIP) & (code >= 0)
        i1, _, _ = _digits(tl.where(tt, code, 0), N2, N3)
        g1 = _slice_first(c1, i1, R1, D1, P1, Q1)
        part = tl.dot(tl.trans(g1), acc, input_precision=PREC)
        return tl.where(tt, part, 0.0)

    @triton.jit
    def _add_ds(ds, code, ds_ptr, SKIP, NT: tl.constexpr, SS: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
                R1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, Q1: tl.constexpr, BD2: tl.constexpr,
                QC: tl.constexpr):
        """``dS[(i2, i3)] += ds`` (atomic) for the digit pair of ``code`` (id-major; nothing for
        exact rows and padding)."""
        tt = (code != SKIP) & (code >= 0)
        safe = tl.where(tt, code, 0)
        _, i2, i3 = _digits(safe, N2, N3)
        s_offs, s_mask = _pair_tile(i2, i3, N2, R1, D2, D3, Q1, BD2, QC)
        _accumulate(ds_ptr + s_offs + _table(safe, NT) * SS, ds, tl.where(tt, s_mask, False))

    @triton.jit
    def _entries_bwd_kernel(code_ptr, pos_ptr, bag_ptr, w_ptr, grad_ptr, c1, s_ptr, d1_ptr, ds_ptr, dx_ptr,
                            E, CH, L, SKIP, NT: tl.constexpr, SS: tl.constexpr, N1: tl.constexpr, SM: tl.constexpr,
                            N2: tl.constexpr, N3: tl.constexpr, R1: tl.constexpr,
                            D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
                            BY_LEN: tl.constexpr, HAS_W: tl.constexpr, HAS_EXACT: tl.constexpr,
                            NEED1: tl.constexpr, NEEDS_ID: tl.constexpr, SM_DS: tl.constexpr, NEEDX: tl.constexpr,
                            P1: tl.constexpr, Q1: tl.constexpr, BD2: tl.constexpr, QC: tl.constexpr,
                            PREC: tl.constexpr):
        """NEEDS_ID: dS added per id (id-major codes); SM_DS: dS summed per run of a digit pair
        (suffix-major codes)."""
        start, end, D, offs, mask = _chunk(E, CH, D1, D2, D3, P1, BD2, QC)
        acc = tl.zeros((P1, QC), dtype=tl.float32)
        # suffix-major codes (SM): the ids of one digit pair are adjacent, so their dS parts are
        # summed here and added once per run of the pair, not once per id
        ds = tl.zeros((Q1, QC), dtype=tl.float32)
        cur = tl.load(code_ptr + start).to(tl.int64)
        for s in range(start, end):
            code, pos, bag, keep = _entry(s, code_ptr, pos_ptr, bag_ptr, L, SKIP, BY_LEN)
            if code != cur:  # the run of ``cur`` ends in this chunk: its contributions, once
                cur_id = _id_major(cur, NT, N1, SM)
                _flush(acc, cur_id, c1, s_ptr, d1_ptr, ds_ptr, dx_ptr, SKIP, NT, SS, N2, N3, R1, D1, D2, D3,
                       NEED1, NEEDS_ID, NEEDX, HAS_EXACT, P1, Q1, BD2, QC, PREC)
                if SM_DS:
                    ds += _ds_part(acc, cur_id, c1, SKIP, N2, N3, R1, D1, P1, Q1, PREC)
                    if _suffix_of(code, N1) != _suffix_of(cur, N1):  # the pair's run ends too
                        _add_ds(ds, cur_id, ds_ptr, SKIP, NT, SS, N2, N3, R1, D2, D3, Q1, BD2, QC)
                        ds = tl.zeros((Q1, QC), dtype=tl.float32)
                acc = tl.zeros((P1, QC), dtype=tl.float32)
                cur = code
            g = tl.load(grad_ptr + tl.maximum(bag, 0) * D + offs, mask=tl.where(keep, mask, False), other=0.0)
            g = g.to(tl.float32)
            if HAS_W:
                g = g * tl.load(w_ptr + pos).to(tl.float32)
            acc += g
        cur_id = _id_major(cur, NT, N1, SM)
        _flush(acc, cur_id, c1, s_ptr, d1_ptr, ds_ptr, dx_ptr, SKIP, NT, SS, N2, N3, R1, D1, D2, D3,
               NEED1, NEEDS_ID, NEEDX, HAS_EXACT, P1, Q1, BD2, QC, PREC)
        if SM_DS:
            ds += _ds_part(acc, cur_id, c1, SKIP, N2, N3, R1, D1, P1, Q1, PREC)
            _add_ds(ds, cur_id, ds_ptr, SKIP, NT, SS, N2, N3, R1, D2, D3, Q1, BD2, QC)


#: sorted entries per program (a run of one id inside a chunk builds its row, and adds its
#: gradient contributions, once) and warps per program; FPD_TT_ENTRIES_LAUNCH="chunk,warps"
CHUNK, WARPS = 8, 2
if os.environ.get("FPD_TT_ENTRIES_LAUNCH"):
    CHUNK, WARPS = (int(v) for v in os.environ["FPD_TT_ENTRIES_LAUNCH"].split(","))
#: entry order of the sorted-entry kernels: "auto" (:func:`order_by_suffix`), "id" or "suffix"
ENTRY_ORDER = os.environ.get("FPD_TT_ENTRY_ORDER", "auto")
#: entries a digit pair at which "auto" sorts suffix-major
SUFFIX_RUN = 4
#: a code no entry has: placeholder of ``skip`` when nothing is skipped
NO_SKIP = -(1 << 62)


class _EntryBags(torch.autograd.Function):
    """Bags of one table (cores as the layer keeps them) or of ``T`` stacked tables (each core
    ``(T, *shape)``, codes ``t NT + position``: one sort, one launch each way for all)."""

    @staticmethod
    def forward(ctx, codes, pos, bag_of, bag_len, bags, weights, skip, suffix_major, c1, c2, c3, exact):
        stacked = c1.dim() == 5
        tables = c1.shape[0] if stacked else 1
        shapes = tuple(c.shape[1:] if stacked else c.shape for c in (c1, c2, c3))
        c1 = c1.contiguous()
        s, m2, m3 = stacked_tables(c2, c3, tables)
        n1, n2, n3, d1, d2, d3, r1, _ = _shapes(shapes)
        out = torch.zeros(bags, d1 * d2 * d3, device=c1.device, dtype=torch.float32)
        e = codes.numel()
        w = weights if weights is not None else c1
        x = exact.contiguous() if exact is not None else c1
        launch = dict(NT=n1 * n2 * n3, SS=s.shape[1] * s.shape[2], N1=n1, SM=bool(suffix_major),
                      N2=n2, N3=n3, R1=r1, D1=d1, D2=d2, D3=d3,
                      BY_LEN=bag_of is None, HAS_W=weights is not None, HAS_EXACT=exact is not None,
                      **dot_tiles(shapes))
        if e and bags:
            _entries_fwd_kernel[(triton.cdiv(e, CHUNK),)](
                codes, pos, bag_of if bag_of is not None else pos, w, c1, s, x, out, e, CHUNK, bag_len or 1, skip,
                **launch, num_warps=WARPS)
        ctx.save_for_backward(codes, pos, bag_of, weights, c1, s, m2, m3, exact)
        ctx.meta = (bag_len, skip, launch, shapes, tables, stacked, (c1.dtype, c2.dtype, c3.dtype))
        return out

    @staticmethod
    def backward(ctx, grad):
        codes, pos, bag_of, weights, c1, s, m2, m3, exact = ctx.saved_tensors
        bag_len, skip, launch, shapes, tables, stacked, dtypes = ctx.meta
        need1, need2, need3, needx = ctx.needs_input_grad[8:12]
        d1 = torch.zeros(c1.shape, device=c1.device, dtype=torch.float32) if need1 else None
        ds = torch.zeros(s.shape, device=s.device, dtype=torch.float32) if (need2 or need3) else None
        dx = torch.zeros(exact.shape, device=c1.device, dtype=torch.float32) if needx else None
        e = codes.numel()
        if e and grad.shape[0] and (need1 or ds is not None or needx):
            _entries_bwd_kernel[(triton.cdiv(e, CHUNK),)](
                codes, pos, bag_of if bag_of is not None else pos, weights if weights is not None else c1,
                grad.float().contiguous(), c1, s, d1 if need1 else s, ds if ds is not None else s,
                dx if needx else s, e, CHUNK, bag_len or 1, skip, NEED1=bool(need1),
                NEEDS_ID=ds is not None and not launch["SM"], SM_DS=ds is not None and launch["SM"],
                NEEDX=bool(needx), **launch, num_warps=WARPS)
        d2, d3 = stacked_core_grads(ds, m2, m3, shapes[1], shapes[2], tables, need2, need3)
        if not stacked:  # one table: the cores' own shapes (dropping the leading 1 is a view)
            d2, d3 = (None if g is None else g.reshape(shape) for g, shape in zip((d2, d3), shapes[1:]))
        grads = [None if g is None else g.to(t) for g, t in zip((d1, d2, d3), dtypes)]
        return (None,) * 8 + (*grads, None if dx is None else dx.to(exact.dtype))


def entry_bags(cores: Sequence[torch.Tensor], codes: torch.Tensor, pos: torch.Tensor, bags: int,
               bag_of: Optional[torch.Tensor] = None, bag_len: Optional[int] = None,
               weights: Optional[torch.Tensor] = None, skip: Optional[int] = None,
               exact_rows: Optional[torch.Tensor] = None, suffix_major: bool = False) -> torch.Tensor:
    """Summed bags ``(bags, d)`` of a 3-core TT table from its entries sorted by id
    (differentiable in the cores and ``exact_rows``; values and gradients as the reference).

    Parameters
    ----------
    cores : the three cores of one table, or of ``T`` tables of one shape stacked
        (``torch.stack``: each ``(T, *core shape)``); then a code ``t NT + p`` is position ``p`` of
        table ``t`` (``NT``: a table's TT positions, the product of its row factors), and the
        bags of all tables are numbered together.
    codes : (N,) the entries' codes, sorted so that equal codes are adjacent: TT position,
        ``-1 - k`` for ``exact_rows[k]`` (one table only), or ``skip`` (padding: left out).
    pos : (N,) each sorted entry's position in the batch.
    bags : the number of bags; ``bag_len``: entries ``[b L, (b + 1) L)`` form bag ``b``, or
        ``bag_of`` (N,): the bag of the entry at each batch position (-1: none).
    weights : (N,) per-sample weights by batch position (no gradient is returned for them).
    suffix_major : the TT codes are in suffix-major order (:func:`suffix_major_codes`), so that
        the ids of one digit pair are adjacent once sorted: the backward then adds ``dS`` once per
        run of a pair in a chunk instead of once per id.

    The caller checks the codes' range (an out-of-range code reads outside the cores).
    """
    per_table = [c[0] for c in cores] if len(cores) == 3 and cores[0].dim() == 5 else cores
    if not supports(per_table):
        raise ValueError("the Triton TT kernels take exactly three float cores")
    if (bag_of is None) == (bag_len is None):
        raise ValueError("give either bag_of or bag_len")
    if exact_rows is not None and per_table is not cores:
        raise ValueError("exact rows are for one table, not stacked tables")
    out = _EntryBags.apply(codes.contiguous(), pos.contiguous(), None if bag_of is None else bag_of.contiguous(),
                           bag_len, bags, None if weights is None else weights.detach().contiguous(),
                           NO_SKIP if skip is None else skip, suffix_major, *cores, exact_rows)
    return out if cores[0].dtype == torch.float32 else out.to(cores[0].dtype)


def order_by_suffix(cores: Sequence[torch.Tensor], entries: int, tables: int = 1) -> bool:
    """Whether to sort a batch's entries suffix-major (``FPD_TT_ENTRY_ORDER``: ``auto``, ``id``,
    ``suffix``): under ``auto``, when the entries average at least :data:`SUFFIX_RUN` a digit pair
    (a long first core over a small suffix table, ``factor_rows(suffix_rows=...)``: ~128 at 512
    suffixes and 65,536 entries), so that their ``dS`` additions can be summed per pair.  The
    balanced 10M-row table has ~1.4 entries a pair: id order, whose runs sum ``dG1`` instead."""
    if ENTRY_ORDER not in ("auto", "id", "suffix"):
        raise ValueError(f"FPD_TT_ENTRY_ORDER should be 'auto', 'id' or 'suffix' but is {ENTRY_ORDER!r}")
    if ENTRY_ORDER != "auto":
        return ENTRY_ORDER == "suffix"
    pairs = cores[1].shape[1] * cores[2].shape[1]
    return entries >= SUFFIX_RUN * tables * pairs


def suffix_major_codes(codes: torch.Tensor, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """TT codes ``t NT + i1 NS + s`` (id-major; ``NS``: the digit pairs) as ``t NT + s N1 + i1``
    (suffix-major); negative codes (exact rows, padding) unchanged.  ``cores``: one table's."""
    n1, ns = cores[0].shape[1], cores[1].shape[1] * cores[2].shape[1]
    nt = n1 * ns
    safe = codes.clamp(min=0)
    table, local = torch.div(safe, nt, rounding_mode="floor"), torch.remainder(safe, nt)
    i1, pair = torch.div(local, ns, rounding_mode="floor"), torch.remainder(local, ns)
    return torch.where(codes >= 0, table * nt + pair * n1 + i1, codes)


__all__ = ["CHUNK", "WARPS", "ENTRY_ORDER", "SUFFIX_RUN", "entry_bags", "order_by_suffix", "suffix_major_codes"]
