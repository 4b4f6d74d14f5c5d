"""Low-precision storage of TT cores (and exact rows): bf16, fp16, int8 with per-slice scales.

int8 keeps, for each slice ``G[:, i, :, :]`` of a core (one per value of its digit),
a float32 scale ``max|slice| / 127`` and the rounded quotients: ``n_j`` scales per core.
Rows (for exact rows) use one scale per row the same way.  Values are decoded to
float32 for computation; the error this adds is measured by the caller.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

STORAGE_DTYPES = ("float32", "bfloat16", "float16", "int8")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


def element_bytes(dtype: str) -> int:
    if dtype not in _BYTES:
        raise ValueError(f"storage dtype should be one of {', '.join(STORAGE_DTYPES)} but got {dtype!r}")
    return _BYTES[dtype]


def encode(values: torch.Tensor, dtype: str, axis: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(stored, scales)``: ``values`` in ``dtype``; for int8, float32 scales along ``axis``
    (one per index of that axis), else ``None``."""
    element_bytes(dtype)
    values = values.detach().float()
    if dtype == "float32":
        return values.contiguous(), None
    if dtype in ("bfloat16", "float16"):
        return values.to(getattr(torch, dtype)).contiguous(), None
    moved = values.movedim(axis, 0)
    amax = moved.reshape(moved.shape[0], -1).abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(moved / scales.reshape(-1, *([1] * (moved.dim() - 1)))).clamp_(-127, 127).to(torch.int8)
    return q.movedim(0, axis).contiguous(), scales.contiguous()


def decode(stored: torch.Tensor, scales: Optional[torch.Tensor], axis: int) -> torch.Tensor:
    """float32 values of what :func:`encode` stored."""
    if stored.dtype != torch.int8:
        return stored.float()
    if scales is None:
        raise ValueError("int8 values need their scales")
    moved = stored.movedim(axis, 0).float() * scales.float().reshape(-1, *([1] * (stored.dim() - 1)))
    return moved.movedim(0, axis).contiguous()


def stored_bytes(shape, dtype: str, axis: int) -> int:
    """Bytes :func:`encode` writes for a tensor of ``shape`` (values + int8 scales)."""
    n = 1
    for s in shape:
        n *= int(s)
    return n * element_bytes(dtype) + (int(shape[axis]) * 4 if dtype == "int8" else 0)
