"""Which tables to compress, and with which rank rule."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

from ..checkpoints import CheckpointError


def select_tables(tables: List[dict], names: Optional[Sequence[str]] = None, min_rows: Optional[int] = None,
                  num_largest: int = 5) -> List[dict]:
    """Tables named (by name, weight key or position), or with ``rows >= min_rows``, or the
    ``num_largest`` largest (in a generic file, of the tensors named as embedding tables where any is:
    an MLP's weight is not looked up by rows); only plain dense tables can be compressed."""
    dense = [t for t in tables if t.get("kind", "dense") == "dense"]
    if names and min_rows is not None:
        raise ValueError("give --tables or --min-rows, not both (tables= or min_rows=)")
    if names:
        chosen = []
        for name in names:
            name = str(name)
            hits = [t for t in tables if name in (t["name"], t["key"])]
            if not hits and name.isdigit() and int(name) < len(tables):
                hits = [tables[int(name)]]
            if not hits:
                listing = ", ".join(t["name"] for t in tables[:12]) + (" ..." if len(tables) > 12 else "")
                raise CheckpointError(f"no table named {name!r}; the tables are: {listing}")
            if hits[0].get("kind", "dense") != "dense":
                raise CheckpointError(f"table {name!r} is a {hits[0]['kind']} table, kept as it is; "
                                      "only plain tables can be TT-compressed")
            if hits[0] not in chosen:
                chosen.append(hits[0])
        return chosen
    if min_rows is not None:
        return [t for t in dense if t["rows"] >= min_rows]
    pool = [t for t in dense if t.get("named_as_table")] or dense
    return sorted(pool, key=lambda t: -t["rows"] * t["dim"])[:num_largest]


def parse_size(text) -> int:
    """``"3GB"``, ``"50MB"``, ``"512KiB"``, ``"1e6"`` -> bytes (decimal units; ``i`` for binary)."""
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 1:
            raise ValueError(f"a size should be at least 1 byte but got {text!r}")
        return int(text)
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12, "K": 10 ** 3, "M": 10 ** 6,
             "G": 10 ** 9, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            try:
                return parse_size(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return parse_size(float(s))
    except (ValueError, OverflowError):
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 3GB, 50MB, 512KiB") from None
