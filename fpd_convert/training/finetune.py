"""``finetune``: train a compressed model (TT cores and MLPs) to recover AUC."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..checkpoints import CheckpointError, is_compressed, read_compressed, write_compressed
from ..default_outputs import finetuned_output
from ..outputs import check_output, releases_outputs
from ..convert.load import compressed_state_from_model, load
from ..data import CriteoData
from ..devices import resolve_device
from .loop import CHECKPOINT_EVERY_S, fit
from .optim import make_optimizer


_joined = {"group": False}  # whether this module joined the process group (and so leaves it)


def _init_distributed(device: torch.device) -> torch.device:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1), once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _joined["group"] = True
    if dist.is_initialized() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        torch.cuda.set_device(device)
    return device


def leave_distributed() -> None:
    """Destroy the process group :func:`finetune` joined, once the process's work is done (the command does,
    under torchrun; every rank calls it): torch asks for it, and a gloo group left to the interpreter's exit
    can abort the exit after the work (torch 2.13, seen under load).  A group the caller made is the caller's."""
    if _joined["group"] and dist.is_initialized():
        dist.destroy_process_group()
    _joined["group"] = False


def table_rows_of_model(model) -> list:
    return [t["rows"] for t in model.architecture["tables"]]


def control_output_for(output) -> Path:
    """Where ``finetune --control`` writes the fine-tuned original by default: ``OUT.control.safetensors``
    beside ``OUT`` (``model.ft.safetensors`` -> ``model.ft.control.safetensors``)."""
    return Path(output).with_suffix(".control.safetensors")


def _check_control(control: Path, compressed: Path) -> None:
    """The control must be the original COMPRESSED was made from (its SHA-256 is in the file)."""
    from ..checkpoints import read_compressed_meta, sha256_of
    meta = read_compressed_meta(compressed)
    if meta.source_sha256 and meta.source_sha256 != sha256_of(control):
        raise CheckpointError(f"--control {control} is not the original {compressed} was made from "
                              f"({meta.source_name or 'another file'}); give that file")


@releases_outputs
def finetune(compressed, train_data, output=None, val_data=None, device: str = "auto", optimizer: str = "adagrad",
             lr: float = 0.0001, tt_lr: Optional[float] = 0.01, epochs: int = 1, max_steps: Optional[int] = None,
             batch_size: int = 512, eval_every: Optional[int] = None, patience: Optional[int] = None,
             resume: bool = False, force: bool = False, progress: bool = True, workers: int = 0,
             seed: int = 0, interrupt_after: Optional[int] = None, val_batches: Optional[int] = None,
             strict: bool = False, dense_transform: str = "log", checkpoint_every: Optional[int] = None,
             checkpoint_seconds: Optional[float] = CHECKPOINT_EVERY_S, torchrec: bool = False,
             control=None, control_output=None) -> dict:
    """Fine-tune every parameter of ``compressed`` and write the best model (by validation AUC)
    to ``output`` in the compressed format (default: beside it, ``model.tt.safetensors`` ->
    ``model.ft.safetensors``).  While it trains, ``OUTPUT.resume.pt`` is written every ``checkpoint_every``
    steps and every ``checkpoint_seconds`` (default 10 minutes) and when the run is interrupted (Ctrl-C,
    SIGTERM); ``resume=True`` continues from it, bit for bit.  It is removed only once the output is
    written.  ``interrupt_after`` stops after that many steps as a signal would (for tests).

    Defaults (Adagrad, lr 0.0001 for MLPs and dense tables, 0.01 for TT cores): the dense
    parts are already trained, and a fresh Adagrad state moves every weight by about ``lr`` in
    its first steps (at 0.001 that undid more than the fine-tuning recovered: docs/benchmarks.md);
    the TT cores have the most to recover.  The input model is evaluated first, so the output is
    never worse on ``val``.

    ``control``: the original COMPRESSED was made from; after the compressed model, it is fine-tuned with
    the same schedule, data, seed and optimizer (every parameter at ``lr``, as the compressed model's dense
    parts) and written to ``control_output`` (default :func:`control_output_for`) as a safetensors
    state_dict that :func:`fpd_convert.load` and ``report --control`` read: what the same training gives
    a model that lost nothing, so that a gain over the original is not taken for the compression's.
    With ``resume``, a run whose output is written and whose resume state is gone is not run again.

    ``torchrec``: the model runs as a real TorchRec DLRM (``fpd_convert.torchrec``), and under ``torchrun``
    under ``DistributedModelParallel`` (dense tables sharded by TorchRec's planner and trained by their
    optimizer in the backward, TT tables replicated; resume states every ``checkpoint_every`` steps, not
    by the clock)."""
    compressed = Path(compressed)
    output = finetuned_output(compressed) if output is None else Path(output)
    dev = _init_distributed(resolve_device(device))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not is_compressed(compressed):
        from ..paths import not_a_file
        reason = not_a_file(compressed)
        raise CheckpointError(f"{compressed}: {reason}" if reason else
                              f"{compressed}: finetune takes a compressed file written by `fpd-convert compress`; "
                              "this is not one (compress it first)")
    inputs = [compressed, train_data] + ([val_data] if val_data else []) + ([control] if control else [])
    runs = [("finetune", compressed, output)]
    if control is not None:
        if torchrec:
            raise ValueError("--control fine-tunes the original as a dlrm-layout model; it does not go with --torchrec")
        control = Path(control)
        _check_control(control, compressed)
        runs.append(("control", control, Path(control_output) if control_output else control_output_for(output)))
    if rank == 0:
        for _, _, out_path in runs:
            done = resume and out_path.exists() and not _state_path(out_path).exists()
            if not done:
                check_output(out_path, inputs, force or resume)
                check_output(_state_path(out_path), inputs, force=True)
    schedule = dict(epochs=epochs, max_steps=max_steps, eval_every=eval_every, patience=patience, device=dev,
                    progress=progress, resume=resume, interrupt_after=interrupt_after, val_batches=val_batches,
                    eval_at_start=True, checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds)
    data = dict(batch_size=batch_size, dense_transform=dense_transform, strict=strict, workers=workers)
    log = (lambda s: print(s, file=sys.stderr)) if progress and rank == 0 else (lambda s: None)
    results = {}
    for name, source, out_path in runs:
        if resume and out_path.exists() and not _state_path(out_path).exists():
            log(f"{name}: {out_path} is written already (no resume state): not run again")
            results[name] = {"output": str(out_path), "skipped": True, "interrupted": False}
            continue
        torch.manual_seed(seed)
        if name == "finetune" and torchrec:
            from ..torchrec.training import torchrec_trainee
            model, opt = torchrec_trainee(source, dev, optimizer, lr, tt_lr, dist.is_initialized())
        else:
            model = load(source).train().to(dev)  # before the optimizer: its state lives with the params
            if not hasattr(model, "architecture"):
                raise ValueError(f"{source}: a generic state_dict has no model to fine-tune")
            opt = make_optimizer(model, optimizer, lr, tt_lr)
        r = _fit_and_write(name, model, opt, source, out_path, train_data, val_data, data, schedule, log, rank,
                           dev)
        results[name] = r
        if r["interrupted"]:
            break
    out = results["finetune"]
    if "control" in results:
        out["control"] = results["control"]
        if results["control"].get("interrupted"):
            out["interrupted"], out["resume_state"] = True, results["control"]["resume_state"]
    return out


def _state_path(output: Path) -> Path:
    return output.with_name(output.name + ".resume.pt")


def _fit_and_write(name, model, opt, source: Path, output: Path, train_data, val_data, data: dict, schedule: dict,
                   log, rank: int, dev) -> dict:
    """One fine-tuning run (the compressed model, or the control) and its output."""
    state_path = _state_path(output)
    rows = table_rows_of_model(model)
    train_set = CriteoData(train_data, rows, data["batch_size"], data["dense_transform"], data["strict"])
    if data["workers"]:
        from ..data import data_loader
        train_iter = data_loader(train_set, data["workers"])
    else:
        train_iter = train_set
    val_set = CriteoData(val_data, rows, 8192, data["dense_transform"], data["strict"]) if val_data else None
    res = fit(model, train_iter, val_set, opt, state_path=state_path, log=log, desc=name, **schedule)
    out = {"output": str(output), "steps": res.steps, "samples": res.samples, "seconds": res.seconds,
           "samples_per_s": res.samples / max(res.seconds, 1e-9), "best": res.best_metrics,
           "history": res.history, "interrupted": res.interrupted, "stopped_early": res.stopped_early,
           "device": str(dev), "world_size": dist.get_world_size() if dist.is_initialized() else 1}
    if res.interrupted:
        out["resume_state"] = str(state_path)
        return out
    if rank == 0:
        record = {"steps": res.steps, "samples": res.samples, "best_val": res.best_metrics}
        if name == "control":
            _write_control(output, res.best_state, source, record)
        else:
            _, meta = read_compressed(source)
            meta.extras = {**meta.extras, "finetune": record}
            write_compressed(output, compressed_state_from_model(res.best_state, meta), meta)
        if state_path.exists():
            state_path.unlink()  # the output is safely written: the resume state is stale
    if dist.is_initialized():
        dist.barrier()
    return out


def _write_control(output: Path, state: dict, original: Path, record: dict) -> None:
    """The fine-tuned original as a safetensors state_dict in the original's keys (its layout is detected
    from them), with what made it in the metadata."""
    import json
    from safetensors.torch import save_file
    from ..checkpoints import read_source, sha256_of
    from ..outputs import atomic_path
    prefix = read_source(original, data=False).prefix
    tensors = {prefix + k: v.contiguous() for k, v in state.items()}
    meta = {"fpd_convert_control_of": original.name, "source_sha256": sha256_of(original),
            "finetune": json.dumps(record, default=float)}
    with atomic_path(output) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def describe_best(r: dict) -> str:
    """The best validation result of :func:`finetune`'s return, said plainly when fine-tuning never beat
    the model it started from."""
    best = r.get("best")
    if not best:
        return "no validation data: the last step is kept"
    if best.get("step", 0) == 0:
        return f"no step beat the start (val AUC {best['auc']:.4f}): kept the start"
    return f"best val AUC {best['auc']:.4f} at step {best['step']:,}"


def describe_run(r: dict) -> str:
    """One line for a fine-tuning run of :func:`finetune`'s return (or its ``control``)."""
    if r.get("skipped"):
        return f"{r['output']} was written already: not run again"
    return (f"wrote {r['output']}: {r['steps']:,} steps on {r['device']}, {r['samples_per_s']:,.0f} samples/s; "
            f"{describe_best(r)}")
