"""int8 row-wise quantization of a table: the baseline users know (FBGEMM-style)."""
from __future__ import annotations

from typing import Optional

import torch

INT8_ROW_OVERHEAD = 8  # bytes per row: an fp32 scale and an fp32 offset


def int8_rowwise(weight: torch.Tensor, out: Optional[torch.Tensor] = None, chunk_rows: int = 1 << 16) -> torch.Tensor:
    """The table after an int8 row-wise round trip: ``q = round((w - min) / scale)``,
    ``scale = (max - min) / 255`` per row.  Done in row chunks into ``out`` (a new float32 table, or
    ``weight`` itself for the round trip in place), so a big table costs one chunk more than itself."""
    if out is None:
        out = torch.empty(weight.shape, dtype=torch.float32)
    for s in range(0, weight.shape[0], chunk_rows):
        w = weight[s:s + chunk_rows].detach().float()
        lo = w.min(dim=1, keepdim=True).values
        scale = ((w.max(dim=1, keepdim=True).values - lo) / 255).clamp_min(1e-12)
        q = torch.round((w - lo) / scale).clamp(0, 255)
        out[s:s + chunk_rows] = q * scale + lo
    return out


def int8_rowwise_bytes(rows: int, dim: int) -> int:
    return rows * dim + rows * INT8_ROW_OVERHEAD
