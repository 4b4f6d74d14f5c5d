"""The commands on data and training: synth, train, finetune, report, demo."""
from __future__ import annotations

import json
import os

import click

from .group import friendly_errors, main
from .options import (_int_list, advanced, data_options, device_option, force_option, json_option, output_option,
                      refuse_together, seed_option, stderr_log, threads_option, verbosity_options)

TRAIN_HELP = "Training data (.npz, TorchRec day_N prefix or Criteo text, plain or .gz)."
VAL_HELP = "Validation data (keeps the model of the best validation AUC)."


@main.command()
@output_option("The data file to write (.npz: dlrm arrays; any other name: Criteo text).")
@click.option("-n", "--rows", type=click.IntRange(1), default=100_000, show_default=True, help="Number of samples.")
@seed_option("the samples (the hidden teacher is fixed)")
@click.option("--format", "fmt", type=click.Choice(["text", "npz"]), help="Default: npz for .npz, else Criteo text.")
@force_option
@json_option("what was written")
@friendly_errors
def synth(output, rows, seed, fmt, force, as_json):
    """Generate Criteo-like data (Zipf ids, hidden teacher) as Criteo text or dlrm .npz."""
    from ..data.synth import synth as run
    info = run(output, rows, seed=seed, fmt=fmt, force=force)
    if as_json:
        click.echo(json.dumps({k: str(v) if k == "path" else v for k, v in info.items()}, indent=2))
        return
    click.echo(f"wrote {info['path']}: {info['rows']:,} rows ({info['format']}), "
               f"{info['positives'] / info['rows']:.1%} positives")


@main.command()
@click.option("--train", "train_data", required=True, type=click.Path(dir_okay=False), help=TRAIN_HELP)
@click.option("--val", "val_data", type=click.Path(dir_okay=False), help=VAL_HELP)
@output_option("The trained checkpoint (.pt, facebookresearch/dlrm layout).")
@click.option("--table-rows", help="Comma-separated 26 table sizes [default: the counts in a dlrm .npz, else the "
              "synth sizes; text ids are hashed modulo them].")
@click.option("--dim", type=click.IntRange(1), default=16, show_default=True, help="Embedding dim of every table.")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True, help="Passes over the training data.")
@click.option("--batch-size", type=click.IntRange(1), default=512, show_default=True, help="Samples per step.")
@click.option("--lr", type=click.FloatRange(0), default=0.05, show_default=True, help="Learning rate.")
@click.option("--optimizer", type=click.Choice(["sgd", "adagrad", "adam"]), default="adagrad", show_default=True,
              help="Optimizer of every parameter (the state is saved with the model).")
@click.option("--max-steps", type=click.IntRange(1), help="Stop after N steps.")
@seed_option("the initial weights")
@device_option("training")
@force_option
@json_option()
@data_options
@verbosity_options
@friendly_errors
@threads_option
def train(train_data, output, val_data, table_rows, dim, epochs, batch_size, lr, optimizer, max_steps, seed, device,
          force, as_json, strict, dense_transform, quiet):
    """Train a baseline DLRM (facebookresearch/dlrm layout)."""
    from ..training.train import train as run
    rows = _int_list(table_rows, "--table-rows")
    r = run(train_data, output, val_data, rows, dim=dim, epochs=epochs, batch_size=batch_size, lr=lr,
            optimizer=optimizer, max_steps=max_steps, seed=seed, force=force, strict=strict,
            dense_transform=dense_transform, device=device, progress=not quiet, log=stderr_log(quiet))
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    auc = f", val AUC {r['val']['auc']:.4f}" if r["val"] else ""
    click.echo(f"wrote {r['output']} after {r['steps']:,} steps on {r['device']} "
               f"({r['samples'] / max(r['seconds'], 1e-9):,.0f} samples/s){auc}")


@main.command()
@click.argument("compressed", type=click.Path(dir_okay=False))
@click.option("--train", "train_data", required=True, type=click.Path(dir_okay=False), help=TRAIN_HELP)
@click.option("--val", "val_data", type=click.Path(dir_okay=False), help=VAL_HELP)
@output_option("The fine-tuned compressed model (.safetensors) [default: beside COMPRESSED, model.tt.safetensors "
               "-> model.ft.safetensors].", required=False)
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
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUTPUT.resume.pt.")
@click.option("--torchrec", is_flag=True, help="Train as a TorchRec model (torchrec.models.dlrm with KeyedJaggedTensors); "
              "under torchrun, DistributedModelParallel shards the dense tables. Needs torchrec.")
@click.option("--control", type=click.Path(), help="The original COMPRESSED was made from: fine-tune "
              "it too, with the same schedule and data, for report --control (what the same training gives a model "
              "that lost nothing).")
@click.option("--control-output", type=click.Path(dir_okay=False),
              help="Where --control writes the fine-tuned original [default: OUTPUT's name + .control.safetensors].")
@seed_option("torch's generator while fine-tuning (the data order is the file's)")
@device_option("fine-tuning")
@force_option
@json_option()
@advanced("--workers", type=click.IntRange(0), default=0, show_default=True, help="Data-loading worker processes.")
@advanced("--checkpoint-every", type=click.IntRange(1), default=None,
          help="Write OUTPUT.resume.pt every N steps (it is also written every 10 minutes and on Ctrl-C).")
@data_options
@verbosity_options
@friendly_errors
@threads_option
def finetune(compressed, train_data, val_data, output, optimizer, lr, tt_lr, epochs, max_steps, batch_size,
             eval_every, patience, resume, torchrec, control, control_output, seed, device, force, as_json, workers,
             checkpoint_every, strict, dense_transform, quiet):
    """Fine-tune a compressed model (TT cores and MLPs) to recover AUC. Multi-GPU: torchrun."""
    from ..training.finetune import finetune as run, leave_distributed
    r = run(compressed, train_data, output, val_data, device=device, optimizer=optimizer, lr=lr, tt_lr=tt_lr,
            epochs=epochs, max_steps=max_steps, batch_size=batch_size, eval_every=eval_every, patience=patience,
            resume=resume, force=force, workers=workers, progress=not quiet, strict=strict, seed=seed,
            dense_transform=dense_transform, checkpoint_every=checkpoint_every, torchrec=torchrec, control=control,
            control_output=control_output)
    leave_distributed()  # under torchrun: every rank is done; the group is left before the process exits
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one report: rank 0's
        return
    if as_json:
        click.echo(json.dumps(r, indent=2))
        if r["interrupted"]:
            raise SystemExit(130)
    elif r["interrupted"]:
        click.echo(f"interrupted after {r['steps']} steps; state saved to {r['resume_state']}. "
                   "Run the same command with --resume to continue.")
        raise SystemExit(130)
    else:
        from ..training.finetune import describe_run
        click.echo(describe_run(r))
        if r.get("control"):
            click.echo(f"control: {describe_run(r['control'])}\n  (the original fine-tuned the same way: "
                       f"report ... --control {r['control']['output']} compares the two)")


@main.command()
@click.argument("original", type=click.Path())
@click.argument("compressed", type=click.Path(dir_okay=False))
@click.argument("finetuned", required=False, type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(dir_okay=False), help="Test data for AUC and logloss.")
@click.option("--max-rows", type=click.IntRange(1), help="Evaluate on the first N rows only.")
@click.option("--control", type=click.Path(dir_okay=False), help="The original fine-tuned the same way as FINETUNED "
              "(finetune --control): FINETUNED is compared with it too.")
@click.option("--no-int8", is_flag=True, help="Skip the int8 row-wise baseline.")
@output_option("Also write the report (text, --json or --markdown) to this file.", required=False)
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of size against AUC, every model "
              "labelled with its bytes, ratio and AUC difference.")
@device_option("evaluation")
@force_option
@json_option("the report")
@click.option("--markdown", is_flag=True, help="Print the report's tables as Markdown.")
@advanced("--skip-source-check", is_flag=True,
          help="Compare even when COMPRESSED was not made from ORIGINAL (their SHA-256 differ).")
@data_options
@verbosity_options
@friendly_errors
@threads_option
def report(original, compressed, finetuned, data, max_rows, control, no_int8, output, plot, device, force, as_json, markdown,
           skip_source_check, strict, dense_transform, quiet):
    """Size and AUC of ORIGINAL, COMPRESSED (and FINETUNED), with int8 row-wise as a baseline."""
    refuse_together(**{"--json": as_json, "--markdown": markdown})
    from ..reporting.report import claim_report_output, format_report, report as run, to_json, write_report
    inputs = [original, compressed, finetuned, data, control, plot]
    if output is not None:
        output = claim_report_output(output, inputs, force)
    r = run(original, compressed, finetuned, data=data, max_rows=max_rows, int8=not no_int8, strict=strict,
            dense_transform=dense_transform, check_source=not skip_source_check, plot=plot, force=force,
            device=device, control=control, log=None if as_json else stderr_log(quiet))
    text = to_json(r) if as_json else format_report(r, markdown=markdown)
    if output is not None:
        write_report(output, text)
        if not quiet:
            click.echo(f"wrote {output}", err=True)
    click.echo(text)


@main.command()
@click.option("-o", "--output", "--dir", "folder", default="fpd-demo", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the demo's data, models and report.")
@click.option("--train-rows", type=click.IntRange(1), default=300_000, show_default=True,
              help="Generated training samples (validation 30,000 and test 50,000).")
@click.option("--ratio", type=click.FloatRange(1, min_open=True), default=20.0, show_default=True,
              help="Compression ratio of the 5 largest tables together (dense bytes / compressed bytes).")
@seed_option("the data, the baseline's weights and fine-tuning")
@device_option("training and fine-tuning")
@json_option("the report")
@verbosity_options
@friendly_errors
@threads_option
def demo(folder, train_rows, ratio, seed, device, as_json, quiet):
    """The main job on generated data: synth -> train -> compress -> finetune -> report."""
    from ..demo import run_demo
    from ..reporting.report import to_json
    r = run_demo(folder, train_rows=train_rows, ratio=ratio, seed=seed, device=device, progress=not quiet,
                 echo=(lambda text: click.echo(text, err=True)) if as_json else
                 (lambda text: None) if quiet else click.echo)
    if as_json:
        click.echo(to_json({**r["report"], "files": r["files"], "seconds": r["seconds"]}))
    elif quiet:
        from ..reporting.report import format_report
        click.echo(format_report(r["report"]))
