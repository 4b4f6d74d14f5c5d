"""``report``: size and AUC of the original, compressed and fine-tuned models, and int8."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoints import (CheckpointError, is_compressed, read_compressed_meta, read_source, sha256_of,
                           table_file_keys)
from ..checkpoints.compressed_format import file_tensor_bytes
from ..convert.load import load
from ..devices import resolve_device
from ..outputs import atomic_path, check_output, releases_outputs, write_text
from ..paths import bytes_on_disk, not_a_file
from ..data import CriteoData
from ..training.metrics import evaluate
from .quantize import int8_rowwise, int8_rowwise_bytes
from .tables import format_bytes, markdown_table, render_table, signed


def check_control(original, control) -> None:
    """Refuse a control that is not the original fine-tuned (``finetune --control`` records the original's
    SHA-256 in it)."""
    from safetensors import safe_open
    try:
        with safe_open(str(control), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        meta = {}
    if "fpd_convert_control_of" not in meta:
        raise CheckpointError(f"--control {control}: not a control written by `fpd-convert finetune --control`")
    if meta.get("source_sha256") != sha256_of(Path(original)):
        raise CheckpointError(f"--control {control} was fine-tuned from {meta['fpd_convert_control_of']}, not from "
                              f"{original}")


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
           dense_transform: str = "log", check_source: bool = True, plot=None, force: bool = False,
           device: str = "cpu", control=None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Per table: bytes before/after, ratio, relative error (and int8's bytes); per model:
    bytes, AUC and log loss on ``data`` and the differences from the original.

    A model's ``bytes`` are those of its tensors as written (the original's weights, the compressed
    file's tensors: what ``compress`` reports), ``on_disk`` its file's size (the original's may hold
    optimizer state too).  ``plot``: a PNG to write (checked before any work: never over an input or,
    without ``force``, an existing file).  ``check_source``: refuse compressed files not made from
    ``original``.  ``device``: where the models are evaluated.  ``control``: ``original`` fine-tuned with
    the same schedule as ``finetuned`` (``finetune --control``); the fine-tuned model is then also compared
    with it (``finetuned_vs_control``).  ``log`` gets a line as each model's evaluation starts and ends (each reads
    all of ``data``: minutes on a Criteo day)."""
    dev = resolve_device(device)
    inputs = [original, compressed, finetuned, data, control]
    if plot is not None:
        _pyplot()  # a missing matplotlib is said before the work, not after
        plot = check_output(plot, [p for p in inputs if p is not None], force)
    for path in [compressed] + ([finetuned] if finetuned else []):
        if not is_compressed(path):
            reason = not_a_file(path)
            raise CheckpointError(f"{path}: {reason}" if reason else f"{path}: not a compressed file; COMPRESSED and "
                                  "FINETUNED are files written by `fpd-convert compress` / `finetune`")
    if control is not None and finetuned is None:
        raise ValueError("--control compares a fine-tuned model with the original fine-tuned the same way: give "
                         "FINETUNED too")
    models = {"compressed": load(compressed)}  # validates the file before its metadata is used
    if finetuned:
        models["finetuned"] = load(finetuned)
    if control is not None:
        check_control(original, control)
    src = read_source(original, data=False)  # sizes
    if check_source:
        check_pairing(original, compressed, finetuned)
    meta = read_compressed_meta(compressed)
    runnable = src.layout != "generic"  # a generic state_dict: sizes and errors only, no model to score
    if data and not runnable:
        raise CheckpointError(f"{original}: a generic state_dict has no model for fpd-convert to score, so --data "
                              "cannot give an AUC; without --data, report gives the sizes and errors (score your "
                              "own model with fpd_convert.load_into)")
    base = load(original) if runnable else None
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
    out = {"original": str(original), "layout": src.layout, "compressed": str(compressed),
           "finetuned": str(finetuned) if finetuned else None,
           "control": str(control) if control else None,
           "data": str(data) if data else None, "tables": tables,
           "totals": {"tables_bytes_before": sum(t["bytes_before"] for t in tables),
                      "tables_bytes_after": sum(t["bytes_after"] for t in tables),
                      "tables_int8_bytes": sum(t["int8_bytes"] for t in tables)},
           "models": {}}
    out["totals"]["tables_ratio"] = out["totals"]["tables_bytes_before"] / out["totals"]["tables_bytes_after"]
    rows = [t["rows"] for t in base.architecture["tables"]] if runnable else None
    original_bytes = src.nbytes()
    files = {"original": original, "compressed": compressed, "finetuned": finetuned, "control": control}

    say = log or (lambda text: None)
    count = 1 + len(models) + (control is not None) + int8

    def measure(name: str, m: torch.nn.Module, nbytes: int) -> None:
        entry = {"bytes": nbytes, "ratio": original_bytes / nbytes,
                 "on_disk": bytes_on_disk(files[name]) if name in files else None}
        if data:
            say(f"report: evaluating {name} ({len(out['models']) + 1}/{count}) on {data}")
            start = time.perf_counter()
            m.to(dev)
            entry.update(evaluate(m, CriteoData(data, rows, batch_size, dense_transform, strict, max_rows), dev))
            m.to("cpu")
            say(f"report: {name}: AUC {entry['auc']:.4f} on {entry['n']:,} samples in "
                f"{time.perf_counter() - start:.1f} s")
        out["models"][name] = entry

    # one dense model at a time: the original, then the same model with its tables rounded to int8 in place
    measure("original", base, original_bytes)
    for name, m in models.items():
        measure(name, m, sum(file_tensor_bytes(files[name]).values()))
    del models
    if control is not None:  # a dense model: one at a time, as the original
        ctl = load(control)
        measure("control", ctl, sum(t.numel() * t.element_size() for t in ctl.state_dict().values()))
        del ctl
    if int8:
        if runnable:
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
    if control is not None and data:
        ft, ctl = out["models"]["finetuned"], out["models"]["control"]
        out["finetuned_vs_control"] = {"auc_diff": ft["auc"] - ctl["auc"], "logloss_diff": ft["logloss"] - ctl["logloss"]}
    elif finetuned and data and out["models"]["finetuned"]["auc"] > ref["auc"]:
        out["warnings"].append("the fine-tuned model beats the original: the original may be under-trained; "
                               "the same fine-tuning of the original tells (finetune --control ORIGINAL, then "
                               "report --control)")
    elif not runnable:
        out["warnings"].append("a generic state_dict: sizes and errors only (fpd-convert has no model to score it)")
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


def _model_rows(r: dict):
    rows = []
    for name, m in r["models"].items():
        disk = m.get("on_disk")
        rows.append([name, format_bytes(m["bytes"]), format_bytes(disk) if disk is not None else "-", f"{m['ratio']:.1f}x",
                     f"{m['auc']:.4f}" if "auc" in m else "-", signed(m["auc_diff"]) if "auc_diff" in m else "-",
                     f"{m['logloss']:.4f}" if "logloss" in m else "-",
                     signed(m["logloss_diff"]) if "logloss_diff" in m else "-"])
    return ["model", "tensors", "on disk", "ratio", "AUC", "AUC diff", "logloss", "logloss diff"], rows


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
    vs = r.get("finetuned_vs_control")
    if vs:
        parts.append(textwrap.fill(
            f"finetuned against the control (the original fine-tuned the same way, {r['control']}): AUC "
            f"{signed(vs['auc_diff'])}, logloss {signed(vs['logloss_diff'])}. This, not the diff from the "
            "original, is what the compression cost after fine-tuning.", width=100, subsequent_indent="  "))
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


def plot_points(r: dict) -> list:
    """What the plot shows: per model (name, megabytes, AUC or None, label), the label giving its bytes,
    ratio and AUC difference from the original."""
    points = []
    for name, m in r["models"].items():
        label = f"{name}\n{format_bytes(m['bytes'])}, {m['ratio']:.1f}x"
        if "auc_diff" in m:
            label += f", AUC {signed(m['auc_diff'])}" if name != "original" else f", AUC {m['auc']:.4f}"
        points.append((name, m["bytes"] / 1e6, m.get("auc"), label))
    return points


@releases_outputs
def plot_report(r: dict, path, force: bool = False) -> None:
    """Size against AUC, one labelled point per model (sizes alone as labelled bars without test data),
    written atomically to ``path`` (PNG), never over the report's inputs or, without ``force``, an existing
    file."""
    plt = _pyplot()
    inputs = [r[k] for k in ("original", "compressed", "finetuned", "data", "control") if r.get(k)]
    path = check_output(path, inputs, force)
    points = plot_points(r)
    fig, ax = plt.subplots(figsize=(8, 5))
    if all(auc is not None for _, _, auc, _ in points):
        groups = {}  # models with the same size and AUC (a fine-tune that kept its start) share one label
        for name, mb, auc, label in points:
            groups.setdefault((round(mb, 4), round(auc, 4)), []).append((name, mb, auc, label))
        for i, members in enumerate(sorted(groups.values(), key=lambda g: g[0][1])):
            name, mb, auc, label = members[0]
            if len(members) > 1:
                label = " = ".join(m[0] for m in members) + "\n" + label.split("\n", 1)[1]
            ax.scatter([mb], [auc], s=50, zorder=3)
            ax.annotate(label, (mb, auc), textcoords="offset points", xytext=(6, 8 if i % 2 == 0 else -26),
                        fontsize=8)
        ref = r["models"]["original"]["auc"]
        ax.axhline(ref, color="gray", linewidth=0.8, linestyle="--", zorder=1)
        ax.set_xscale("log")
        from matplotlib.ticker import FuncFormatter
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel("model size, MB of tensors (log scale)")
        ax.set_ylabel("AUC on " + Path(r["data"]).name)
        aucs = [auc for _, _, auc, _ in points]
        pad = max(max(aucs) - min(aucs), 0.002) * 0.5
        ax.set_ylim(min(aucs) - pad, max(aucs) + pad)
        sizes = [mb for _, mb, _, _ in points]
        ax.set_xlim(min(sizes) / 1.6, max(sizes) * 2.5)  # room for the labels right of the points
        ax.set_title("size against AUC (dashed: the original's AUC)")
    else:
        names = [p[0] for p in points]
        bars = ax.barh(names, [p[1] for p in points], color="tab:blue")
        for bar, (_, _, _, label) in zip(bars, points):
            ax.annotate(label.split("\n", 1)[1], (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        textcoords="offset points", xytext=(4, -3), fontsize=8)
        why = "a generic state_dict: sizes only" if r.get("layout") == "generic" else "no test data: give --data for AUC"
        ax.set_xlabel(f"model size, MB of tensors ({why})")
        ax.set_xlim(0, max(p[1] for p in points) * 1.4)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def claim_report_output(path, inputs, force: bool = False) -> Path:
    """Check and claim ``report -o`` before any work (see :func:`fpd_convert.outputs.check_output`)."""
    return check_output(path, [p for p in inputs if p is not None], force)


def write_report(path, text: str) -> Path:
    """Write a claimed report file atomically."""
    return write_text(path, text + "\n", force=True)


def to_json(r: dict) -> str:
    return json.dumps(r, indent=2)
