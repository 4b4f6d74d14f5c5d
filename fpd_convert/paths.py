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
