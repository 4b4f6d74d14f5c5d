"""Tables read in row chunks from memory-mapped files, without keeping them resident.

``.pt`` zip checkpoints are opened with ``torch.load(mmap=True, weights_only=True)``
(see :mod:`.safe_load`); ``.safetensors`` files are validated with ``safe_open`` and
their tensors mapped read-only here (``mmap`` + ``torch.frombuffer``), so opening a
20 GB file costs address space, not memory.  :func:`row_reader` copies a row range
to float32 (bf16/fp16 converted on the way) and then tells the kernel to drop the
mapped pages it read (``madvise(MADV_DONTNEED)``: the pages are clean and come back
from the file if read again), so the resident size stays at one chunk however big
the table is.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from ..paths import not_a_file
from .safe_load import CheckpointError, looks_like

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}

MAP_AT_LEAST = 16 << 20  # tensors this big stay mapped; smaller ones are copied into memory

_PAGE = mmap.PAGESIZE
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _MADV_DONTNEED = 4
except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
    _madvise = None


def release_pages(t: torch.Tensor) -> None:
    """Drop the whole pages under ``t`` from this process's resident memory.

    Only for tensors backed by a **file mapping that is never written** (then the
    pages are re-read from the file on the next access); never on ordinary memory.
    """
    if _madvise is None or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first = -(-start // _PAGE) * _PAGE  # inward: pages entirely inside the range
    last = end // _PAGE * _PAGE
    if last > first:
        _madvise(first, last - first, _MADV_DONTNEED)


def file_mapping_of(t: torch.Tensor) -> Optional[str]:
    """The file whose mapping holds ``t``'s data (from ``/proc/self/maps``), or None for
    ordinary memory or where that cannot be told."""
    if t.numel() == 0 or t.device.type != "cpu":
        return None
    addr = t.data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= addr < hi:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    return path if path.startswith("/") else None
    except OSError:
        return None
    return None


def row_reader(table: torch.Tensor, mapped: bool = True) -> Callable[[int, int], np.ndarray]:
    """``read(start, stop)`` -> float32 ``(stop - start, dim)`` copy of rows of ``table``.

    With ``mapped`` and a table that really lives in a file mapping (checked in
    ``/proc/self/maps``: releasing ordinary memory would zero it), the pages read are
    released after each call.
    """
    mapped = mapped and file_mapping_of(table) is not None

    def read(start: int, stop: int) -> np.ndarray:
        part = table[start:stop]
        out = part.to(torch.float32, copy=True).numpy()
        if mapped:
            release_pages(part)
        return out
    return read


def safetensors_header(path) -> Tuple[int, dict]:
    """``(header bytes, header)`` of a safetensors file: an 8-byte little-endian length, then JSON."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        return header_len, json.loads(fh.read(header_len))


def map_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """All tensors of a safetensors file: big ones mapped read-only, small ones in memory.

    Returns ``(tensors, metadata)``.  The header is validated by ``safe_open`` first.
    """
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    if (reason := not_a_file(path)):
        raise CheckpointError(f"{path}: {reason}")
    try:
        # framework "numpy": its mapping is read-only and shared (the "pt" one is a private,
        # writable mapping of the whole file, which counts against memory limits)
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        kind = looks_like(path)
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})"
                              + (f"; it looks like {kind}" if kind else "")) from None
    header_len, header = safetensors_header(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + header_len else None
    base = 8 + header_len
    tensors: Dict[str, torch.Tensor] = {}
    for key in keys:
        info = header[key]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which fpd-convert does not read")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        count = int(np.prod(shape)) if shape else 1
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we never write to it
            t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + begin).reshape(shape)
        tensors[key] = t if end - begin >= MAP_AT_LEAST else t.clone()
    return tensors, metadata
