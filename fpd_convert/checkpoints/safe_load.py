"""Loading checkpoints without running arbitrary code.

``torch.load(weights_only=True)`` refuses every non-tensor global.  Real
facebookresearch/dlrm checkpoints store numpy scalars beside the state_dict
(``test_acc`` is a ``numpy.float64``), so exactly those numpy scalar and dtype
types are allowed, nothing broader.  Anything else needs ``allow_unsafe=True``
(``--allow-unsafe-pickle`` on the command line), which should only be used on
files you trust.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..paths import not_a_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message says why and what to do."""


def looks_like(path: os.PathLike) -> str:
    """What a file's first bytes say it is, for error messages ("" when they say nothing known)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch checkpoint or a numpy .npz)"
    if head.startswith(b"\x80"):
        return "a pickle (an older PyTorch checkpoint)"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "a safetensors file"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file" + (" (tab-separated, like Criteo data)" if b"\t" in head else "")
    return ""


def _exported_program(path: os.PathLike) -> bool:
    """Whether a zip is a pt2 archive (``torch.export.save``, AOTInductor): ``<name>/archive_format`` or
    ``<name>/data/weights/...``, and no ``data.pkl`` as a checkpoint has."""
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    pickled = any(n.endswith("/data.pkl") or n == "data.pkl" for n in names)
    return not pickled and any(n.endswith("/archive_format") or "/data/weights/" in n for n in names)


def _numpy_scalar_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray.scalar, np.dtype]
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                 "Int16DType", "Int8DType", "UInt8DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            allowed.append(getattr(np.dtypes, name))
    return allowed


def load_torch_file(path: os.PathLike, allow_unsafe: bool = False, mmap: bool = True) -> Any:
    """``torch.load`` a ``.pt`` file safely (memory-mapped where the format allows).

    Raises :class:`CheckpointError` for missing, truncated or non-PyTorch files and for
    pickles that need globals beyond tensors and numpy scalars.
    """
    path = Path(path)
    if (reason := not_a_file(path)):
        raise CheckpointError(f"{path}: {reason}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    is_zip = zipfile.is_zipfile(path)
    kind = "" if is_zip else looks_like(path)
    if kind.startswith("a zip archive"):
        raise CheckpointError(f"{path}: a damaged zip archive (a PyTorch checkpoint whose end is missing: "
                              "truncated by a full disk or an interrupted copy?)")
    if not is_zip and kind != "a pickle (an older PyTorch checkpoint)":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (" + (f"it looks like {kind}" if kind else
                              "its first bytes are neither a zip archive nor a pickle") + ")")
    if is_zip and _exported_program(path):
        raise CheckpointError(f"{path}: a torch.export / AOTInductor program (a .pt2 archive), not a checkpoint; "
                              "give the model's state_dict or checkpoint, or the compressed file it came from")
    use_mmap = mmap and is_zip
    try:
        if allow_unsafe:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=use_mmap)
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except Exception as e:  # torch raises many types for bad bytes; name the file and the cause
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text:
            try:
                needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:
                needed = []
            if any(n.endswith("sharded_tensor.api.ShardedTensor") for n in needed):
                raise CheckpointError(
                    f"{path}: a state_dict saved under DistributedModelParallel (ShardedTensors: each holds one "
                    "rank's shards of a table). Save the sharded model with torch.distributed.checkpoint "
                    "(dcp.save({'model': model.state_dict()}, checkpoint_id=DIR)) and give DIR") from None
            extra = f" (it needs: {', '.join(needed[:5])})" if needed else ""
            raise CheckpointError(
                f"{path}: this checkpoint needs arbitrary unpickling{extra}, which can run code. "
                "If you trust the file, pass --allow-unsafe-pickle (allow_unsafe=True).") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{text.splitlines()[0][:200] if text else 'no detail'}); is it truncated "
                              "or of another format?") from None


def to_plain(value: Any) -> Any:
    """numpy scalars and 0-d tensors -> Python numbers (for JSON metadata)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value
