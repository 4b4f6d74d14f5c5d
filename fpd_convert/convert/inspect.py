"""``inspect``: what a source checkpoint or a compressed file holds."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from ..checkpoints import is_compressed, read_compressed, read_source, table_file_keys
from ..reporting.tables import format_bytes, render_table


def inspect(path: Union[str, Path], allow_unsafe_pickle: bool = False) -> dict:
    """A JSON-able description: layout, architecture, tables by size (TT details if compressed)."""
    path = Path(path)
    if path.suffix == ".safetensors" and is_compressed(path):
        tensors, meta = read_compressed(path)
        tables = []
        for key, e in meta.tt_tables.items():
            after = sum(tensors[k].numel() * tensors[k].element_size() for k in table_file_keys(key, e))
            source_dtype = getattr(torch, e.get("source_dtype", "float32"), torch.float32)
            before = e["num_rows"] * e["dim"] * torch.tensor([], dtype=source_dtype).element_size()
            tables.append({"key": key, "rows": e["num_rows"], "dim": e["dim"], "kind": "tt",
                           "row_factors": e["row_factors"], "dim_factors": e["dim_factors"], "ranks": e["ranks"],
                           "bytes": after, "dense_bytes": before, "ratio": before / after,
                           "relative_error": e["relative_error"], "weighted_error": e.get("weighted_error"),
                           "features": e.get("features", []), "core_dtype": e.get("core_dtype", "float32"),
                           "row_map_rows": e.get("row_map_rows", 0), "exact_rows": e.get("exact_rows", 0)})
        arch = meta.architecture
        if arch:
            tt_keys = set(meta.tt_tables)
            for t in arch["tables"]:
                if t["key"] not in tt_keys:
                    tables.append({"key": t["key"], "rows": t["rows"], "dim": t["dim"], "kind": t.get("kind", "dense"),
                                   "bytes": sum(v.numel() * v.element_size() for k, v in tensors.items()
                                                if k == t["key"] or k.startswith(t["key"] + "."))})
        return {"path": str(path), "compressed": True, "format_version": meta.format_version,
                "tool_version": meta.tool_version, "layout": meta.source_layout, "source_name": meta.source_name,
                "source_sha256": meta.source_sha256, "architecture": _arch_summary(arch),
                "tables": sorted(tables, key=lambda t: -t["bytes"]),
                "total_bytes": sum(v.numel() * v.element_size() for v in tensors.values())}
    src = read_source(path, allow_unsafe=allow_unsafe_pickle, data=False)
    tables = [{"key": t["key"], "name": t["name"], "rows": t["rows"], "dim": t["dim"], "kind": t.get("kind", "dense"),
               "bytes": sum(v.numel() * v.element_size() for k, v in src.state.items()
                            if k == t["key"] or k.startswith(t["key"] + ".")),
               **({"named_as_table": t["named_as_table"]} if "named_as_table" in t else {})} for t in src.tables()]
    return {"path": str(path), "compressed": False, "layout": src.layout, "container": src.container,
            "prefix": src.prefix, "architecture": _arch_summary(src.architecture),
            "tables": sorted(tables, key=lambda t: -t["bytes"]), "total_bytes": src.nbytes(), "extras": src.extras}


def _arch_summary(arch):
    if not arch:
        return None
    out = {k: v for k, v in arch.items() if k != "tables"}
    out["num_tables"] = len(arch["tables"])
    return out


def format_inspect(info: dict) -> str:
    lines = [f"{info['path']}: {'compressed (format v%s), ' % info['format_version'] if info['compressed'] else ''}"
             f"layout {info['layout']}, {format_bytes(info['total_bytes'])}"]
    arch = info.get("architecture")
    if arch:
        desc = f"{arch['family']} {arch['variant']}, {arch['num_tables']} tables of dim {arch['embedding_dim']}, " \
               f"bottom {arch['bottom']}, top {arch['top']}"
        lines.append("architecture: " + desc)
    rows = []
    for t in info["tables"]:
        tt = ""
        if t["kind"] == "tt":
            tt = (f"{'x'.join(map(str, t['row_factors']))} / {'x'.join(map(str, t['dim_factors']))} / "
                  f"r={','.join(map(str, t['ranks'][1:-1]))}, {t['ratio']:.1f}x, err {t['relative_error']:.4f}")
            if t.get("weighted_error") is not None:
                tt += f" (weighted {t['weighted_error']:.4f})"
            extras = [f"map {t['row_map_rows']:,}" if t.get("row_map_rows") else "",
                      f"exact {t['exact_rows']:,}" if t.get("exact_rows") else "",
                      t["core_dtype"] if t.get("core_dtype", "float32") != "float32" else ""]
            if any(extras):
                tt += ", " + ", ".join(e for e in extras if e)
        rows.append([t.get("name", t["key"]), f"{t['rows']:,}", t["dim"], t["kind"], format_bytes(t["bytes"]), tt])
    lines.append(render_table(["table", "rows", "dim", "kind", "bytes", "TT (rows / dims / ranks, ratio, error)"],
                              rows))
    return "\n".join(lines)
