"""Writing model files one tensor at a time, with bytes that depend only on what is written.

Both writers take *planned* tensors (:class:`Planned`: a name, dtype, shape and a function that
makes the tensor when its turn comes), so a file of many big tables is written holding one of them:

- :func:`write_safetensors`: the safetensors format (an 8-byte little-endian header length, the JSON
  header padded with spaces to 8 bytes, then the data).  The header's keys are sorted and the data
  is ordered by (alignment, name) as safetensors orders it, so the same tensors and metadata always
  give the same bytes (``safetensors.torch.save_file`` keeps metadata in a hash map whose order
  changes from process to process).
- :func:`write_torch`: a ``torch.save`` zip checkpoint of a nested object (dicts, lists, numbers,
  strings) whose tensors may be :class:`Planned`; it is the archive ``torch.save`` writes (the same
  pickle of ``_rebuild_tensor_v2`` with storage records) and loads with
  ``torch.load(weights_only=True)``, memory-mapped or not.

Each writes to the path it is given: callers pass the temp path of
:func:`fpd_convert.outputs.atomic_path`.
"""
from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .lazy_tables import file_mapping_of, release_pages

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass
class Planned:
    """A tensor to be written: ``make()`` returns it (of ``dtype`` and ``shape``) when it is written."""

    name: str
    dtype: torch.dtype
    shape: tuple
    make: Callable[[], torch.Tensor]
    # the tensor lies in a file mapping that nobody writes (a source's): once written, its pages are
    # dropped from this process's resident memory (re-read from the file if touched again)
    release: bool = False

    @classmethod
    def of(cls, name: str, t: torch.Tensor, release: bool = False) -> "Planned":
        return cls(name, t.dtype, tuple(t.shape), lambda: t, release)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n * torch.empty((), dtype=self.dtype).element_size()


def _made(p: Planned) -> torch.Tensor:
    t = p.make()
    if t.dtype != p.dtype or tuple(t.shape) != tuple(p.shape):
        raise ValueError(f"tensor {p.name}: planned as {p.dtype} {tuple(p.shape)}, made {t.dtype} {tuple(t.shape)}")
    return t.detach().cpu().contiguous()


def _raw_bytes(t: torch.Tensor):
    """The tensor's bytes as a buffer (no copy for a contiguous CPU tensor)."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def write_safetensors(path, planned: Sequence[Planned], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``planned`` as a safetensors file at ``path``, making one tensor at a time."""
    names = [p.name for p in planned]
    if len(set(names)) != len(names):
        raise ValueError("two tensors with one name: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))
    for p in planned:
        if p.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {p.name}: safetensors has no dtype {p.dtype}")
    order = sorted(planned, key=lambda p: (-torch.empty((), dtype=p.dtype).element_size(), p.name))
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for p in order:
        header[p.name] = {"dtype": SAFETENSORS_DTYPES[p.dtype], "shape": [int(s) for s in p.shape],
                          "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for p in order:
            t = _made(p)
            if p.release and t.numel() and file_mapping_of(t) is not None:
                flat = t.reshape(-1).view(torch.uint8)  # a mapped source's tensor: its pages dropped as written
                for start in range(0, flat.numel(), WRITE_CHUNK):
                    part = flat[start:start + WRITE_CHUNK]
                    f.write(part.numpy())
                    release_pages(part)
            else:
                f.write(_raw_bytes(t))
            del t


#: a mapped tensor is written this many bytes at a time, each part's pages dropped once written
WRITE_CHUNK = 64 << 20


def _release(p: Planned, t: torch.Tensor) -> None:
    if p.release and file_mapping_of(t) is not None:
        release_pages(t)


class _StorageRef:
    """Where a planned tensor's storage goes in the pickle: a persistent id, written as a record later."""

    def __init__(self, key: str, planned: Planned):
        self.key, self.planned = key, planned


def _storage_class(dtype: torch.dtype):
    return getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


def _contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(stride))


def write_torch(path, obj: Any) -> None:
    """``torch.save(obj, path)`` where the tensors of ``obj`` may be :class:`Planned` (made one at a time,
    after the pickle); plain tensors in ``obj`` are written as they are."""
    refs: List[_StorageRef] = []

    class Pickler(pickle.Pickler):
        def reducer_override(self, value):
            if isinstance(value, torch.Tensor):
                value = Planned.of("", value.detach())
            if isinstance(value, Planned):
                ref = _StorageRef(str(len(refs)), value)
                refs.append(ref)
                return (torch._utils._rebuild_tensor_v2,
                        (ref, 0, tuple(int(s) for s in value.shape), _contiguous_stride(value.shape), False,
                         collections.OrderedDict()))
            return NotImplemented

        def persistent_id(self, value):
            if isinstance(value, _StorageRef):
                p = value.planned
                numel = p.nbytes // max(torch.empty((), dtype=p.dtype).element_size(), 1)
                return ("storage", _storage_class(p.dtype), value.key, "cpu", numel)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", data, len(data))
    writer.write_record(".format_version", "1", 1)
    alignment = getattr(torch.serialization, "_get_storage_alignment", None)
    if alignment is not None:  # torch >= 2.5 writes it; older readers ignore it
        writer.write_record(".storage_alignment", str(alignment()), len(str(alignment())))
    writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    for ref in refs:
        t = _made(ref.planned)
        if t.numel() and (t.storage_offset() or t.untyped_storage().nbytes() != ref.planned.nbytes):
            t = t.clone()
        writer.write_record(f"data/{ref.key}", t.untyped_storage() if t.numel() else b"", ref.planned.nbytes)
        _release(ref.planned, t)
        del t
    writer.write_end_of_file()
