"""The ``fpd-convert`` command line: thin click commands over the library."""
from __future__ import annotations

import functools
import json

import click

from . import __version__


def friendly_errors(fn):
    """Library errors become ``Error: <message>`` and exit status 1, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .checkpoints import CheckpointError, OutputError
        try:
            return fn(*args, **kwargs)
        except (CheckpointError, OutputError, ValueError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fpd-convert")
def main():
    """Compress trained recommender models with tensor-train (TT) embedding tables."""


def _rank_value(text):
    if text is None:
        return None
    parts = [int(x) for x in str(text).split(",")]
    return parts[0] if len(parts) == 1 else parts


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Compressed .safetensors file.")
@click.option("--tables", help="Comma-separated table names, weight keys or indices (default: the 5 largest).")
@click.option("--min-rows", type=int, help="Compress every table with at least this many rows.")
@click.option("--num-largest", type=int, default=5, show_default=True, help="How many of the largest tables.")
@click.option("--rank", help="TT rank: one int, or inner ranks 'r1,r2' (default 32 if no other rule).")
@click.option("--ratio", type=float, help="Target compression ratio per table (dense params / TT params).")
@click.option("--budget", help="Total size of the compressed tables, e.g. 3GB, 50MB.")
@click.option("--tol", type=float, help="Relative reconstruction error per table (delta-truncated TT-SVD).")
@click.option("--order", type=click.IntRange(2, 4), default=3, show_default=True, help="Number of TT cores.")
@click.option("--svd", type=click.Choice(["auto", "truncated_svd", "randomized_svd"]), default="auto",
              show_default=True)
@click.option("--layout", type=click.Choice(["dlrm", "torchrec", "generic"]), help="Force the source layout.")
@click.option("--yes", is_flag=True, help="Generic files: compress the detected tables without asking.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--allow-unsafe-pickle", is_flag=True, help="Load a .pt that needs arbitrary unpickling (trusted files only).")
@click.option("--keep-larger", is_flag=True, help="Keep a TT even when it is not smaller (full-rank checks).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@friendly_errors
def compress(model, output, tables, min_rows, num_largest, rank, ratio, budget, tol, order, svd, layout, yes,
             force, allow_unsafe_pickle, keep_larger, as_json):
    """Replace the largest embedding tables of MODEL by TT cores (TT-SVD)."""
    from .convert import compress as run, inspect as describe
    names = [t.strip() for t in tables.split(",")] if tables else None
    if names is None and min_rows is None and not yes:
        info = describe(model, allow_unsafe_pickle=allow_unsafe_pickle)
        if (layout or info["layout"]) == "generic":
            shown = [t["key"] for t in info["tables"][:num_largest]]
            click.echo("generic state_dict; the largest 2D tensors are: " + ", ".join(shown), err=True)
            click.confirm("compress these?", default=True, abort=True, err=True)
    summary = run(model, output, tables=names, min_rows=min_rows, num_largest=num_largest, rank=_rank_value(rank),
                  ratio=ratio, budget=budget, tol=tol, order=order, svd=svd, layout=layout, force=force,
                  allow_unsafe_pickle=allow_unsafe_pickle, progress=not as_json, keep_larger=keep_larger)
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.format())


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--allow-unsafe-pickle", is_flag=True, help="Load a .pt that needs arbitrary unpickling (trusted files only).")
@friendly_errors
def inspect(path, as_json, allow_unsafe_pickle):
    """Show the layout, architecture and tables of a checkpoint or compressed file."""
    from .convert import format_inspect, inspect as run
    info = run(path, allow_unsafe_pickle=allow_unsafe_pickle)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspect(info))


@main.command()
@click.argument("compressed", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Dense checkpoint to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@friendly_errors
def decompress(compressed, output, force):
    """Rebuild dense tables and write the checkpoint in its source layout."""
    from .convert import decompress as run
    result = run(compressed, output, force=force)
    click.echo(f"wrote {result['output']} ({result['container']}, {result['tensors']} tensors; "
               f"rebuilt {len(result['tables_rebuilt'])} tables)")


if __name__ == "__main__":
    main()
