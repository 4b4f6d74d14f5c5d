"""The commands on model files: compress, inspect, decompress, export."""
from __future__ import annotations

import json

import click

from .group import friendly_errors, main
from .options import (SuffixRows, _int_list, _rank_value, advanced, force_option, json_option, output_option,
                      refuse_together, seed_option, stderr_log, threads_option, verbosity_options)


@main.command()
@click.argument("model", type=click.Path())
@output_option("Compressed .safetensors file [default: beside MODEL, model.pt -> model.tt.safetensors].", required=False)
@click.option("--tables", help="Comma-separated table names, weight keys or indices (default: the 5 largest).")
@click.option("--min-rows", type=click.IntRange(1), help="Compress every table with at least this many rows.")
@click.option("--num-largest", type=click.IntRange(1), default=5, show_default=True, help="How many of the largest tables.")
@click.option("--ratio", type=float, help="Target compression ratio of the chosen tables together (their dense "
              "bytes / their compressed bytes); the bytes go where they cost the least error, so one table's "
              "ratio may differ.")
@click.option("--budget", help="Total size of the compressed tables, e.g. 3GB, 50MB.")
@click.option("--rank", help="TT rank: one int, or inner ranks 'r1,r2' (default 32 if no other rule).")
@click.option("--tol", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Relative reconstruction error per table (delta-truncated TT-SVD), between 0 and 1.")
@click.option("--importance", type=click.Choice(["none", "auto", "data", "optimizer", "norm", "drift"]),
              default="auto", show_default=True, help="Importance-aware TT-SVD: row importance from --data (lookup "
              "counts), the checkpoint's optimizer state (the root of each row's sum of Adagrad's or Adam's squared gradients), or the "
              "weights (norm, or drift above the untrained bulk); auto: data if given, else the optimizer's state "
              "if the checkpoint has it, else norm. none: plain TT-SVD in natural row order.")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Training data sample for row importance (any format the data readers take).")
@click.option("--optimizer-state", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The optimizer's state saved apart from MODEL, for importance without data: a torch.optim "
              "state_dict, or one keyed by parameter names (TorchRec's KeyedOptimizer.state_dict(), or a fused "
              "collection's fused_optimizer().state_dict()).")
@click.option("--core-dtype", type=click.Choice(["float32", "bfloat16", "float16", "int8"]), default="float32",
              show_default=True, help="Storage of the TT cores (int8: per-slice scales).")
@seed_option("the randomized SVDs")
@advanced("--layout", type=click.Choice(["dlrm", "torchrec", "generic"]), help="Force the source layout.")
@click.option("--yes", is_flag=True, help="Generic files: compress the detected tables without asking.")
@force_option
@click.option("--allow-unsafe-pickle", is_flag=True, help="Load a .pt that needs arbitrary unpickling (trusted files only).")
@json_option("the summary")
@advanced("--order", type=click.IntRange(2, 4), default=3, show_default=True, help="Number of TT cores.")
@advanced("--dim-factors", help="Factors of the tables' dim, e.g. 2,4,8 (their count sets the order; default: "
          "as balanced as possible). A first factor of 2 makes CPU lookups faster.")
@advanced("--suffix-rows", type=SuffixRows(), default="auto", show_default=True,
          help="Row factors. auto: a long first core over the smallest suffix whose TT is no larger than "
          "the balanced one at the same ranks (balanced with --tol); balanced; or an int, the product of "
          "the trailing row factors (the first takes the rest). A small suffix keeps CPU lookups in cache.")
@advanced("--svd", type=click.Choice(["auto", "truncated_svd", "randomized_svd"]), default="auto",
          show_default=True, help="SVD of the in-memory (TensorLy) path.")
@advanced("--svd-path", type=click.Choice(["auto", "memory", "stream"]), default="auto", show_default=True,
          help="memory: TensorLy on the whole table; stream: randomized TT-SVD over row chunks (tables "
               "that do not fit); auto: by size.")
@advanced("--workers", type=click.IntRange(1), default=1, show_default=True,
          help="Tables decomposed at once (lowered if memory does not allow).")
@advanced("--power-iters", type=click.IntRange(0), default=1, show_default=True,
          help="Streaming path: power iterations (each is two more passes over the table).")
@advanced("--data-rows", type=click.IntRange(1), default=1_000_000, show_default=True, help="Samples of --data to count.")
@advanced("--hot-rows", type=click.FloatRange(0, 1), default=0.02, show_default=True,
          help="Fraction of rows moved to the leading TT rows (the row map).")
@advanced("--exact-rows", type=click.FloatRange(0, 1), default=None,
          help="Fraction of rows kept exactly [budget/ratio: chosen among 0-2%; rank/tol: 0].")
@advanced("--exact-dtype", type=click.Choice(["float32", "bfloat16", "float16", "int8"]), default="float32",
          show_default=True, help="Storage of the exact rows (int8: per-row scales).")
@advanced("--keep-larger", is_flag=True, help="Keep a TT even when it is not smaller (full-rank checks).")
@verbosity_options
@friendly_errors
@threads_option
def compress(model, output, tables, min_rows, num_largest, rank, ratio, budget, tol, order, dim_factors, suffix_rows,
             svd, svd_path,
             workers, power_iters, seed, importance, data_path, data_rows, hot_rows, exact_rows, core_dtype, exact_dtype,
             layout, yes, force, allow_unsafe_pickle, keep_larger, as_json, quiet, optimizer_state):
    """Replace the largest embedding tables of MODEL by TT cores (TT-SVD)."""
    from ..convert import compress as run, inspect as describe
    from ..convert.importance import FidelityOptions
    from ..convert.selection import select_tables
    refuse_together(**{"--tables": tables, "--min-rows": min_rows})
    names = [t.strip() for t in tables.split(",")] if tables else None
    if names is None and min_rows is None and not yes:
        info = describe(model, allow_unsafe_pickle=allow_unsafe_pickle)
        if (layout or info["layout"]) == "generic" and not info.get("compressed"):  # compress refuses those
            chosen = select_tables(info["tables"], num_largest=num_largest)
            named = any(t.get("named_as_table") for t in info["tables"])
            text = (f"generic state_dict; the largest {'tensors named as embedding tables' if named else '2D tensors'}"
                    f" are: " + ", ".join(t["key"] for t in chosen))
            others = [t["key"] for t in info["tables"] if t not in chosen][:3]
            if named and others:
                text += f" (not {', '.join(others)}{' ...' if len(info['tables']) - len(chosen) > 3 else ''})"
            if not click.get_text_stream("stdin").isatty():
                raise click.ClickException(f"{text}. Pass --yes to compress them, or choose with --tables")
            click.echo(text, err=True)
            click.confirm("compress these?", default=True, abort=True, err=True)
    summary = run(model, output, tables=names, min_rows=min_rows, num_largest=num_largest, rank=_rank_value(rank),
                  ratio=ratio, budget=budget, tol=tol, order=order, svd=svd, layout=layout, force=force,
                  allow_unsafe_pickle=allow_unsafe_pickle, progress=not (as_json or quiet), keep_larger=keep_larger,
                  svd_path=svd_path, workers=workers, power_iters=power_iters, seed=seed,
                  log=stderr_log(quiet), data=data_path, data_rows=data_rows,
                  fidelity=FidelityOptions(importance, hot_rows, exact_rows, core_dtype, exact_dtype),
                  dim_factors=_int_list(dim_factors, "--dim-factors"), suffix_rows=suffix_rows,
                  optimizer_state=optimizer_state)
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.format())


@main.command()
@click.argument("path", type=click.Path())
@json_option("what the file holds")
@click.option("--allow-unsafe-pickle", is_flag=True, help="Load a .pt that needs arbitrary unpickling (trusted files only).")
@friendly_errors
def inspect(path, as_json, allow_unsafe_pickle):
    """Show the layout, architecture and tables of a checkpoint or compressed file."""
    from ..convert import format_inspect, inspect as run
    info = run(path, allow_unsafe_pickle=allow_unsafe_pickle)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspect(info))


@main.command()
@click.argument("compressed", type=click.Path(dir_okay=False))
@output_option("Dense checkpoint to write (the source's container: .pt or .safetensors) [default: beside it, "
               "model.tt.safetensors -> model.dense.pt].", required=False)
@force_option
@json_option("what was written")
@verbosity_options
@friendly_errors
@threads_option
def decompress(compressed, output, force, as_json, quiet):
    """Rebuild dense tables and write the checkpoint in its source layout."""
    from ..convert import decompress as run
    result = run(compressed, output, force=force, log=None if as_json else stderr_log(quiet))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"wrote {result['output']} ({result['container']}, {result['tensors']} tensors; "
               f"rebuilt {len(result['tables_rebuilt'])} tables)")


@main.command()
@click.argument("compressed", type=click.Path(dir_okay=False))
@output_option("The program to write (.pt2 for pt2 and aoti, .onnx for onnx) [default: beside COMPRESSED, "
               "model.pt2, model.aoti.pt2, model.onnx].", required=False)
@click.option("--format", "fmt", type=click.Choice(["pt2", "aoti", "onnx"]), default="pt2", show_default=True,
              help="pt2: torch.export program (torch.export.load); aoti: AOTInductor package "
                   "(torch._inductor.aoti_load_package); onnx: ONNX, checked with ONNX Runtime.")
@click.option("--pooled", is_flag=True, help="DLRM models: take each feature as (indices, offsets) bags of any "
              "length instead of one id per sample.")
@click.option("--lookup", type=click.Choice(["portable", "fpd"]), default="portable", show_default=True,
              help="portable: standard operators only (nothing of fpd-convert needed to run it); fpd: keep "
                   "fpd-convert's operators (pt2 only; faster on the CPU; `import fpd_convert.layers` to load).")
@seed_option("the generated batch of the parity check")
@force_option
@json_option("what was written")
@verbosity_options
@friendly_errors
@threads_option
def export(compressed, output, fmt, pooled, lookup, seed, force, as_json, quiet):
    """Write COMPRESSED as a program for torch.export, AOTInductor or ONNX Runtime, checked against load()."""
    from ..convert.export import export as run, format_export
    r = run(compressed, output, format=fmt, pooled=pooled, lookup=lookup, force=force, seed=seed,
            log=None if as_json or quiet else stderr_log(quiet))
    click.echo(json.dumps(r, indent=2) if as_json else format_export(r))


