"""The ``fpd-convert`` command line: thin click commands over the library."""
from __future__ import annotations

import functools
import json

import click

from . import __version__


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
    from .allocator import keep_freed_memory
    keep_freed_memory()  # CPU steps reuse freed buffers instead of faulting fresh pages in (FPD_MALLOC=system: off)


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
        from .tt.layout import parse_suffix_rows
        try:
            return parse_suffix_rows(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _rank_value(text):
    parts = _int_list(text, "--rank")
    return parts if parts is None or len(parts) > 1 else parts[0]


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Compressed .safetensors file.")
@click.option("--tables", help="Comma-separated table names, weight keys or indices (default: the 5 largest).")
@click.option("--min-rows", type=click.IntRange(1), help="Compress every table with at least this many rows.")
@click.option("--num-largest", type=click.IntRange(1), default=5, show_default=True, help="How many of the largest tables.")
@click.option("--rank", help="TT rank: one int, or inner ranks 'r1,r2' (default 32 if no other rule).")
@click.option("--ratio", type=float, help="Target compression ratio per table (dense params / TT params).")
@click.option("--budget", help="Total size of the compressed tables, e.g. 3GB, 50MB.")
@click.option("--tol", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Relative reconstruction error per table (delta-truncated TT-SVD), between 0 and 1.")
@click.option("--order", type=click.IntRange(2, 4), default=3, show_default=True, help="Number of TT cores.")
@click.option("--dim-factors", help="Factors of the tables' dim, e.g. 2,4,8 (their count sets the order; default: "
              "as balanced as possible). A first factor of 2 makes CPU lookups faster.")
@click.option("--suffix-rows", type=SuffixRows(), default="auto", show_default=True,
              help="Row factors. auto: a long first core over the smallest suffix whose TT is no larger than "
              "the balanced one at the same ranks (balanced with --tol); balanced; or an int, the product of "
              "the trailing row factors (the first takes the rest). A small suffix keeps CPU lookups in cache.")
@click.option("--svd", type=click.Choice(["auto", "truncated_svd", "randomized_svd"]), default="auto",
              show_default=True, help="SVD of the in-memory (TensorLy) path.")
@click.option("--svd-path", type=click.Choice(["auto", "memory", "stream"]), default="auto", show_default=True,
              help="memory: TensorLy on the whole table; stream: randomized TT-SVD over row chunks (tables "
                   "that do not fit); auto: by size.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Tables decomposed at once (lowered if memory does not allow).")
@click.option("--power-iters", type=click.IntRange(0), default=1, show_default=True,
              help="Streaming path: power iterations (each is two more passes over the table).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVDs.")
@click.option("--importance", type=click.Choice(["none", "auto", "data", "norm", "drift"]), default="auto",
              show_default=True, help="Importance-aware TT-SVD: row importance from --data (lookup counts) or the "
              "weights (norm, or drift above the untrained bulk); auto: data if given, else norm. none: plain "
              "TT-SVD in natural row order.")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Training data sample for row importance (any format the data readers take).")
@click.option("--data-rows", type=click.IntRange(1), default=1_000_000, show_default=True, help="Samples of --data to count.")
@click.option("--hot-rows", type=click.FloatRange(0, 1), default=0.02, show_default=True,
              help="Fraction of rows moved to the leading TT rows (the row map).")
@click.option("--exact-rows", type=click.FloatRange(0, 1), default=None,
              help="Fraction of rows kept exactly [budget/ratio: chosen among 0-2%; rank/tol: 0].")
@click.option("--core-dtype", type=click.Choice(["float32", "bfloat16", "float16", "int8"]), default="float32",
              show_default=True, help="Storage of the TT cores (int8: per-slice scales).")
@click.option("--exact-dtype", type=click.Choice(["float32", "bfloat16", "float16", "int8"]), default="float32",
              show_default=True, help="Storage of the exact rows (int8: per-row scales).")
@click.option("--layout", type=click.Choice(["dlrm", "torchrec", "generic"]), help="Force the source layout.")
@click.option("--yes", is_flag=True, help="Generic files: compress the detected tables without asking.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--allow-unsafe-pickle", is_flag=True, help="Load a .pt that needs arbitrary unpickling (trusted files only).")
@click.option("--keep-larger", is_flag=True, help="Keep a TT even when it is not smaller (full-rank checks).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@friendly_errors
def compress(model, output, tables, min_rows, num_largest, rank, ratio, budget, tol, order, dim_factors, suffix_rows,
             svd, svd_path,
             workers, power_iters, seed, importance, data_path, data_rows, hot_rows, exact_rows, core_dtype, exact_dtype,
             layout, yes, force, allow_unsafe_pickle, keep_larger, as_json):
    """Replace the largest embedding tables of MODEL by TT cores (TT-SVD)."""
    from .convert import compress as run, inspect as describe
    from .convert.importance import FidelityOptions
    names = [t.strip() for t in tables.split(",")] if tables else None
    if names is None and min_rows is None and not yes:
        info = describe(model, allow_unsafe_pickle=allow_unsafe_pickle)
        if (layout or info["layout"]) == "generic":
            shown = [t["key"] for t in info["tables"][:num_largest]]
            text = "generic state_dict; the largest 2D tensors are: " + ", ".join(shown)
            if not click.get_text_stream("stdin").isatty():
                raise click.ClickException(f"{text}. Pass --yes to compress them, or choose with --tables")
            click.echo(text, err=True)
            click.confirm("compress these?", default=True, abort=True, err=True)
    summary = run(model, output, tables=names, min_rows=min_rows, num_largest=num_largest, rank=_rank_value(rank),
                  ratio=ratio, budget=budget, tol=tol, order=order, svd=svd, layout=layout, force=force,
                  allow_unsafe_pickle=allow_unsafe_pickle, progress=not as_json, keep_larger=keep_larger,
                  svd_path=svd_path, workers=workers, power_iters=power_iters, seed=seed,
                  log=lambda text: click.echo(text, err=True), data=data_path, data_rows=data_rows,
                  fidelity=FidelityOptions(importance, hot_rows, exact_rows, core_dtype, exact_dtype),
                  dim_factors=_int_list(dim_factors, "--dim-factors"), suffix_rows=suffix_rows)
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


# --- data, training and reporting ---------------------------------------------------

@main.command()
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("-n", "--rows", type=click.IntRange(1), default=100_000, show_default=True, help="Number of samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample seed (the hidden teacher is fixed).")
@click.option("--format", "fmt", type=click.Choice(["text", "npz"]), help="Default: npz for .npz, else Criteo text.")
@click.option("--force", is_flag=True)
@friendly_errors
def synth(output, rows, seed, fmt, force):
    """Generate Criteo-like data (Zipf ids, hidden teacher) as Criteo text or dlrm .npz."""
    from .data.synth import synth as run
    info = run(output, rows, seed=seed, fmt=fmt, force=force)
    click.echo(f"wrote {info['path']}: {info['rows']:,} rows ({info['format']}), "
               f"{info['positives'] / info['rows']:.1%} positives")


@main.command()
@click.argument("train_data", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--val", "val_data", type=click.Path(dir_okay=False), help="Validation data (keeps the best model).")
@click.option("--table-rows", help="Comma-separated 26 table sizes (default: from the .npz, else the synth sizes).")
@click.option("--dim", type=click.IntRange(1), default=16, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=512, show_default=True)
@click.option("--lr", type=click.FloatRange(0), default=0.05, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adagrad", "adam"]), default="adagrad", show_default=True)
@click.option("--max-steps", type=click.IntRange(1))
@click.option("--force", is_flag=True)
@data_options
@friendly_errors
def train(train_data, output, val_data, table_rows, dim, epochs, batch_size, lr, optimizer, max_steps, force, strict,
          dense_transform):
    """Train a baseline DLRM (facebookresearch/dlrm layout)."""
    from .training.train import train as run
    rows = _int_list(table_rows, "--table-rows")
    r = run(train_data, output, val_data, rows, dim=dim, epochs=epochs, batch_size=batch_size, lr=lr,
            optimizer=optimizer, max_steps=max_steps, force=force, strict=strict, dense_transform=dense_transform)
    auc = f", val AUC {r['val']['auc']:.4f}" if r["val"] else ""
    click.echo(f"wrote {r['output']} after {r['steps']} steps ({r['samples'] / r['seconds']:,.0f} samples/s){auc}")


@main.command()
@click.argument("compressed", type=click.Path(dir_okay=False))
@click.option("--train", "train_data", required=True, type=click.Path(dir_okay=False))
@click.option("--val", "val_data", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--optimizer", type=click.Choice(["sgd", "adagrad", "adam"]), default="adagrad", show_default=True)
@click.option("--lr", type=click.FloatRange(0), default=0.0001, show_default=True,
              help="MLPs and dense tables (0: kept as they are).")
@click.option("--tt-lr", type=click.FloatRange(0), default=0.01, show_default=True, help="TT cores.")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True)
@click.option("--max-steps", type=click.IntRange(1))
@click.option("--batch-size", type=click.IntRange(1), default=512, show_default=True, help="Global batch size.")
@click.option("--eval-every", type=click.IntRange(1), help="Validate every N steps (and at each epoch's end).")
@click.option("--patience", type=click.IntRange(1), help="Stop after N evaluations without a better AUC.")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="Data-loading worker processes.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUTPUT.resume.pt.")
@click.option("--checkpoint-every", type=click.IntRange(1), default=None,
              help="Write OUTPUT.resume.pt every N steps (it is also written every 10 minutes and on Ctrl-C).")
@click.option("--force", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@data_options
@friendly_errors
def finetune(compressed, train_data, val_data, output, device, optimizer, lr, tt_lr, epochs, max_steps, batch_size,
             eval_every, patience, workers, resume, checkpoint_every, force, as_json, strict, dense_transform):
    """Fine-tune a compressed model (TT cores and MLPs) to recover AUC. Multi-GPU: torchrun."""
    from .training.finetune import finetune as run
    r = run(compressed, train_data, output, val_data, device=device, optimizer=optimizer, lr=lr, tt_lr=tt_lr,
            epochs=epochs, max_steps=max_steps, batch_size=batch_size, eval_every=eval_every, patience=patience,
            resume=resume, force=force, workers=workers, progress=not as_json, strict=strict,
            dense_transform=dense_transform, checkpoint_every=checkpoint_every)
    if as_json:
        click.echo(json.dumps(r, indent=2))
    elif r["interrupted"]:
        click.echo(f"interrupted after {r['steps']} steps; state saved to {r['resume_state']}. "
                   "Run the same command with --resume to continue.")
        raise SystemExit(130)
    else:
        best = f", best val AUC {r['best']['auc']:.4f}" if r["best"] else ""
        click.echo(f"wrote {r['output']}: {r['steps']} steps on {r['device']}, {r['samples_per_s']:,.0f} samples/s{best}")


@main.command()
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("compressed", type=click.Path(dir_okay=False))
@click.argument("finetuned", required=False, type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(dir_okay=False), help="Test data for AUC and logloss.")
@click.option("--max-rows", type=click.IntRange(1), help="Evaluate on the first N rows only.")
@click.option("--no-int8", is_flag=True, help="Skip the int8 row-wise baseline.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--markdown", is_flag=True)
@click.option("--plot", type=click.Path(dir_okay=False), help="Write size and AUC bars to this PNG.")
@click.option("--force", is_flag=True, help="Overwrite an existing --plot file.")
@click.option("--skip-source-check", is_flag=True,
              help="Compare even when COMPRESSED was not made from ORIGINAL (their SHA-256 differ).")
@data_options
@friendly_errors
def report(original, compressed, finetuned, data, max_rows, no_int8, as_json, markdown, plot, force,
           skip_source_check, strict, dense_transform):
    """Size and AUC of ORIGINAL, COMPRESSED (and FINETUNED), with int8 row-wise as a baseline."""
    from .reporting.report import format_report, report as run, to_json
    r = run(original, compressed, finetuned, data=data, max_rows=max_rows, int8=not no_int8, strict=strict,
            dense_transform=dense_transform, check_source=not skip_source_check, plot=plot, force=force)
    click.echo(to_json(r) if as_json else format_report(r, markdown=markdown))


@main.command()
@click.option("--dir", "folder", default="fpd-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--train-rows", type=click.IntRange(1), default=300_000, show_default=True)
@click.option("--ratio", type=float, default=20.0, show_default=True, help="Compression ratio of the 5 largest tables.")
@friendly_errors
def demo(folder, train_rows, ratio):
    """The main job on generated data: synth -> train -> compress -> finetune -> report."""
    from .demo import run_demo
    run_demo(folder, train_rows=train_rows, ratio=ratio, echo=click.echo)


@main.command()
@click.option("--rows", type=click.IntRange(1), default=1_000_000, show_default=True)
@click.option("--dim", type=click.IntRange(1), default=64, show_default=True)
@click.option("--rank", type=click.IntRange(1), default=16, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=None, help="Bags per batch [8192 for lookups; DLRM step: "
              "65536 on CUDA, 2048 on CPU].")
@click.option("--pooling", type=click.IntRange(1), default=1, show_default=True, help="Ids per bag.")
@click.option("--zipf", type=click.FloatRange(0), default=1.1, show_default=True,
              help="Exponent of the ids' popularity (0: uniform).")
@click.option("--device", default="auto", show_default=True)
@click.option("--kernel", type=click.Choice(["auto", "reference", "cpu", "triton"]), default="auto",
              show_default=True, help="TT row path to time (the reference is timed beside it).")
@click.option("--reps", type=click.IntRange(1), default=10, show_default=True)
@click.option("--dim-factors", default=None, help="Lookups: the TT's factors of --dim, e.g. 2,4,8 "
              "[default: as balanced as possible].")
@click.option("--suffix-rows", type=SuffixRows(), default="auto", show_default=True,
              help="The TT tables' row factors: auto (the byte-neutral long first core at --rank, as compress "
              "picks), balanced, or an int the trailing row factors multiply to (the first takes the rest).")
@click.option("--batches", type=click.IntRange(1), default=1, show_default=True,
              help="Lookups: cycle through this many distinct batches (1: the same batch every time).")
@click.option("--step", is_flag=True, help="Also time a DLRM training step, dense vs TT tables.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="DLRM step on this compressed file's model (implies --step).")
@click.option("--tt-tables", type=click.IntRange(0), default=5, show_default=True, help="DLRM step: tables in TT.")
@click.option("--rows-cap", type=click.IntRange(1), default=None,
              help="DLRM step: cap on table rows [10M on CUDA, 200k on CPU].")
@click.option("--hot-rows", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Lookups: give the TT table a row map of this fraction of its hottest ids (timed beside the "
                   "same table without).")
@click.option("--exact-rows", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Lookups: keep this fraction of the hottest ids as exact rows.")
@click.option("--svd", is_flag=True, help="Instead of lookups: TT-SVD of a rows x dim table written to disk, "
              "in memory (TensorLy) and streamed, each in its own process (seconds, peak RSS, error).")
@click.option("--svd-paths", default="memory,stream", show_default=True, help="--svd: the paths to run.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="--svd: dtype of the table on disk.")
@click.option("--folder", type=click.Path(file_okay=False, exists=True), default=None,
              help="--svd: where to write the table (default: the temp folder).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def bench(rows, dim, rank, batch, pooling, zipf, device, kernel, reps, dim_factors, suffix_rows, batches, step, model,
          tt_tables, rows_cap, hot_rows,
          exact_rows, svd, svd_paths, dtype, folder, as_json):
    """Lookups/s of TTEmbeddingBag vs nn.EmbeddingBag (and a DLRM step), or TT-SVD paths (--svd), in one run."""
    if svd:
        from .bench.svd import bench_svd, format_svd
        out = bench_svd(rows, dim, rank, dtype, [p.strip() for p in svd_paths.split(",")], folder,
                        echo=None if as_json else lambda text: click.echo(text, err=True))
        click.echo(json.dumps(out, indent=2) if as_json else format_svd(out))
        return
    from .bench.lookups import bench_lookups, format_lookups
    results = {"lookups": bench_lookups(rows, dim, rank, batch or 8192, pooling, zipf, device, reps, kernel=kernel,
                                        hot_rows=hot_rows, exact_rows=exact_rows, batches=batches,
                                        dim_factors=_int_list(dim_factors, "--dim-factors"),
                                        suffix_rows=suffix_rows)}
    if not as_json:
        click.echo(format_lookups(results["lookups"]))
    if step or model:
        from .bench.dlrm_step import bench_dlrm_step, format_dlrm_step
        results["dlrm_step"] = bench_dlrm_step(model, rows_cap, dim, tt_tables, rank,
                                               batch, zipf, device, reps, suffix_rows=suffix_rows)
        if not as_json:
            click.echo(format_dlrm_step(results["dlrm_step"]))
    if as_json:
        click.echo(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
