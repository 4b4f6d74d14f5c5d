"""``report``: size and AUC of the original, compressed and fine-tuned models, and int8."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..checkpoints import (CheckpointError, is_compressed, read_compressed_meta, read_source, sha256_of,
                           table_file_keys)
from ..checkpoints.compressed_format import file_tensor_bytes
from ..convert.load import load
from ..outputs import atomic_path, check_output, releases_outputs
from ..paths import not_a_file
from ..data import CriteoData
from ..training.metrics import evaluate
from .quantize import int8_rowwise, int8_rowwise_bytes
from .tables import format_bytes, markdown_table, render_table


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def check_pairing(original, compressed, finetuned=None) -> None:
    """Refuse a COMPRESSED (or FINETUNED) file that was not made from ORIGINAL: each compressed file
    records its source's SHA-256 (``source_sha256``)."""
    want = sha256_of(Path(original))
    for path in [compressed] + ([finetuned] if finetuned else []):
        meta = read_compressed_meta(path)
        if meta.source_sha256 and meta.source_sha256 != want:
            raise CheckpointError(
                f"{path} was made from {meta.source_name or 'another file'} (sha256 {meta.source_sha256[:12]}...), "
                f"not from {original} (sha256 {want[:12]}...); compare a compressed model with its own original, "
                "or pass --skip-source-check (check_source=False) to compare them anyway")


@releases_outputs
def report(original, compressed, finetuned=None, data=None, batch_size: int = 8192,
           max_rows: Optional[int] = None, int8: bool = True, strict: bool = False,
           dense_transform: str = "log", check_source: bool = True, plot=None, force: bool = False) -> dict:
    """Per table: bytes before/after, ratio, relative error (and int8's bytes); per model:
    bytes, AUC and log loss on ``data`` and the differences from the original.

    ``plot``: a PNG to write (checked before any work: never over an input or, without ``force``,
    an existing file).  ``check_source``: refuse compressed files not made from ``original``."""
    inputs = [original, compressed, finetuned, data]
    if plot is not None:
        _pyplot()  # a missing matplotlib is said before the work, not after
        plot = check_output(plot, [p for p in inputs if p is not None], force)
    for path in [compressed] + ([finetuned] if finetuned else []):
        if not is_compressed(path):
            reason = not_a_file(path)
            raise CheckpointError(f"{path}: {reason}" if reason else f"{path}: not a compressed file; COMPRESSED and "
                                  "FINETUNED are files written by `fpd-convert compress` / `finetune`")
    models = {"compressed": load(compressed)}  # validates the file before its metadata is used
    if finetuned:
        models["finetuned"] = load(finetuned)
    src = read_source(original)
    if check_source:
        check_pairing(original, compressed, finetuned)
    meta = read_compressed_meta(compressed)
    base = load(original)
    tables = []
    stored = file_tensor_bytes(compressed)
    for key, e in meta.tt_tables.items():
        before = src.state[key].numel() * src.state[key].element_size()
        after = sum(stored[k] for k in table_file_keys(key, e))  # every byte: cores, scales, row map, exact rows
        tables.append({"key": key, "rows": e["num_rows"], "dim": e["dim"], "ranks": e["ranks"],
                       "bytes_before": before, "bytes_after": after, "ratio": before / after,
                       "relative_error": e["relative_error"], "weighted_error": e.get("weighted_error"),
                       "importance": e.get("importance"), "row_map_rows": e.get("row_map_rows", 0),
                       "exact_rows": e.get("exact_rows", 0), "core_dtype": e.get("core_dtype", "float32"),
                       "int8_bytes": int8_rowwise_bytes(e["num_rows"], e["dim"])})
    out = {"original": str(original), "compressed": str(compressed), "finetuned": str(finetuned) if finetuned else None,
           "data": str(data) if data else None, "tables": tables,
           "totals": {"tables_bytes_before": sum(t["bytes_before"] for t in tables),
                      "tables_bytes_after": sum(t["bytes_after"] for t in tables),
                      "tables_int8_bytes": sum(t["int8_bytes"] for t in tables)},
           "models": {}}
    out["totals"]["tables_ratio"] = out["totals"]["tables_bytes_before"] / out["totals"]["tables_bytes_after"]
    rows = [t["rows"] for t in base.architecture["tables"]]
    original_bytes = _model_bytes(base)

    def measure(name: str, m: torch.nn.Module, nbytes: int) -> None:
        entry = {"bytes": nbytes, "ratio": original_bytes / nbytes}
        if data:
            entry.update(evaluate(m, CriteoData(data, rows, batch_size, dense_transform, strict, max_rows)))
        out["models"][name] = entry

    # one dense model at a time: the original, then the same model with its tables rounded to int8 in place
    measure("original", base, original_bytes)
    for name, m in models.items():
        measure(name, m, _model_bytes(m))
    if int8:
        state = base.state_dict()
        with torch.no_grad():
            for key in meta.tt_tables:
                int8_rowwise(state[key], out=state[key])
        measure("int8_rowwise", base, original_bytes - sum(t["bytes_before"] - t["int8_bytes"] for t in tables))
    del base
    out["warnings"] = []
    if data:
        ref = out["models"]["original"]
        for entry in out["models"].values():
            entry["auc_diff"] = entry["auc"] - ref["auc"]
            entry["logloss_diff"] = entry["logloss"] - ref["logloss"]
        out["warnings"] += sample_warnings(ref)
    if finetuned and data and out["models"]["finetuned"]["auc"] > ref["auc"]:
        out["warnings"].append("the fine-tuned model beats the original: the original may be under-trained (the "
                               "same fine-tuning of the original would tell; see docs/commands.md)")
    elif not data:
        out["warnings"].append("no --data: sizes only; give test data (--data FILE) for AUC and logloss")
    if plot is not None:
        plot_report(out, plot, force=force)
    return out


SMALL_TEST_SET = 10_000  # below this many samples, AUC differences of 0.001 are within the noise


def sample_warnings(m: dict) -> list:
    """What makes a test set's AUC untrustworthy: one class only (AUC undefined), or few samples."""
    out = []
    n, ctr = m.get("n", 0), m.get("ctr")
    if ctr is not None and ctr in (0.0, 1.0):
        out.append(f"the test data has only {'positive' if ctr else 'negative'} samples: AUC is undefined")
    elif n < SMALL_TEST_SET:
        out.append(f"the test data has {n:,} samples: AUC differences below ~{1 / n ** 0.5:.3f} are within its noise")
    return out


def _signed(x: float) -> str:
    """``+0.0012``; a difference that rounds to zero is ``+0.0000``, never ``-0.0000``."""
    v = round(float(x), 4)
    return f"{v if v != 0 else 0.0:+.4f}"


def _model_rows(r: dict):
    rows = []
    for name, m in r["models"].items():
        rows.append([name, format_bytes(m["bytes"]), f"{m['ratio']:.1f}x",
                     f"{m['auc']:.4f}" if "auc" in m else "-", _signed(m["auc_diff"]) if "auc_diff" in m else "-",
                     f"{m['logloss']:.4f}" if "logloss" in m else "-",
                     _signed(m["logloss_diff"]) if "logloss_diff" in m else "-"])
    return ["model", "bytes", "ratio", "AUC", "AUC diff", "logloss", "logloss diff"], rows


def _table_rows(r: dict):
    """Two tables: the TT tables' shapes, and their bytes and errors (100 columns)."""
    def weighted(t):
        w = t.get("weighted_error")
        return f"{w:.4f} ({t['importance']})" if w is not None else "-"

    shapes = [[t["key"], f"{t['rows']:,}", t["dim"], ",".join(map(str, t["ranks"][1:-1])),
               f"{t.get('row_map_rows', 0):,}/{t.get('exact_rows', 0):,}", t.get("core_dtype", "float32")]
              for t in r["tables"]]
    sizes = [[t["key"], format_bytes(t["bytes_before"]), format_bytes(t["bytes_after"]), f"{t['ratio']:.1f}x",
              f"{t['relative_error']:.4f}", weighted(t), format_bytes(t["int8_bytes"])] for t in r["tables"]]
    tot = r["totals"]
    sizes.append(["total", format_bytes(tot["tables_bytes_before"]), format_bytes(tot["tables_bytes_after"]),
                  f"{tot['tables_ratio']:.1f}x", "", "", format_bytes(tot["tables_int8_bytes"])])
    return ((["table", "rows", "dim", "ranks", "hot/exact rows", "cores"], shapes),
            (["table", "before", "TT", "ratio", "rel. error", "weighted error", "int8 row-wise"], sizes))


def format_report(r: dict, markdown: bool = False) -> str:
    import textwrap
    fmt = markdown_table if markdown else render_table
    shapes, sizes = _table_rows(r)
    parts = [fmt(*shapes), "", fmt(*sizes), "", fmt(*_model_rows(r))]
    if r["data"]:
        parts.append("\n" + textwrap.fill(
            f"AUC and logloss on {r['data']} ({next(iter(r['models'].values()))['n']:,} samples). 'compressed' is the "
            "AUC before fine-tuning: the gap fine-tuning still has to recover.", width=100))
    parts += [textwrap.fill(f"Warning: {w}", width=100, subsequent_indent="  ") for w in r.get("warnings", [])]
    return "\n".join(parts)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


@releases_outputs
def plot_report(r: dict, path, force: bool = False) -> None:
    """Bars of model sizes and AUCs, written atomically to ``path`` (PNG), never over the report's
    inputs or, without ``force``, an existing file."""
    plt = _pyplot()
    inputs = [r[k] for k in ("original", "compressed", "finetuned", "data") if r.get(k)]
    path = check_output(path, inputs, force)
    names = list(r["models"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(names, [r["models"][n]["bytes"] / 1e6 for n in names], color="tab:blue")
    axes[0].set_ylabel("model size (MB)")
    axes[0].set_title("size")
    if "auc" in r["models"][names[0]]:
        aucs = [r["models"][n]["auc"] for n in names]
        axes[1].bar(names, aucs, color="tab:green")
        lo = min(aucs)
        axes[1].set_ylim(lo - 0.02, max(aucs) + 0.005)
        axes[1].set_ylabel("AUC")
        axes[1].set_title("AUC on " + Path(r["data"]).name)
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def to_json(r: dict) -> str:
    return json.dumps(r, indent=2)
