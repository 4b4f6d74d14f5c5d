"""``fpd-convert bench``: speed and memory measured against a baseline in the same run."""
from __future__ import annotations

import json

import click

from .group import friendly_errors, main
from .options import SuffixRows, _int_list, advanced, device_option, json_option, threads_option, verbosity_options


@main.command()
@click.option("--rows", type=click.IntRange(1), default=1_000_000, show_default=True,
              help="Rows of the benchmark's table (--memory: the cap on the Terabyte tables' rows).")
@click.option("--dim", type=click.IntRange(1), default=64, show_default=True, help="Embedding dim of the tables.")
@advanced("--rank", type=click.IntRange(1), default=16, show_default=True, help="TT rank of the benchmark's tables.")
@advanced("--batch", type=click.IntRange(1), default=None, help="Bags per batch [8192 for lookups; DLRM step: "
              "65536 on CUDA, 2048 on CPU].")
@advanced("--pooling", type=click.IntRange(1), default=1, show_default=True, help="Ids per bag.")
@advanced("--zipf", type=click.FloatRange(0), default=1.1, show_default=True,
              help="Exponent of the ids' popularity (0: uniform).")
@device_option("the timed work")
@advanced("--kernel", type=click.Choice(["auto", "reference", "cpu", "triton"]), default="auto",
              show_default=True, help="TT row path to time (the reference is timed beside it).")
@advanced("--reps", type=click.IntRange(1), default=10, show_default=True, help="Timed repetitions (the median is reported).")
@advanced("--dim-factors", default=None, help="Lookups: the TT's factors of --dim, e.g. 2,4,8 "
              "[default: as balanced as possible].")
@advanced("--suffix-rows", type=SuffixRows(), default="auto", show_default=True,
              help="The TT tables' row factors: auto (the byte-neutral long first core at --rank, as compress "
              "picks), balanced, or an int the trailing row factors multiply to (the first takes the rest).")
@advanced("--batches", type=click.IntRange(1), default=1, show_default=True,
              help="Lookups: cycle through this many distinct batches (1: the same batch every time).")
@click.option("--step", is_flag=True, help="Also time a DLRM training step, dense vs TT tables.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="DLRM step (or --serve) on this compressed file's model (implies --step).")
@advanced("--tt-tables", type=click.IntRange(0), default=5, show_default=True, help="DLRM step: tables in TT.")
@advanced("--rows-cap", type=click.IntRange(1), default=None,
              help="DLRM step: cap on table rows [10M on CUDA, 200k on CPU].")
@advanced("--hot-rows", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Lookups: give the TT table a row map of this fraction of its hottest ids (timed beside the "
                   "same table without).")
@advanced("--exact-rows", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Lookups: keep this fraction of the hottest ids as exact rows.")
@click.option("--serve", is_flag=True, help="Instead of lookups: the whole model's inference (the demo's, or "
              "--model's) at batch 1, 64 and 2,048 (or --batch) in eager PyTorch, torch.compile, AOTInductor and "
              "ONNX Runtime, beside the same model with dense tables.")
@click.option("--svd", is_flag=True, help="Instead of lookups: TT-SVD of a rows x dim table written to disk, "
              "in memory (TensorLy) and streamed, each in its own process (seconds, peak RSS, error).")
@click.option("--memory", is_flag=True, help="Instead of lookups: a facebookresearch/dlrm checkpoint of the Criteo "
              "Terabyte tables capped at --rows rows x --dim, written to disk; compress --ratio 50, decompress, and "
              "compress of it saved as a DCP folder, each in its own process: peak RSS against the printed plan "
              "and the largest table.")
@click.option("--compress-cost", is_flag=True, help="Instead of lookups: the CPU time of compress with importance "
              "(the candidate search) against plain TT-SVD, on the demo's trained model (--ratio 20) and on a --rows x "
              "--dim table (--ratio 50), each in its own process.")
@click.option("--fidelity", is_flag=True, help="Instead of lookups: the fidelity set: DLRMs trained 2 epochs with SGD, "
              "Adagrad and Adam at dims 16 and 64, compressed --ratio 50 without data (beside plain TT-SVD and int8) "
              "and --ratio 200 with data, fine-tuned against a control; AUC differences on 50k test rows.")
@click.option("--thread-fit", is_flag=True, help="Instead of lookups: a 200-step train and the demo's compress with "
              "the default threads against --threads 1..N, quiet and beside 2 CPU-bound processes.")
@advanced("--svd-paths", default="memory,stream", show_default=True, help="--svd: the paths to run.")
@advanced("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="--svd: dtype of the table on disk.")
@click.option("--folder", type=click.Path(file_okay=False, exists=True), default=None,
              help="--svd, --memory, --thread-fit: where to write the files (default: the temp folder).")
@json_option("the results")
@verbosity_options
@friendly_errors
@threads_option
def bench(rows, dim, rank, batch, pooling, zipf, device, kernel, reps, dim_factors, suffix_rows, batches, step, model,
          tt_tables, rows_cap, hot_rows, exact_rows, serve, svd, memory, compress_cost, fidelity, thread_fit, svd_paths, dtype, folder,
          as_json,
          quiet):
    """Lookups/s of TTEmbeddingBag vs nn.EmbeddingBag (and a DLRM step), a whole model's serving in every
    runtime (--serve), TT-SVD paths (--svd), or a big model's compress and decompress memory (--memory), in one
    run."""
    if fidelity:
        from ..bench.fidelity import bench_fidelity, format_fidelity
        out = bench_fidelity(folder=folder, echo=None if as_json or quiet else lambda text: click.echo(text, err=True))
        click.echo(json.dumps(out, indent=2) if as_json else format_fidelity(out))
        return
    if compress_cost:
        from ..bench.compress_cost import bench_compress_cost, format_compress_cost
        out = bench_compress_cost(rows, dim, folder=folder,
                                  echo=None if as_json or quiet else lambda text: click.echo(text, err=True))
        click.echo(json.dumps(out, indent=2) if as_json else format_compress_cost(out))
        return
    if thread_fit:
        from ..bench.threads import bench_threads, format_threads
        out = bench_threads(folder=folder, echo=None if as_json or quiet else lambda text: click.echo(text, err=True))
        click.echo(json.dumps(out, indent=2) if as_json else format_threads(out))
        return
    if memory:
        from ..bench.memory import bench_memory, format_memory
        out = bench_memory(rows, dim, folder=folder, echo=None if as_json or quiet else lambda text: click.echo(text, err=True))
        click.echo(json.dumps(out, indent=2) if as_json else format_memory(out))
        return
    if serve:
        from ..bench.serve import RUNTIMES, bench_serve, format_serve
        runtimes = list(RUNTIMES)
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            runtimes.remove("onnx")
            click.echo("Warning: onnxruntime is not installed: ONNX Runtime is left out (pip install onnxruntime)",
                       err=True)
        out = bench_serve(model, [batch] if batch else [1, 64, 2048], runtimes, reps=max(reps, 60), zipf=zipf,
                          device="cpu" if device == "auto" else device,
                          echo=None if as_json or quiet else lambda text: click.echo(text, err=True))
        click.echo(json.dumps(out, indent=2) if as_json else format_serve(out))
        return
    if svd:
        from ..bench.svd import bench_svd, format_svd
        out = bench_svd(rows, dim, rank, dtype, [p.strip() for p in svd_paths.split(",")], folder,
                        echo=None if as_json or quiet else lambda text: click.echo(text, err=True))
        click.echo(json.dumps(out, indent=2) if as_json else format_svd(out))
        return
    from ..bench.lookups import bench_lookups, format_lookups
    results = {"lookups": bench_lookups(rows, dim, rank, batch or 8192, pooling, zipf, device, reps, kernel=kernel,
                                        hot_rows=hot_rows, exact_rows=exact_rows, batches=batches,
                                        dim_factors=_int_list(dim_factors, "--dim-factors"),
                                        suffix_rows=suffix_rows)}
    if not as_json:
        click.echo(format_lookups(results["lookups"]))
    if step or model:
        from ..bench.dlrm_step import bench_dlrm_step, format_dlrm_step
        results["dlrm_step"] = bench_dlrm_step(model, rows_cap, dim, tt_tables, rank,
                                               batch, zipf, device, reps, suffix_rows=suffix_rows)
        if not as_json:
            click.echo(format_dlrm_step(results["dlrm_step"]))
    if as_json:
        click.echo(json.dumps(results, indent=2))

