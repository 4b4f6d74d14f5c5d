"""Why an input path cannot be read as a file, in the words of an error message."""
from __future__ import annotations

import os
from pathlib import Path


def not_a_file(path: os.PathLike) -> str:
    """``""`` for a regular file; else ``"no such file"``, or what the path is instead.

    Example::

        reason = not_a_file("model.pt")
        if reason:
            raise ValueError(f"model.pt: {reason}")
    """
    path = Path(path)
    if path.is_file():
        return ""
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "a directory, not a file"
    return "not a regular file (a device, pipe or socket)"


def bytes_on_disk(path: os.PathLike) -> int:
    """The size of a file, or of every file in a folder (a torch.distributed.checkpoint's); 0 if it is gone."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0
