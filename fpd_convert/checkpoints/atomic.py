"""Writing outputs atomically: a temp file in the target folder, then a rename."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence


class OutputError(ValueError):
    """An output path that would overwrite an input or an existing file."""


def check_output(output: os.PathLike, inputs: Sequence[os.PathLike] = (), force: bool = False) -> Path:
    """Refuse an output equal to an input, or an existing file without ``force``."""
    output = Path(output)
    for inp in inputs:
        if Path(inp).exists() and output.exists() and os.path.samefile(inp, output) or \
                Path(inp).resolve() == output.resolve():
            raise OutputError(f"output {output} is the same file as the input {inp}; choose another path")
    if output.exists() and not force:
        raise OutputError(f"{output} exists; pass --force (force=True) to overwrite it")
    if output.is_dir():
        raise OutputError(f"{output} is a directory")
    if not output.parent.exists():
        raise OutputError(f"the folder {output.parent} does not exist")
    return output


@contextlib.contextmanager
def atomic_path(output: os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``output``; rename it over ``output`` only on success."""
    output = Path(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
