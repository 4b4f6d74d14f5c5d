"""Compress, per table, under a byte budget: the candidates the allocation compares, measured as it needs
them, and the chosen one with its tables.

An in-memory table (:class:`MemorySearch`) measures every :data:`COARSE_STEP`-th rung of each layout's rank
ladder, then the rungs around the allocation's choice; a streamed one (:class:`StreamedCandidates`) gets
every candidate from one set of passes over the table.  Either way a candidate is a truncation of its
layout's kept sketch, so the chosen one is the decomposition it was compared by, rebuilt without another
SVD or pass, and measured on the whole evaluation set.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from tqdm import tqdm

from ..tt.allocate import Candidate
from ..tt.core_quant import decode, encode, stored_bytes
from ..tt.decompose import Sketch, first_core_basis, first_unfolding, tt_svd_ladder
from ..tt.importance import top_rows, tt_positions
from ..tt.streaming import stream_sketch
from .candidates import (Layout, LayoutReader, Result, rank_ladder_for, layouts_for, finish, layout_of, make_layout,
                         stream_progress)
from .importance import FidelityOptions, Prepared, gather
from .measure import LayoutEval, candidate_error_sq, layout_eval
from .plan import CANDIDATE_EVAL_ROWS, svd_method

#: TensorLy's randomized SVD defaults (``randomized_svd``'s ``n_oversamples``, ``n_iter``)
TENSORLY_OVERSAMPLES, TENSORLY_POWER_ITERS = 5, 2
#: a streamed table's sketch: this many vectors beyond the ladder's largest first rank (as plain TT-SVD's)
STREAM_OVERSAMPLES = 10


def candidate_sketch(p: Prepared, svd: str, seed: int) -> Optional[Sketch]:
    """The sketch a table's candidates share (each layout starts from the last one's subspace): where the
    plan's SVD is the exact one, :class:`Sketch`'s defaults (a quarter of its cost); where it is TensorLy's
    randomized one (big tables), that SVD's own oversampling and power iterations from a random start."""
    plan = p.plan
    if plan.path != "memory":
        return None
    if svd_method(plan.rows, plan.dim, plan.row_factors, plan.dim_factors, svd) == "truncated_svd":
        return Sketch(seed)
    return Sketch(seed, oversamples=TENSORLY_OVERSAMPLES, power_iters=TENSORLY_POWER_ITERS)


def _candidate(ranks, exact_fraction: float, hot: int, ladder, index: int, nbytes: int, error_sq: float,
               shape_ranks, row_map_rows: int, exact_rows: int) -> Candidate:
    """What the allocation compares of a candidate (bytes, squared weighted error) and what says why it won."""
    return Candidate({"ranks": ranks, "exact_fraction": exact_fraction, "hot": hot, "ladder": ladder, "index": index},
                     nbytes, error_sq, {"ranks": list(shape_ranks), "row_map_rows": row_map_rows,
                                        "exact_rows": exact_rows, "exact_fraction": exact_fraction, "hot_rows": hot})


class StreamedCandidates:
    """A streamed table's candidates, from one set of passes over it: the layout with the most exact rows
    is sketched (:func:`fpd_convert.tt.streaming.stream_sketch`); the layouts with fewer exact rows keep its
    row map and are its table with the rows it keeps apart put back, that sketch with those rows added in
    the same subspace (:meth:`~fpd_convert.tt.streaming.StreamSketch.with_rows_added`).  Every rung of each layout's ladder
    truncates its layout's sketch, which is kept (``Q``, ``n_1 d_1 x w``, and ``B``, ``w x N``) so that the
    chosen candidate is rebuilt without another pass."""

    def __init__(self, p: Prepared, share: int, options: FidelityOptions, seed, svd, power_iters,
                 progress: bool = False, position: int = 0):
        self.p, self.options = p, options
        self.ladder = ladder = rank_ladder_for(p, share, options)
        layouts = sorted(layouts_for(p, options, share), key=lambda fh: -fh[0])  # the most exact rows first
        plan = p.plan
        bar = stream_progress(p, 1, power_iters, progress, position)
        base, reader, base_values = layout_of(p, *layouts[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            sketch = stream_sketch(reader, plan.rows, plan.dim, plan.row_factors, plan.dim_factors,
                                   max(r[1] for r in ladder) + STREAM_OVERSAMPLES, power_iters, seed,
                                   progress=bar.update if isinstance(bar, tqdm) else bar)
        if isinstance(bar, tqdm):
            bar.close()
        del reader
        self.sketches, self.candidates = {}, []
        for fraction, hot in layouts:
            # fewer exact rows, the base's row map: the base's table with the rows it keeps apart and this
            # layout does not put back where the base zeroed them
            exact = np.sort(top_rows(p.importance, int(round(fraction * plan.rows)))) if fraction else base.exact_ids[:0]
            layout = Layout(exact, base.hot_ids)
            back = np.setdiff1d(base.exact_ids, exact)
            sk = sketch if back.size == 0 else sketch.with_rows_added(tt_positions(back, base.hot_ids),
                                                                      gather(p.reader, back))
            exact_values = base_values[np.isin(base.exact_ids, exact)] if exact.size else None
            self.sketches[(fraction, hot)] = (layout, exact_values, sk)
            for i, dec in enumerate(sk.decompositions(ladder)):
                res = finish(dec, layout, exact_values, options, p.method, plan.key,
                             p.candidate_ev(CANDIDATE_EVAL_ROWS))
                self.candidates.append(_candidate(ladder[i], fraction, hot, ladder, i, res.nbytes, res.weighted_sq,
                                                  res.shape.ranks, int(layout.hot_ids.size), int(layout.exact_ids.size)))

    def refine(self, chosen: Candidate) -> int:
        return 0

    def result(self, chosen: Candidate) -> Result:
        """The chosen candidate with its tables, from its layout's sketch (the decomposition it was compared
        by), measured on the whole evaluation set."""
        c = chosen.config
        layout, exact_values, sk = self.sketches[(c["exact_fraction"], c["hot"])]
        res = finish(sk.decompositions([c["ranks"]])[0], layout, exact_values, self.options, self.p.method,
                     self.p.plan.key, self.p.ev)
        res.extra.update(exact_fraction=c["exact_fraction"], hot_rows=c["hot"])
        return _checked(self.p, res, chosen)


#: an in-memory table's search measures every COARSE_STEP-th rung of each layout's ladder first, then the
#: rungs between the chosen one and its measured neighbours (on the demo 38% of the candidates, with a total
#: weighted error 0.04% above measuring every rung; on the fidelity set's Adam model at 200x the same choices)
COARSE_STEP = 4


@dataclass
class _LayoutState:
    fraction: float
    layout: Layout
    basis: np.ndarray  # the first core's basis, n_1 d_1 x (the ladder's largest first rank)
    eval: LayoutEval
    layout_bytes: int  # the row map's and the exact rows' tensors as written


class MemorySearch:
    """An in-memory table's candidates, measured as the allocation needs them: every layout's ladder at every
    :data:`COARSE_STEP`-th rung first (and its largest), then, by :meth:`refine`, the rungs around the one the
    allocation chose.  Per layout it keeps the first core's basis (by the candidates' sketch,
    :func:`candidate_sketch`, each layout starting from the last one's subspace) and its
    evaluation rows, so a rung measured later belongs to the same ladder; candidates are compared on
    :data:`CANDIDATE_EVAL_ROWS` rows of the evaluation set (:func:`fpd_convert.convert.measure.candidate_error_sq`)."""

    def __init__(self, p: Prepared, share: int, options: FidelityOptions, seed, svd):
        self.p, self.options = p, options
        self.ladder = rank_ladder_for(p, share, options)
        plan, ev = p.plan, p.candidate_ev(CANDIDATE_EVAL_ROWS)
        self.method = svd_method(plan.rows, plan.dim, plan.row_factors, plan.dim_factors, svd)
        r_max = max(r[1] for r in self.ladder)
        self.states: List[_LayoutState] = []
        self.measured = {}
        sketch = candidate_sketch(p, svd, seed)  # each layout starts from the last one's subspace
        coarse = sorted({*range(0, len(self.ladder), COARSE_STEP), len(self.ladder) - 1})
        for fraction, hot in sorted(layouts_for(p, options, share), key=lambda fh: (fh[1], fh[0])):
            layout = make_layout(p.importance, int(round(fraction * plan.rows)), hot)
            whole = self._table(layout)
            first = first_unfolding(whole, plan.row_factors, plan.dim_factors)
            basis = first_core_basis(first, r_max, self.method, seed, sketch)
            stored, layout_bytes = None, 4 * layout.hot_ids.size
            if layout.exact_ids.size:
                values = gather(p.reader, layout.exact_ids)
                stored = decode(*encode(torch.from_numpy(values), options.exact_dtype, axis=0), axis=0).numpy()
                layout_bytes += 4 * layout.exact_ids.size + stored_bytes(values.shape, options.exact_dtype, axis=0)
            self.states.append(_LayoutState(fraction, layout, basis,
                                            layout_eval(ev, layout.hot_ids, layout.exact_ids, stored), layout_bytes))
            self._measure(len(self.states) - 1, coarse, whole, first)

    @property
    def candidates(self) -> List[Candidate]:
        return list(self.measured.values())

    def _table(self, layout: Layout) -> np.ndarray:
        p = self.p
        if layout.hot_ids.size or layout.exact_ids.size:
            return LayoutReader(p.reader, p.plan.rows, layout, writable=True)(0, p.plan.rows)
        return p.reader(0, p.plan.rows)

    def _measure(self, at: int, rungs, whole: Optional[np.ndarray] = None, first: Optional[np.ndarray] = None) -> int:
        rungs = [i for i in rungs if 0 <= i < len(self.ladder) and (at, i) not in self.measured]
        if not rungs:
            return 0
        st, plan, dtype = self.states[at], self.p.plan, self.options.core_dtype
        whole = self._table(st.layout) if whole is None else whole
        decs = tt_svd_ladder(whole, plan.row_factors, plan.dim_factors, [self.ladder[i] for i in rungs],
                             basis=st.basis, errors=False, unfolding=first)
        for i, dec in zip(rungs, decs):
            cores = [decode(*encode(torch.from_numpy(np.ascontiguousarray(c)), dtype, axis=1), axis=1).numpy()
                     for c in dec.cores]
            nbytes = st.layout_bytes + sum(stored_bytes(c.shape, dtype, axis=1) for c in cores)
            self.measured[(at, i)] = _candidate(self.ladder[i], st.fraction, int(st.layout.hot_ids.size), self.ladder,
                                                i, nbytes, candidate_error_sq(cores, st.eval), dec.shape.ranks,
                                                int(st.layout.hot_ids.size), int(st.layout.exact_ids.size))
            self.measured[(at, i)].config["layout"] = at
        return len(rungs)

    def refine(self, chosen: Candidate) -> int:
        """Measure the rungs of the chosen candidate's layout within :data:`COARSE_STEP` of it; how many were new."""
        at, i = chosen.config["layout"], chosen.config["index"]
        return self._measure(at, range(i - COARSE_STEP + 1, i + COARSE_STEP))

    def result(self, chosen: Candidate) -> Result:
        """The chosen candidate with its tables: its layout's basis truncated at its ranks (the decomposition it
        was compared by), measured on the whole evaluation set."""
        st, plan = self.states[chosen.config["layout"]], self.p.plan
        dec = tt_svd_ladder(self._table(st.layout), plan.row_factors, plan.dim_factors, [chosen.config["ranks"]],
                            basis=st.basis)[0]
        exact_values = gather(self.p.reader, st.layout.exact_ids) if st.layout.exact_ids.size else None
        res = finish(dec, st.layout, exact_values, self.options, self.p.method, plan.key, self.p.ev)
        res.extra.update(exact_fraction=st.fraction, hot_rows=int(st.layout.hot_ids.size))
        return _checked(self.p, res, chosen)


def table_search(p: Prepared, share: int, options: FidelityOptions, seed, svd, power_iters,
                 progress: bool = False, position: int = 0):
    """A table's candidates around its ``share`` of the budget (layouts x a ladder of ranks):
    :class:`MemorySearch` or :class:`StreamedCandidates`."""
    if p.plan.path == "memory":
        return MemorySearch(p, share, options, seed, svd)
    return StreamedCandidates(p, share, options, seed, svd, power_iters, progress, position)


def _checked(p: Prepared, res: Result, chosen: Candidate) -> Result:
    if res.nbytes != chosen.nbytes:
        raise RuntimeError(f"{p.plan.name}: the chosen TT rebuilt has {res.nbytes:,} B, not the {chosen.nbytes:,} B "
                           "the allocation counted")
    res.extra["candidate_weighted_error"] = math.sqrt(chosen.error)  # as the candidates were compared
    return res
