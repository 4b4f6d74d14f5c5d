"""torch.distributed.checkpoint (DCP) folders: what sharded training (TorchRec's DistributedModelParallel,
FSDP) saves with ``dcp.save``: a folder of ``__R_S.distcp`` files and a ``.metadata`` index.

:func:`read_dcp_tensors` reads every tensor of one whole, in one process with no process group (each
sharded table's shards put together), as a plain state_dict.  The big ones (16 MB and more) are read one at
a time into a file mapping of their own (a temporary file, unlinked at once, on a disk with room: ``TMPDIR``,
else beside the folder), their shards copied from the mapped ``.distcp`` files a block of rows at a time
with the pages dropped as they go: reading a folder costs a block of memory, not the model (nor a whole
shard, as DCP's own reader would), and compress sees the tensors as it sees a mapped ``.pt``.  The small
tensors, and any shard that is not a plain ``torch.save`` record, go through DCP's reader; where no disk has
room (or only a RAM-backed one), every tensor is read into memory.  DCP reads
``.metadata`` with plain ``pickle``, which can run code: here it goes through an unpickler that admits
only DCP's metadata classes, ``torch.Size``, dtypes and paths (``allow_unsafe`` lifts that, for a trusted
folder that needs more).  Tensor data DCP reads with ``torch.load(weights_only=True)``, and a shard copied
here has its ``data.pkl`` read for the layout only, by an unpickler that builds nothing; the entries that
are not tensors (an ``epoch``, a learning-rate scheduler's state) are not read at all.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
import pickle
import struct
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .lazy_tables import MAP_AT_LEAST, release_pages
from .safe_load import CheckpointError

METADATA = ".metadata"
_PATHS = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}


def is_dcp_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file()


class _Refused(pickle.UnpicklingError):
    """A global that a DCP index does not hold."""


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the globals a DCP ``.metadata`` holds and nothing else."""

    def find_class(self, module: str, name: str):
        value = None
        if module == "torch.distributed.checkpoint.metadata" or (
                module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo"):
            value = super().find_class(module, name)
            value = value if isinstance(value, type) else None  # classes and enums, no functions
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            value = getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout") or (module == "pathlib" and name in _PATHS):
            value = super().find_class(module, name)
        elif (module, name) == ("collections", "OrderedDict"):
            value = super().find_class(module, name)
        if value is None:
            raise _Refused(f"{module}.{name}")
        return value


def read_metadata(path, allow_unsafe: bool = False):
    """The folder's ``Metadata`` (its tensors' names, shapes, dtypes and chunks)."""
    file = Path(path) / METADATA
    with open(file, "rb") as f:
        try:
            return (pickle.Unpickler(f) if allow_unsafe else _MetadataUnpickler(f)).load()
        except _Refused as e:
            raise CheckpointError(f"{path}: its {METADATA} needs {e}, which a DCP index does not hold and which "
                                  "could run code; if you trust the folder, pass --allow-unsafe-pickle") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: not a readable torch.distributed.checkpoint folder ({type(e).__name__} "
                                  f"in {METADATA}: {e})") from None


def read_dcp_tensors(path, allow_unsafe: bool = False, data: bool = True, log=None
                     ) -> Tuple[Dict[str, torch.Tensor], List[str], dict]:
    """``(state, others, paths)``: every tensor of the folder, whole and on the CPU, under its DCP key (a
    state_dict saved inside an app state, ``{"model": model.state_dict(), ...}``, has keys ``model.<name>``),
    the keys of the entries that are not tensors (not read), and each key's place in the nested dict that
    was saved (``("optim", "state", "<param>", "<name>")``; DCP keeps it in ``planner_data``).  Without ``data``
    the tensors are on the meta device: their names, shapes and dtypes from the index, nothing read.  ``log``
    gets a line per big tensor read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(path, allow_unsafe)

    class Reader(FileSystemReader):  # DCP's reader, with the index read as above
        def read_metadata(self, *args, **kwargs):
            return metadata

    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: its {METADATA} is not a torch.distributed.checkpoint index")
    tensors = {k: m for k, m in entries.items() if isinstance(m, TensorStorageMetadata)}
    others = sorted(k for k in entries if k not in tensors)
    if not tensors:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    planned = getattr(metadata, "planner_data", None) or {}
    paths = {k: tuple(planned[k]) if isinstance(planned.get(k), (tuple, list)) else tuple(k.split(".")) for k in tensors}
    if not data:
        return ({k: torch.empty(tuple(m.size), dtype=m.properties.dtype, device="meta") for k, m in tensors.items()},
                others, paths)
    big = [k for k, m in tensors.items() if _nbytes(m) >= SPILL_AT_LEAST]
    spill = spill_dir([tempfile.gettempdir(), Path(path).resolve().parent], sum(_nbytes(tensors[k]) for k in big))
    big = big if spill is not None else []
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in tensors.items() if k not in big}
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
            warnings.filterwarnings("ignore", message=".*single process.*")
            if state:
                dcp.load(state, storage_reader=Reader(str(path)), no_dist=True)
            files: Dict[str, mmap.mmap] = {}
            for i, k in enumerate(big):  # one at a time, each into its own file mapping
                m, started = tensors[k], time.perf_counter()
                one = {k: file_backed(tuple(m.size), m.properties.dtype, spill)}
                if not _copy_chunks(Path(path), metadata, k, m, one[k], files):  # DCP's own reader, whole chunks
                    dcp.load(one, storage_reader=Reader(str(path)), no_dist=True)
                release_pages(one[k])
                state[k] = one[k]
                if log is not None:
                    log(f"read {i + 1}/{len(big)} {k} ({_nbytes(m) / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s")
    except (Exception, CheckpointException) as e:  # DCP's own error (a BaseException) wraps the reader's
        failures = getattr(e, "failures", None) or {}
        cause = next(iter(failures.values()), e)
        cause = cause[0] if isinstance(cause, tuple) and cause else getattr(cause, "exception", cause)
        text = str(cause).strip().splitlines()
        raise CheckpointError(f"{path}: its tensors could not be read ({type(cause).__name__}: "
                              f"{text[0][:300] if text else ''}); is a .distcp file missing or truncated?") from None
    return {k: state[k] for k in tensors}, others, paths  # the index's order


def _copy_chunks(folder: Path, metadata, key: str, m, dest: torch.Tensor, files: Dict[str, "mmap.mmap"]) -> bool:
    """Copy the chunks of tensor ``key`` into ``dest`` straight from their ``.distcp`` files, mapped, a block of
    rows at a time with the pages read and written dropped as it goes: memory stays at a block, where DCP's
    reader holds a whole chunk (a table, for a table-wise shard) and its copy.  False where a chunk is not the
    plain ``torch.save`` record this reads (a transform, another layout); DCP's reader then does it."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    storage = getattr(metadata, "storage_data", None) or {}
    views = []
    for index, chunk in enumerate(m.chunks):
        info = storage.get(MetadataIndex(key, chunk.offsets, index))
        if info is None or getattr(info, "transform_descriptors", None):
            return False
        file = folder / info.relative_path
        if info.relative_path not in files:
            with open(file, "rb") as f:
                files[info.relative_path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        where = _record_offset(files[info.relative_path], info.offset, info.length, tuple(chunk.sizes), dest.dtype)
        if where is None:
            return False
        views.append((chunk, where, files[info.relative_path]))
    rows_per_block = max(1, (64 << 20) // max(1, dest[0].numel() * dest.element_size() if dest.dim() else 1))
    for chunk, where, mm in views:
        sizes = tuple(chunk.sizes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: only read
            src = torch.frombuffer(mm, dtype=dest.dtype, count=math.prod(sizes), offset=where).reshape(sizes)
        target = dest
        for dim, (o, n) in enumerate(zip(chunk.offsets, sizes)):
            target = target.narrow(dim, o, n)
        rows = sizes[0] if sizes else 1
        for a in range(0, rows, rows_per_block):
            part, into = (src[a:a + rows_per_block], target[a:a + rows_per_block]) if sizes else (src, target)
            into.copy_(part)
            release_pages(part)
            if into.is_contiguous():
                release_pages(into)
    return True


class _RecordUnpickler(pickle.Unpickler):
    """A ``torch.save`` record's ``data.pkl`` of one tensor, read for its layout only (nothing is built)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        return tuple(pid)  # ("storage", storage class name, record key, location, numel)


def _record_offset(mm, start: int, length: int, sizes: tuple, dtype: torch.dtype) -> Optional[int]:
    """Where in the file the data of the tensor that ``torch.save`` wrote at ``[start, start + length)`` begins,
    if it is one contiguous tensor of ``sizes`` and ``dtype`` from offset 0 of its storage; else None."""
    import io
    import zipfile
    try:
        blob = zipfile.ZipFile(io.BytesIO(mm[start:start + min(length, 1 << 20)]) if length <= 1 << 20
                               else _Slice(mm, start, length))
        pkl = next(n for n in blob.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        storage, offset, size, stride = _RecordUnpickler(io.BytesIO(blob.read(pkl))).load()
        record = blob.getinfo(pkl[: -len("data.pkl")] + f"data/{storage[2]}")
    except (zipfile.BadZipFile, StopIteration, KeyError, pickle.UnpicklingError, ValueError, TypeError, IndexError):
        return None
    elsize = torch.empty((), dtype=dtype).element_size()
    contiguous = stride == tuple(math.prod(size[i + 1:]) for i in range(len(size)))
    if (offset != 0 or size != sizes or not contiguous or record.compress_type != zipfile.ZIP_STORED
            or record.file_size != math.prod(sizes) * elsize):
        return None
    header = start + record.header_offset  # the local header: 30 bytes, the name, then its own extra field
    names, extra = struct.unpack("<HH", mm[header + 26:header + 30])
    return header + 30 + names + extra


class _Slice:
    """A read-only, seekable file over ``[start, start + length)`` of a mapping (``zipfile`` reads its end)."""

    def __init__(self, mm, start: int, length: int):
        self.mm, self.start, self.length, self.pos = mm, start, length, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.length if n is None or n < 0 else min(self.length, self.pos + n)
        out = self.mm[self.start + self.pos:self.start + end]
        self.pos = end
        return out

    def seekable(self) -> bool:
        return True


#: tensors this big are read into a file mapping of their own
SPILL_AT_LEAST = MAP_AT_LEAST
_RAM_FILESYSTEMS = {"tmpfs", "ramfs"}


def _nbytes(m) -> int:
    return math.prod(m.size) * torch.empty((), dtype=m.properties.dtype).element_size()


def spill_dir(candidates, need: int) -> Optional[Path]:
    """The first of ``candidates`` that is a writable folder on a disk (not a RAM-backed filesystem) with room
    for ``need`` bytes and a margin, or None."""
    for folder in candidates:
        folder = Path(folder)
        try:
            if (folder.is_dir() and os.access(folder, os.W_OK) and _filesystem(folder) not in _RAM_FILESYSTEMS
                    and shutil.disk_usage(folder).free >= need * 1.05 + (256 << 20)):
                return folder
        except OSError:
            continue
    return None


def _filesystem(folder: Path) -> str:
    """The type of the filesystem ``folder`` lies on (the longest mount point of /proc/mounts above it)."""
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    mount = fields[1].replace("\\040", " ")
                    if (str(folder.resolve()) + "/").startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                        best, kind = mount, fields[2]
    except OSError:
        return ""
    return kind


def file_backed(shape: tuple, dtype: torch.dtype, folder: Path) -> torch.Tensor:
    """A zeroed tensor whose storage is a shared mapping of a new file in ``folder``, unlinked at once: its
    pages go to that file, not to memory, and the file's space is given back when the tensor is freed."""
    fd, name = tempfile.mkstemp(prefix="fpd-dcp-", suffix=".tensor", dir=folder)
    try:
        numel = math.prod(shape)
        os.ftruncate(fd, max(1, numel) * torch.empty((), dtype=dtype).element_size())
        t = torch.from_file(name, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(name)
    return t.reshape(shape)


def folder_sha256(path, chunk: int = 1 << 24) -> str:
    """One digest of every file of the folder, by name and content (a compressed file records its source's)."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            while True:
                b = f.read(chunk)
                if not b:
                    break
                h.update(b)
    return h.hexdigest()
