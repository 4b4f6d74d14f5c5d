"""torch.distributed.checkpoint (DCP) folders: what sharded training (TorchRec's DistributedModelParallel,
FSDP) saves with ``dcp.save``: a folder of ``__R_S.distcp`` files and a ``.metadata`` index.

:func:`read_dcp_tensors` reads every tensor of one whole, in one process with no process group (each
sharded table's shards put together by DCP's own reader), as a plain state_dict.  DCP reads
``.metadata`` with plain ``pickle``, which can run code: here it goes through an unpickler that admits
only DCP's metadata classes, ``torch.Size``, dtypes and paths (``allow_unsafe`` lifts that, for a trusted
folder that needs more).  Tensor data DCP reads with ``torch.load(weights_only=True)``; the entries that
are not tensors (an ``epoch``, a learning-rate scheduler's state) are not read at all.
"""
from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import torch

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


def read_dcp_tensors(path, allow_unsafe: bool = False) -> Tuple[Dict[str, torch.Tensor], List[str], dict]:
    """``(state, others, paths)``: every tensor of the folder, whole and on the CPU, under its DCP key (a
    state_dict saved inside an app state, ``{"model": model.state_dict(), ...}``, has keys ``model.<name>``),
    the keys of the entries that are not tensors (not read), and each key's place in the nested dict that
    was saved (``("optim", "state", "<param>", "<name>")``; DCP keeps it in ``planner_data``)."""
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
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in entries.items()
             if isinstance(m, TensorStorageMetadata)}
    others = sorted(k for k in entries if k not in state)
    if not state:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(state, storage_reader=Reader(str(path)), no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP's own error (a BaseException) wraps the reader's
        failures = getattr(e, "failures", None) or {}
        cause = next(iter(failures.values()), e)
        cause = cause[0] if isinstance(cause, tuple) and cause else getattr(cause, "exception", cause)
        text = str(cause).strip().splitlines()
        raise CheckpointError(f"{path}: its tensors could not be read ({type(cause).__name__}: "
                              f"{text[0][:300] if text else ''}); is a .distcp file missing or truncated?") from None
    planned = getattr(metadata, "planner_data", None) or {}
    paths = {k: tuple(planned[k]) if isinstance(planned.get(k), (tuple, list)) else tuple(k.split(".")) for k in state}
    return state, others, paths


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
