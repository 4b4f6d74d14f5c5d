"""The commands on data and training: synth, train, finetune, report, demo."""
from __future__ import annotations

import json
import os

import click

from .group import friendly_errors, main
from .options import _int_list, data_options, refuse_together, threads_option


@main.command()
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("-n", "--rows", type=click.IntRange(1), default=100_000, show_default=True, help="Number of samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample seed (the hidden teacher is fixed).")
@click.option("--format", "fmt", type=click.Choice(["text", "npz"]), help="Default: npz for .npz, else Criteo text.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@friendly_errors
def synth(output, rows, seed, fmt, force):
    """Generate Criteo-like data (Zipf ids, hidden teacher) as Criteo text or dlrm .npz."""
    from ..data.synth import synth as run
    info = run(output, rows, seed=seed, fmt=fmt, force=force)
    click.echo(f"wrote {info['path']}: {info['rows']:,} rows ({info['format']}), "
               f"{info['positives'] / info['rows']:.1%} positives")


@main.command()
@click.argument("train_data", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The trained checkpoint (.pt).")
@click.option("--val", "val_data", type=click.Path(dir_okay=False), help="Validation data (keeps the best model).")
@click.option("--table-rows", help="Comma-separated 26 table sizes (default: from the .npz, else the synth sizes).")
@click.option("--dim", type=click.IntRange(1), default=16, show_default=True, help="Embedding dim of every table.")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True, help="Passes over the training data.")
@click.option("--batch-size", type=click.IntRange(1), default=512, show_default=True, help="Samples per step.")
@click.option("--lr", type=click.FloatRange(0), default=0.05, show_default=True, help="Learning rate.")
@click.option("--optimizer", type=click.Choice(["sgd", "adagrad", "adam"]), default="adagrad", show_default=True,
              help="Optimizer of every parameter (the state is saved with the model).")
@click.option("--max-steps", type=click.IntRange(1), help="Stop after N steps.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@data_options
@friendly_errors
@threads_option
def train(train_data, output, val_data, table_rows, dim, epochs, batch_size, lr, optimizer, max_steps, force, strict,
          dense_transform):
    """Train a baseline DLRM (facebookresearch/dlrm layout)."""
    from ..training.train import train as run
    rows = _int_list(table_rows, "--table-rows")
    r = run(train_data, output, val_data, rows, dim=dim, epochs=epochs, batch_size=batch_size, lr=lr,
            optimizer=optimizer, max_steps=max_steps, force=force, strict=strict, dense_transform=dense_transform)
    auc = f", val AUC {r['val']['auc']:.4f}" if r["val"] else ""
    click.echo(f"wrote {r['output']} after {r['steps']} steps ({r['samples'] / r['seconds']:,.0f} samples/s){auc}")


@main.command()
@click.argument("compressed", type=click.Path(dir_okay=False))
@click.option("--train", "train_data", required=True, type=click.Path(dir_okay=False), help="Training data.")
@click.option("--val", "val_data", type=click.Path(dir_okay=False), help="Validation data (keeps the best model).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The fine-tuned compressed model (.safetensors).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--optimizer", type=click.Choice(["sgd", "adagrad", "adam"]), default="adagrad", show_default=True,
              help="Optimizer of the TT cores and the MLPs.")
@click.option("--lr", type=click.FloatRange(0), default=0.0001, show_default=True,
              help="MLPs and dense tables (0: kept as they are).")
@click.option("--tt-lr", type=click.FloatRange(0), default=0.01, show_default=True, help="TT cores.")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True, help="Passes over the training data.")
@click.option("--max-steps", type=click.IntRange(1), help="Stop after N steps.")
@click.option("--batch-size", type=click.IntRange(1), default=512, show_default=True, help="Global batch size.")
@click.option("--eval-every", type=click.IntRange(1), help="Validate every N steps (and at each epoch's end).")
@click.option("--patience", type=click.IntRange(1), help="Stop after N evaluations without a better AUC.")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True, help="Data-loading worker processes.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUTPUT.resume.pt.")
@click.option("--torchrec", is_flag=True, help="Train as a TorchRec model (torchrec.models.dlrm with KeyedJaggedTensors); "
              "under torchrun, DistributedModelParallel shards the dense tables. Needs torchrec.")
@click.option("--checkpoint-every", type=click.IntRange(1), default=None,
              help="Write OUTPUT.resume.pt every N steps (it is also written every 10 minutes and on Ctrl-C).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@data_options
@friendly_errors
@threads_option
def finetune(compressed, train_data, val_data, output, device, optimizer, lr, tt_lr, epochs, max_steps, batch_size,
             eval_every, patience, workers, resume, torchrec, checkpoint_every, force, as_json, strict, dense_transform):
    """Fine-tune a compressed model (TT cores and MLPs) to recover AUC. Multi-GPU: torchrun."""
    from ..training.finetune import finetune as run
    r = run(compressed, train_data, output, val_data, device=device, optimizer=optimizer, lr=lr, tt_lr=tt_lr,
            epochs=epochs, max_steps=max_steps, batch_size=batch_size, eval_every=eval_every, patience=patience,
            resume=resume, force=force, workers=workers, progress=not as_json, strict=strict,
            dense_transform=dense_transform, checkpoint_every=checkpoint_every, torchrec=torchrec)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one report: rank 0's
        return
    if as_json:
        click.echo(json.dumps(r, indent=2))
    elif r["interrupted"]:
        click.echo(f"interrupted after {r['steps']} steps; state saved to {r['resume_state']}. "
                   "Run the same command with --resume to continue.")
        raise SystemExit(130)
    else:
        from ..training.finetune import describe_best
        click.echo(f"wrote {r['output']}: {r['steps']} steps on {r['device']}, {r['samples_per_s']:,.0f} samples/s; "
                   f"{describe_best(r)}")


@main.command()
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("compressed", type=click.Path(dir_okay=False))
@click.argument("finetuned", required=False, type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(dir_okay=False), help="Test data for AUC and logloss.")
@click.option("--max-rows", type=click.IntRange(1), help="Evaluate on the first N rows only.")
@click.option("--no-int8", is_flag=True, help="Skip the int8 row-wise baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--markdown", is_flag=True, help="Print the report's tables as Markdown.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write size and AUC bars to this PNG.")
@click.option("--force", is_flag=True, help="Overwrite an existing --plot file.")
@click.option("--skip-source-check", is_flag=True,
              help="Compare even when COMPRESSED was not made from ORIGINAL (their SHA-256 differ).")
@data_options
@friendly_errors
@threads_option
def report(original, compressed, finetuned, data, max_rows, no_int8, as_json, markdown, plot, force,
           skip_source_check, strict, dense_transform):
    """Size and AUC of ORIGINAL, COMPRESSED (and FINETUNED), with int8 row-wise as a baseline."""
    refuse_together(**{"--json": as_json, "--markdown": markdown})
    from ..reporting.report import format_report, report as run, to_json
    r = run(original, compressed, finetuned, data=data, max_rows=max_rows, int8=not no_int8, strict=strict,
            dense_transform=dense_transform, check_source=not skip_source_check, plot=plot, force=force)
    click.echo(to_json(r) if as_json else format_report(r, markdown=markdown))


@main.command()
@click.option("--dir", "folder", default="fpd-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo's data, models and report.")
@click.option("--train-rows", type=click.IntRange(1), default=300_000, show_default=True,
              help="Generated training samples (validation 30,000 and test 50,000).")
@click.option("--ratio", type=float, default=20.0, show_default=True, help="Compression ratio of the 5 largest tables.")
@friendly_errors
@threads_option
def demo(folder, train_rows, ratio):
    """The main job on generated data: synth -> train -> compress -> finetune -> report."""
    from ..demo import run_demo
    run_demo(folder, train_rows=train_rows, ratio=ratio, echo=click.echo)


