"""Writing outputs so that nothing is lost: one writer per output, temp file + rename.

Every command writes its files through this module:

- :func:`check_output` runs before any work: it refuses an output that is an input or that exists
  (without ``force``), a missing or unwritable folder, and an output another live process is
  writing.  It *claims* the output with a lock file beside it (``.NAME.fpd-lock``, holding the PID),
  released when the function that claimed it returns (:func:`releases_outputs`) or the process
  exits; a lock or temp file left by a killed process (its PID is gone) is removed then, with a
  notice.
- :func:`atomic_path` yields a temp path beside the output (``.NAME.PID.XXXX.tmp``) and renames it
  over the output only when the block succeeds; the temp file is removed on every exit path a
  process can catch (exceptions, Ctrl-C, SIGTERM once the CLI has turned it into an exit).
  Files get the mode the user's umask gives (not ``mkstemp``'s 0600).

Example::

    out = check_output("model.tt.safetensors", inputs=["model.pt"], force=False)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp))
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, TypeVar

LOCK_SUFFIX = ".fpd-lock"
_claimed: Dict[Path, Path] = {}  # output -> its lock file, held by this process


class OutputError(ValueError):
    """An output that would overwrite an input or an existing file, or that cannot be written."""


class OutputNotice(UserWarning):
    """Something the output check did that a user should know (a stale file removed)."""


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _pid_in(path: Path, field: Optional[int] = None) -> int:
    """The PID written in a lock file (``field`` None) or in a temp file's name (that ``.``-separated field)."""
    try:
        text = path.read_text().strip() if field is None else path.name.split(".")[field]
        return int(text)
    except (OSError, ValueError, IndexError):
        return -1


def _lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}{LOCK_SUFFIX}")


def stale_temps(output: Path) -> List[Path]:
    """Temp files of ``output`` whose writer is gone (a killed run): ``.NAME.PID.XXXX.tmp``."""
    pattern = str(output.parent / f".{glob.escape(output.name)}.*.tmp")
    pid_field = -3  # ".NAME.PID.XXXX.tmp" split on "." ends with PID, XXXX, tmp
    return [Path(p) for p in glob.glob(pattern) if not _alive(_pid_in(Path(p), pid_field))]


def _remove_stale(output: Path) -> None:
    for tmp in stale_temps(output):
        try:
            size = tmp.stat().st_size
            tmp.unlink()
        except OSError:
            continue
        warnings.warn(f"removed {tmp}, a partial {output.name} ({size:,} bytes) left by an interrupted run",
                      OutputNotice, stacklevel=3)


def _claim(output: Path) -> None:
    """Take the lock file of ``output`` for this process (re-entrant)."""
    if output in _claimed:
        return
    lock = _lock_path(output)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _pid_in(lock)
            if pid > 0 and _alive(pid) and pid != os.getpid():
                raise OutputError(f"{output} is being written by another fpd-convert process (pid {pid}); wait for "
                                  f"it to finish, or remove {lock} if that process is not fpd-convert") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # left by a run that was killed
            continue
        except OSError as e:
            raise OutputError(f"cannot write in the folder {output.parent} ({e.strerror})") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        _claimed[output] = lock
        return
    raise OutputError(f"{output}: could not take its lock file {lock}")


def release_output(output: os.PathLike) -> None:
    """Give up the claim on ``output`` (done for every claim when the process exits)."""
    lock = _claimed.pop(Path(output).absolute(), None)
    if lock is not None:
        with contextlib.suppress(OSError):
            if _pid_in(lock) == os.getpid():
                lock.unlink()


@atexit.register
def _release_all() -> None:
    for output in list(_claimed):
        release_output(output)


F = TypeVar("F", bound=Callable)


def releases_outputs(fn: F) -> F:
    """Decorates a function that writes outputs: the claims it takes are released when it returns
    or raises, so a long-lived process (a notebook, a test run) leaves no lock file behind."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = set(_claimed)
        try:
            return fn(*args, **kwargs)
        finally:
            for output in set(_claimed) - before:
                release_output(output)
    return wrapper  # type: ignore[return-value]


def _same_file(a: Path, b: Path) -> bool:
    if a.absolute() == b.absolute() or a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def check_output(output: os.PathLike, inputs: Sequence[os.PathLike] = (), force: bool = False) -> Path:
    """Refuse an output equal to an input, an existing file without ``force``, a folder that is missing
    or cannot be written, or an output another process is writing; then claim it (see the module).
    Returns the output as a ``Path``."""
    output = Path(output)
    for inp in inputs:
        if inp is not None and _same_file(Path(inp), output):
            raise OutputError(f"output {output} is the same file as the input {inp}; choose another path")
    if output.is_dir():
        raise OutputError(f"{output} is a directory; give a file name")
    if not output.parent.is_dir():
        raise OutputError(f"the folder {output.parent} does not exist")
    if (output.exists() or output.is_symlink()) and not force:
        raise OutputError(f"{output} exists; pass --force (force=True) to overwrite it")
    if output.exists() and not output.is_file():
        raise OutputError(f"{output} exists and is not a regular file")
    _claim(output.absolute())
    _remove_stale(output)
    return output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(output: os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``output`` (``.NAME.PID.XXXX.tmp``, the name :func:`stale_temps` finds);
    rename it over ``output`` only on success (the temp file is removed otherwise).  Writers that add a
    suffix of their own or name things after the file (``np.savez``, ``torch.export.save``) are given an
    open file."""
    output = Path(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.{os.getpid()}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, output)
    except Exception as e:
        if not isinstance(e, OSError) and _is_write_error(e):  # safetensors' and torch.save's own error types
            raise OSError(f"cannot write {output} ({str(e).splitlines()[0][:200]})") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _is_write_error(e: Exception) -> bool:
    """Whether a writer's exception says the file system refused the bytes (a full disk, a size limit)."""
    text = str(e).lower()
    return any(s in text for s in ("i/o error", "failed writing", "file write failed", "no space left",
                                   "file too large"))


@releases_outputs
def write_text(output: os.PathLike, text: str, force: bool = False, inputs: Sequence[os.PathLike] = ()) -> Path:
    """Write ``text`` to ``output`` by the rules of :func:`check_output` and :func:`atomic_path`."""
    output = check_output(output, inputs, force)
    with atomic_path(output) as tmp:
        tmp.write_text(text)
    return output
