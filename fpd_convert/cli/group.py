"""The command group and what every command shares: errors as ``Error: ...``, SIGTERM as an exit."""
from __future__ import annotations

import functools

import click

from .. import __version__
from .options import Command


def friendly_errors(fn):
    """Library errors become ``Error: <message>`` and exit status 1, without a traceback: bad values
    (``ValueError`` and the library's own errors, which derive from it), files that cannot be read or
    written (``OSError``: a full disk, a read-only folder) and files that end too soon (``EOFError``)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except EOFError as e:
            raise click.ClickException(f"a file ended before its data did (truncated?): {e}") from None
    return wrapper


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # so that `finally` blocks remove temp files (a plain SIGTERM skips them)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"Warning: {message}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fpd-convert")
def main():
    """Compress trained recommender models with tensor-train (TT) embedding tables."""
    import signal
    import warnings
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    warnings.showwarning = _show_warning
    for category in (DeprecationWarning, FutureWarning):  # the libraries' notes to their own developers
        warnings.filterwarnings("ignore", category=category)
    from ..allocator import keep_freed_memory
    keep_freed_memory()  # CPU steps reuse freed buffers instead of faulting fresh pages in (FPD_MALLOC=system: off)


main.command_class = Command  # every command's --help lists the advanced options apart
