"""``compress``: a source checkpoint in, a compressed safetensors file out.

The steps, in order, each a module of this package: choose the tables (:mod:`.selection`), plan
each one (:mod:`.plan`), weigh its rows (:mod:`.importance`), make its candidate TTs
(:mod:`.candidates`), pick one per table under the rank rule or the byte budget
(:mod:`.allocation`), measure what the chosen ones give back (:mod:`.measure`), write the file.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from .. import __version__
from ..checkpoints import (CheckpointError, CompressedMeta, encode_table, is_compressed, read_source, sha256_of,
                           write_compressed)
from ..default_outputs import compressed_output
from ..outputs import check_output, releases_outputs
from .allocation import choose_results
from .importance import FidelityOptions, prepare
from .measure import final_errors
from .plan import (affordable_workers, describe, memory_available, plan_table, planned_peak, with_importance,
                   workers_for_cpus)
from .selection import parse_size, select_tables

logger = logging.getLogger(__name__)

DEFAULT_RANK = 32


@dataclass
class TableSummary:
    key: str
    name: str
    rows: int
    dim: int
    row_factors: List[int]
    dim_factors: List[int]
    ranks: List[int]
    bytes_before: int
    bytes_after: int
    relative_error: float
    svd_path: str = "memory"
    weighted_error: Optional[float] = None
    importance: Optional[str] = None
    hot_rows: int = 0
    exact_rows: int = 0
    core_dtype: str = "float32"
    core_dtype_added: Optional[float] = None
    why: str = ""

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)


@dataclass
class CompressionSummary:
    """What ``compress`` did: per-table figures, skipped tables and model totals."""

    input: str
    output: str
    layout: str
    tables: List[TableSummary]
    skipped: List[str] = field(default_factory=list)
    kept_as_is: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    planned_peak_bytes: int = 0  # the memory plan stated before the work (above the process as it started)
    workers: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        for t, src in zip(d["tables"], self.tables):
            t["ratio"] = src.ratio
        d["tables_bytes_before"] = sum(t.bytes_before for t in self.tables)
        d["tables_bytes_after"] = sum(t.bytes_after for t in self.tables)
        return d

    def format(self) -> str:
        """Two tables (the TT shapes; what each table became) and notes, in 100 columns."""
        import textwrap
        from ..paths import bytes_on_disk
        from ..reporting.tables import format_bytes, render_table
        fid = any(t.importance for t in self.tables)
        shapes = [[t.key, f"{t.rows:,}", t.dim, "x".join(map(str, t.row_factors)), "x".join(map(str, t.dim_factors)),
                   ",".join(map(str, t.ranks[1:-1])), t.svd_path] for t in self.tables]
        out = [render_table(["table", "rows", "dim", "row factors", "dim factors", "ranks", "TT-SVD"], shapes), ""]
        rows = []
        for t in self.tables:
            row = [t.key, format_bytes(t.bytes_before), format_bytes(t.bytes_after), f"{t.ratio:.1f}x",
                   f"{t.relative_error:.4f}"]
            if fid:
                cores = t.core_dtype if t.core_dtype_added is None else f"{t.core_dtype} ({t.core_dtype_added:+.4f})"
                row += [f"{t.weighted_error:.4f}" if t.weighted_error is not None else "", t.importance or "",
                        f"{t.hot_rows:,}/{t.exact_rows:,}", cores]
            rows.append(row)
        before = sum(t.bytes_before for t in self.tables)
        after = sum(t.bytes_after for t in self.tables)
        rows.append(["total", format_bytes(before), format_bytes(after), f"{before / max(after, 1):.1f}x", ""]
                    + ([""] * 4 if fid else []))
        head = ["table", "before", "after", "ratio", "rel. err"]
        if fid:
            head += ["weighted", "importance", "hot/exact", "cores"]
        out.append(render_table(head, rows))
        notes = []  # (each table's ``why`` is logged at INFO: ``compress -v``; in to_dict for --json)
        if fid:
            notes.append("bytes count every tensor of a table (cores, scales, row map, exact rows); rel. err: "
                         "relative error over the rows; weighted: relative error weighted by row importance; hot/exact: "
                         "rows in the row map / kept exactly; cores (+x): weighted error the low-precision cores add")
        on_disk = [bytes_on_disk(f) for f in (self.input, self.output)]
        notes.append(f"model: {self.input} {format_bytes(on_disk[0])} on disk ({format_bytes(self.model_bytes_before)} "
                     f"of tensors) -> {self.output} {format_bytes(on_disk[1])} ({format_bytes(self.model_bytes_after)} of "
                     f"tensors; {on_disk[0] / max(on_disk[1], 1):.1f}x "
                     f"on disk, {self.model_bytes_before / max(self.model_bytes_after, 1):.1f}x in tensors)")
        notes += [f"skipped: {s}" for s in self.skipped] + [f"kept as it is: {s}" for s in self.kept_as_is]
        notes += [f"not carried over: {s}" for s in self.dropped]
        for note in notes:
            out.append(textwrap.fill(note, width=100, subsequent_indent="  ", break_on_hyphens=False))
        return "\n".join(out)


def check_ranks_rule(rank, ratio, budget, tol) -> None:
    """Refuse more than one rank rule, and values that cannot be met (in the options' words)."""
    given = [name for name, v in (("--rank", rank), ("--ratio", ratio), ("--budget", budget), ("--tol", tol))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of --rank, --ratio, --budget and --tol (rank=, ratio=, budget=, tol=) "
                         f"but got {' and '.join(given)}")
    if ratio is not None and not (math.isfinite(ratio) and ratio > 1):
        raise ValueError(f"--ratio should be a finite number above 1 (dense bytes / compressed bytes) but got {ratio}")
    if tol is not None and not (math.isfinite(tol) and 0 < tol < 1):
        raise ValueError(f"--tol should be a relative error between 0 and 1 (exclusive) but got {tol}")
    ranks = [rank] if isinstance(rank, int) else list(rank or [])
    if any(int(r) < 1 for r in ranks):
        raise ValueError(f"--rank should be positive integers but got {rank}")
    if budget is not None:
        parse_size(budget)


def _counts(src, chosen, data, data_rows) -> dict:
    """Lookup counts per chosen table key from a data sample (one feature per table, in order)."""
    if src.architecture is None:
        raise CheckpointError("--data needs a DLRM layout (dlrm or torchrec) to know which feature feeds which "
                              "table; use --importance norm or drift for generic files")
    from ..data.frequency import lookup_counts
    tables = src.architecture["tables"]
    counts = lookup_counts(data, [t["rows"] for t in tables], max_rows=data_rows)
    by_key = {t["key"]: c for t, c in zip(tables, counts)}
    return {t["key"]: by_key[t["key"]] for t in chosen}


@releases_outputs
def compress(model: Union[str, Path], output: Union[str, Path, None] = None, tables: Optional[Sequence[str]] = None,
             min_rows: Optional[int] = None, num_largest: int = 5, rank: Union[int, Sequence[int], None] = None,
             ratio: Optional[float] = None, budget: Union[str, int, None] = None, tol: Optional[float] = None,
             order: int = 3, svd: str = "auto", layout: Optional[str] = None, force: bool = False,
             allow_unsafe_pickle: bool = False, progress: bool = True, seed: int = 0,
             keep_larger: bool = False, svd_path: str = "auto", workers: int = 1, power_iters: int = 1,
             log: Optional[Callable[[str], None]] = None, fidelity: Optional[FidelityOptions] = None,
             data: Union[str, Path, None] = None, data_rows: Optional[int] = 1_000_000,
             dim_factors: Optional[Sequence[int]] = None, suffix_rows: Union[str, int, None] = "auto",
             optimizer_state: Union[str, Path, None] = None) -> CompressionSummary:
    """Replace the chosen tables of ``model`` by TT cores (TT-SVD) and write ``output`` (default: beside
    ``model``, ``model.pt`` -> ``model.tt.safetensors``).

    Ranks: one of ``rank`` (int or list), ``ratio`` (per table), ``budget`` (total bytes of the
    compressed tables, e.g. ``"3GB"``, shared in proportion to table size) or ``tol`` (relative
    error per table); none given means ``rank=32``.  A table whose TT would not be smaller than
    the dense table is left dense and listed as skipped (``keep_larger=True`` keeps it anyway,
    which is useful to check a full-rank round trip).

    ``svd_path``: ``memory`` (TensorLy), ``stream`` (row chunks, for tables that do not fit)
    or ``auto`` (by size); ``workers`` tables are decomposed at once when memory allows.
    ``dim_factors`` (e.g. ``[2, 4, 8]``) replaces the most balanced factorization of the tables'
    dim, for every chosen table; their count sets the order.  ``suffix_rows`` picks the row
    factors: ``"auto"`` (default) the smallest suffix whose TT is no larger than the balanced one
    at the same ranks (:mod:`fpd_convert.tt.layout`; balanced with ``tol``), ``"balanced"``, or an
    int (e.g. 512) that fixes the product of the trailing row factors and gives the first factor
    the rest (:func:`fpd_convert.tt.factor_rows`).  A long first core keeps CPU lookups in cache
    at the same AUC (docs/benchmarks.md).
    ``log`` receives the plan (expected memory) before the work starts, and a line per big tensor read
    from a DCP folder.

    ``fidelity`` (importance-aware compression, see :mod:`.allocation`; default
    ``FidelityOptions()``: importance from ``data`` if given, else from the optimizer's state where
    there is one, else from row norms): row importance from ``data`` (lookup counts in its first
    ``data_rows`` samples), the optimizer's state (in the checkpoint, or ``optimizer_state``: a file
    of it saved apart, such as TorchRec's ``KeyedOptimizer.state_dict()``) or the weights, a
    hot-row map, exact rows, low-precision cores; ``budget``/``ratio`` then count every byte of
    the tables and are spread over the tables by error reduction per byte.
    ``FidelityOptions("none")``: plain TT-SVD in natural row order, ``budget`` split in
    proportion to table size, ``ratio`` per table.
    """
    model = Path(model)
    output = compressed_output(model) if output is None else Path(output)
    check_ranks_rule(rank, ratio, budget, tol)
    check_output(output, [model], force)
    if workers < 1:
        raise ValueError(f"--workers should be >= 1 but got {workers}")
    fidelity = fidelity if fidelity is not None else FidelityOptions()
    if data is not None and fidelity.importance == "none":
        raise ValueError("--data gives row importance; it needs an importance other than 'none'")
    if model.suffix == ".safetensors" and model.is_file() and is_compressed(model):
        raise CheckpointError(f"{model}: already compressed (written by fpd-convert); compress takes the original "
                              "model (decompress gives it back)")
    src = read_source(model, allow_unsafe=allow_unsafe_pickle, layout=layout, log=log)
    if optimizer_state is not None:  # saved apart from the model (TorchRec's KeyedOptimizer, a torch.optim state)
        from ..checkpoints.source import read_optimizer_state
        src.optimizer_accumulators = read_optimizer_state(optimizer_state, src, allow_unsafe_pickle)

    counts_of, counts_from = None, "data"
    if data is not None:
        counts_of = lambda chosen: _counts(src, chosen, data, data_rows)  # noqa: E731
    elif fidelity.importance in ("auto", "optimizer") and src.optimizer_accumulators:
        counts_of, counts_from = lambda chosen: _accumulated(src, chosen), "optimizer"  # noqa: E731
    done = compress_tables(src.tables(), src.state, src.mapped, tables=tables, min_rows=min_rows,
                           num_largest=num_largest, rank=rank, ratio=ratio, budget=budget, tol=tol, order=order,
                           svd=svd, svd_path=svd_path, workers=workers, power_iters=power_iters, seed=seed,
                           fidelity=fidelity, counts_of=counts_of, counts_from=counts_from, dim_factors=dim_factors,
                           suffix_rows=suffix_rows, keep_larger=keep_larger, progress=progress, log=log,
                           source=str(model))
    # 7. write
    tensors, tt_tables = dict(src.state), {}
    for t, res in done.compressed:
        del tensors[t["key"]]
        tensors.update(encode_table(t["key"], res.entry_for_file, res.table))
        tt_tables[t["key"]] = res.entry_for_file
    if not tt_tables:
        raise CheckpointError("no table got smaller with these ranks; choose a lower --rank or a --ratio")
    meta = CompressedMeta(source_layout=src.layout, tt_tables=tt_tables, architecture=src.architecture,
                          source_container=src.container, source_prefix=src.prefix,
                          source_sha256=sha256_of(model), source_name=model.name, tool_version=__version__,
                          extras=src.extras, optimizer_param_groups=src.optimizer_param_groups,
                          state_keys=list(src.state))
    write_compressed(output, tensors, meta, mapped_source=src.mapped)
    kept = [f"{t['name']} ({t['kind']} table)" for t in src.tables() if t.get("kind", "dense") != "dense"]
    return CompressionSummary(str(model), str(output), src.layout, done.summaries, done.skipped, kept, src.dropped,
                              src.nbytes(), sum(v.numel() * v.element_size() for v in tensors.values()),
                              done.planned_peak_bytes, done.workers)


@dataclass
class Compressed:
    """What :func:`compress_tables` made: per compressed table its spec and result (``result.table``: the
    decoded tensors, ``result.entry_for_file``: its file entry), the summaries, and the tables left
    dense because their TT was not smaller."""

    compressed: list
    summaries: List[TableSummary]
    skipped: List[str]
    planned_peak_bytes: int = 0
    workers: int = 1


def _accumulated(src, chosen, chunk_rows: int = 1 << 16) -> dict:
    """Per chosen table key, its rows' sums of the optimizer's squared-gradient accumulator (chunked: the
    accumulator may be a mapped tensor as big as the table)."""
    out = {}
    for t in chosen:
        acc = src.optimizer_accumulators.get(t["key"])
        if acc is not None:
            out[t["key"]] = torch.cat([acc[i:i + chunk_rows].double().sum(dim=1)
                                       for i in range(0, acc.shape[0], chunk_rows)]).numpy()
    return out


def compress_tables(specs: List[dict], state, mapped: bool = False, tables: Optional[Sequence[str]] = None,
                    min_rows: Optional[int] = None, num_largest: int = 5, rank=None, ratio: Optional[float] = None,
                    budget=None, tol: Optional[float] = None, order: int = 3, svd: str = "auto",
                    svd_path: str = "auto", workers: int = 1, power_iters: int = 1, seed: int = 0,
                    fidelity: Optional[FidelityOptions] = None, counts_of=None, counts_from: str = "data",
                    dim_factors=None,
                    suffix_rows="auto", keep_larger: bool = False, progress: bool = True,
                    log: Optional[Callable[[str], None]] = None, source: str = "the model") -> Compressed:
    """Steps 1-6 of :func:`compress` on tables held in memory (or mapped): ``specs`` as
    ``Source.tables()`` gives them (``key``, ``name``, ``rows``, ``dim``, ``kind``), ``state[key]`` each
    table's weight; ``counts_of(chosen)`` the lookup counts per chosen key, if any.  What
    ``fpd_convert.torchrec.compress_module`` runs on a live model."""
    check_ranks_rule(rank, ratio, budget, tol)
    if rank is None and ratio is None and budget is None and tol is None:
        rank = DEFAULT_RANK
    fidelity = fidelity if fidelity is not None else FidelityOptions()
    # 1. choose the tables
    chosen = select_tables(specs, tables, min_rows, num_largest)
    if not chosen:
        raise CheckpointError(f"{source}: no table matches the selection; `fpd-convert inspect` lists them")
    weights = [state[t["key"]] for t in chosen]
    # 2. plan each table: shape, ranks, TT-SVD path, memory
    budget_bytes = parse_size(budget) if budget is not None else None
    plans = plan_tables(chosen, order, rank, ratio, budget_bytes, tol, svd_path, dim_factors, suffix_rows)
    if fidelity.importance != "none":
        with_importance(plans)
    available = memory_available()
    cpus = torch.get_num_threads()
    workers, note = workers_for_cpus(affordable_workers(plans, workers, available), cpus)
    if log is not None:
        log(describe(plans, workers, available, note))
    # 3. row importance of each table (none for plain TT-SVD)
    counts = counts_of(chosen) if counts_of is not None else {}
    prepared = [prepare(plan, w, mapped, fidelity, counts.get(plan.key), counts_from) for plan, w in zip(plans, weights)]
    # 4. candidates and 5. the allocation: the plans' ranks, or the best TTs under the byte budget
    total_budget = None
    if fidelity.importance != "none":  # plain TT-SVD keeps the plans' ranks (ratio per table, budget by size)
        total_budget = budget_bytes if budget_bytes is not None else (
            None if ratio is None else int(sum(w.numel() * w.element_size() for w in weights) / ratio))
    torch.set_num_threads(max(1, cpus // workers))  # the workers share the CPU threads
    try:
        results = choose_results(prepared, fidelity, total_budget, tol, seed, svd, power_iters, progress, workers)
    finally:
        torch.set_num_threads(cpus)
    # 6. measure what each chosen TT gives back
    done = Compressed([], [], [], planned_peak(plans, workers), workers)
    for t, p, weight, res in zip(chosen, prepared, weights, results):
        before = weight.numel() * weight.element_size()
        if res.nbytes >= before and not keep_larger:
            done.skipped.append(f"{t['name']}: a TT of ranks {res.shape.ranks} ({res.nbytes:,} B) is not smaller "
                                f"than the table ({before:,} B)")
            continue
        final_errors(res, p.reader, p.plan.rows)
        entry = res.shape.to_dict()
        entry.update(padding=res.shape.padded_rows - res.shape.num_rows, relative_error=res.plain_error,
                     source_dtype=str(weight.dtype).replace("torch.", ""), svd_path=p.plan.path, **res.entry,
                     weighted_error=res.weighted_error, tt_error=res.tt_error)
        res.entry_for_file = entry
        done.compressed.append((t, res))
        done.summaries.append(TableSummary(t["key"], t["name"], t["rows"], t["dim"], res.shape.row_factors,
                                           res.shape.dim_factors, res.shape.ranks, before, res.nbytes,
                                           res.plain_error, p.plan.path, weighted_error=res.weighted_error,
                                           importance=None if p.method == "none" else p.method,
                                           hot_rows=res.entry["row_map_rows"], exact_rows=res.entry["exact_rows"],
                                           core_dtype=res.entry["core_dtype"],
                                           core_dtype_added=res.entry.get("core_dtype_added_weighted_error"),
                                           why=res.extra.get("why", "")))
        if res.extra.get("why"):
            logger.info("%s: %s", t["key"], res.extra["why"])  # -v: why this table got these bytes
    return done


def plan_tables(chosen, order, rank, ratio, budget_bytes, tol, svd_path, dim_factors, suffix_rows) -> list:
    """Step 2: one plan per chosen table; a budget is shared in proportion to the tables' sizes."""
    total = sum(t["rows"] * t["dim"] for t in chosen)
    available = memory_available()
    plans = []
    for t in chosen:
        try:
            plans.append(plan_table(t["key"], t["name"], t["rows"], t["dim"], order, rank=rank, ratio=ratio, tol=tol,
                                    budget_bytes=None if budget_bytes is None else
                                    int(budget_bytes * t["rows"] * t["dim"] / total),
                                    svd_path=svd_path, available=available, dim_factors=dim_factors,
                                    suffix_rows=suffix_rows))
        except ValueError as e:
            raise ValueError(f"table {t['name']} ({t['rows']:,} x {t['dim']}): {e}; leave it out (--tables, "
                             "--min-rows, --num-largest) or ask for fewer bytes less sharply") from None
    return plans
