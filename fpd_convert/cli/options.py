"""Options and parameter types that several commands share, and the command class whose help puts the
developer's knobs under their own heading.

One vocabulary: ``-o/--output`` for what a command writes, ``--train``/``--val``/``--data`` for data files,
``--seed``, ``--device``, ``--json``, ``-q/--quiet``, ``-v/--verbose`` and ``--threads`` on every command they
apply to (``tests/test_cli_vocabulary.py`` checks the list)."""
from __future__ import annotations

import functools
import logging

import click

ADVANCED_HEADING = "Advanced options (tuning knobs; the defaults suit most models)"


class AdvancedOption(click.Option):
    """An option that ``--help`` lists under :data:`ADVANCED_HEADING`."""


class Command(click.Command):
    """A command whose ``--help`` lists the everyday options first and the advanced ones apart."""

    def format_options(self, ctx, formatter):
        everyday, advanced = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                (advanced if isinstance(param, AdvancedOption) else everyday).append(record)
        if everyday:
            with formatter.section("Options"):
                formatter.write_dl(everyday)
        if advanced:
            with formatter.section(ADVANCED_HEADING):
                formatter.write_dl(advanced)


def advanced(*names, **kwargs):
    """``click.option`` for a knob that only a developer tunes: listed apart in ``--help``."""
    return click.option(*names, cls=AdvancedOption, **kwargs)


def output_option(help: str, required: bool = True, **kwargs):
    return click.option("-o", "--output", required=required, type=click.Path(dir_okay=False), help=help, **kwargs)


def force_option(fn):
    return click.option("--force", is_flag=True, help="Overwrite an existing output (never an input).")(fn)


def json_option(what: str = "the result"):
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON on stdout (nothing else).")


def seed_option(what: str):
    return click.option("--seed", type=int, default=0, show_default=True, help=f"Seed of {what}.")


def device_option(what: str):
    return click.option("--device", default="auto", show_default=True,
                        help=f"Where {what} runs: auto (CUDA when present), cpu, cuda, cuda:N.")


class _EchoHandler(logging.Handler):
    """The library's log records as lines on the stderr of the moment (``click.echo``)."""

    def emit(self, record):
        click.echo(record.getMessage(), err=True)


def verbosity_options(fn):
    """``-q/--quiet`` (the result and errors only: no progress, no plan, no threads line) and ``-v/--verbose``
    (also the details: the ``fpd_convert`` logger at INFO on stderr).  The command gets ``quiet`` (bool);
    ``verbose`` acts through the logger."""
    @functools.wraps(fn)
    def wrapper(*args, quiet=False, verbose=False, **kwargs):
        refuse_together(**{"--quiet": quiet, "--verbose": verbose})
        logger = logging.getLogger("fpd_convert")
        if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
            logger.addHandler(_EchoHandler())
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
        return fn(*args, quiet=quiet, **kwargs)
    wrapper = click.option("-v", "--verbose", is_flag=True, help="Also print the details of the work (the choices "
                           "made, per table or per evaluation).")(wrapper)
    return click.option("-q", "--quiet", is_flag=True, help="Print only the result and errors (no progress, no "
                        "plan, no threads line).")(wrapper)


def stderr_log(quiet: bool):
    """What a command passes as ``log``: a line to stderr, or nothing when ``--quiet``."""
    return (lambda text: None) if quiet else (lambda text: click.echo(text, err=True))


def data_options(fn):
    """``--strict`` and ``--dense-transform``, shared by the commands that read data."""
    fn = advanced("--dense-transform", type=click.Choice(["log", "none"]), default="log", show_default=True,
                  help="log: log(1 + max(x, 0)); none: arrays already transformed.")(fn)
    return click.option("--strict", is_flag=True, help="A malformed data line is an error, not a warning.")(fn)


def _int_list(text, option: str):
    """``"2,4,8"`` -> ``[2, 4, 8]`` (None stays None), with click's message for a bad value."""
    if text is None:
        return None
    try:
        return [int(x) for x in str(text).split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers but got {text!r}", param_hint=option) from None


class SuffixRows(click.ParamType):
    """``--suffix-rows``: auto, balanced, or an int >= 2."""

    name = "auto|balanced|INT"

    def convert(self, value, param, ctx):
        from ..tt.layout import parse_suffix_rows
        try:
            return parse_suffix_rows(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _rank_value(text):
    parts = _int_list(text, "--rank")
    return parts if parts is None or len(parts) > 1 else parts[0]




def threads_option(fn):
    """``--threads N`` on a command that works long on the CPU; before it runs, torch's and BLAS's pools are
    sized to the machine (:func:`fpd_convert.threads.fit_threads`) and the choice is the first line on
    stderr."""
    @functools.wraps(fn)
    def wrapper(*args, threads=None, **kwargs):
        from ..threads import fit_threads
        fitted = fit_threads(threads)
        if not kwargs.get("quiet"):
            click.echo(fitted.describe(), err=True)
        return fn(*args, **kwargs)
    return click.option("--threads", type=click.IntRange(1), default=None,
                        help="CPU threads for torch and BLAS [default: the CPUs this process may use (affinity, "
                             "cgroup quota) less those busy with other work; OMP_NUM_THREADS set: as it says].")(wrapper)


def refuse_together(**given) -> None:
    """Refuse options that exclude each other, by their flags: ``refuse_together(**{"--json": a, "--markdown": b})``."""
    chosen = [flag for flag, value in given.items() if value not in (None, False)]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(chosen)} cannot be used together: give one of them")
