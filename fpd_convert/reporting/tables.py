"""Plain-text tables and byte sizes for terminal output."""
from __future__ import annotations

from typing import List, Sequence


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n} B"


def signed(x: float) -> str:
    """A difference to 4 decimals with its sign, ``+0.0012``; one that rounds to zero is ``+0.0000``,
    never ``-0.0000``."""
    v = round(float(x), 4)
    return f"{v if v != 0 else 0.0:+.4f}"


def render_table(headers: Sequence[str], rows: List[Sequence]) -> str:
    """Columns padded to their widest cell; numbers (with a unit or not: ``1.71 MB``, ``-0.0001``, ``8.3x``)
    right-aligned, text such as ``235x16x16 / 4x2x2 / r=5,5`` left-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def number(c: str) -> bool:
        return (c[:1].isdigit() or c[:1] in "-+") and len(c.split()) <= 2

    def line(r):
        return "  ".join(c.rjust(w) if number(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def markdown_table(headers: Sequence[str], rows: List[Sequence]) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)
