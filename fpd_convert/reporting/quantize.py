"""int8 row-wise quantization of a table: the baseline users know (FBGEMM-style)."""
from __future__ import annotations

import torch

INT8_ROW_OVERHEAD = 8  # bytes per row: an fp32 scale and an fp32 offset


def int8_rowwise(weight: torch.Tensor) -> torch.Tensor:
    """The table after an int8 row-wise round trip: ``q = round((w - min) / scale)``,
    ``scale = (max - min) / 255`` per row."""
    w = weight.detach().float()
    lo = w.min(dim=1, keepdim=True).values
    scale = ((w.max(dim=1, keepdim=True).values - lo) / 255).clamp_min(1e-12)
    q = torch.round((w - lo) / scale).clamp(0, 255)
    return q * scale + lo


def int8_rowwise_bytes(rows: int, dim: int) -> int:
    return rows * dim + rows * INT8_ROW_OVERHEAD
