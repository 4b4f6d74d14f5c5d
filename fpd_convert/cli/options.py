"""Options and parameter types that several commands share."""
from __future__ import annotations

import click


def data_options(fn):
    """``--strict`` and ``--dense-transform``, shared by the commands that read data."""
    fn = click.option("--dense-transform", type=click.Choice(["log", "none"]), default="log", show_default=True,
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
    import functools

    @functools.wraps(fn)
    def wrapper(*args, threads=None, **kwargs):
        from ..threads import fit_threads
        click.echo(fit_threads(threads).describe(), err=True)
        return fn(*args, **kwargs)
    return click.option("--threads", type=click.IntRange(1), default=None,
                        help="CPU threads for torch and BLAS [default: the CPUs this process may use (affinity, "
                             "cgroup quota) less those busy with other work; OMP_NUM_THREADS set: as it says].")(wrapper)


def refuse_together(**given) -> None:
    """Refuse options that exclude each other, by their flags: ``refuse_together(**{"--json": a, "--markdown": b})``."""
    chosen = [flag for flag, value in given.items() if value not in (None, False)]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(chosen)} cannot be used together: give one of them")
