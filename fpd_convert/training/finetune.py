"""``finetune``: train a compressed model (TT cores and MLPs) to recover AUC."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..checkpoints import CheckpointError, is_compressed, read_compressed, write_compressed
from ..outputs import check_output, releases_outputs
from ..convert.load import compressed_state_from_model, load
from ..data import CriteoData
from ..devices import resolve_device
from .loop import CHECKPOINT_EVERY_S, fit
from .optim import make_optimizer


def _init_distributed(device: torch.device) -> torch.device:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1), once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        torch.cuda.set_device(device)
    return device


def table_rows_of_model(model) -> list:
    return [t["rows"] for t in model.architecture["tables"]]


@releases_outputs
def finetune(compressed, train_data, output, val_data=None, device: str = "auto", optimizer: str = "adagrad",
             lr: float = 0.0001, tt_lr: Optional[float] = 0.01, epochs: int = 1, max_steps: Optional[int] = None,
             batch_size: int = 512, eval_every: Optional[int] = None, patience: Optional[int] = None,
             resume: bool = False, force: bool = False, progress: bool = True, workers: int = 0,
             seed: int = 0, interrupt_after: Optional[int] = None, val_batches: Optional[int] = None,
             strict: bool = False, dense_transform: str = "log", checkpoint_every: Optional[int] = None,
             checkpoint_seconds: Optional[float] = CHECKPOINT_EVERY_S, torchrec: bool = False) -> dict:
    """Fine-tune every parameter of ``compressed`` and write the best model (by validation AUC)
    to ``output`` in the compressed format.  While it trains, ``OUTPUT.resume.pt`` is written every
    ``checkpoint_every`` steps and every ``checkpoint_seconds`` (default 10 minutes) and when the run is
    interrupted (Ctrl-C, SIGTERM); ``resume=True`` continues from it, bit for bit.  It is removed only
    once the output is written.  ``interrupt_after`` stops after that many steps as a signal would
    (for tests).

    Defaults (Adagrad, lr 0.0001 for MLPs and dense tables, 0.01 for TT cores): the dense
    parts are already trained, and a fresh Adagrad state moves every weight by about ``lr`` in
    its first steps (at 0.001 that undid more than the fine-tuning recovered: docs/benchmarks.md);
    the TT cores have the most to recover.  The input model is evaluated first, so the output is
    never worse on ``val``.

    ``torchrec``: the model runs as a real TorchRec DLRM (``fpd_convert.torchrec``), and under ``torchrun``
    under ``DistributedModelParallel`` (dense tables sharded by TorchRec's planner and trained by their
    optimizer in the backward, TT tables replicated; resume states every ``checkpoint_every`` steps, not
    by the clock)."""
    compressed, output = Path(compressed), Path(output)
    state_path = output.with_name(output.name + ".resume.pt")
    dev = _init_distributed(resolve_device(device))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not is_compressed(compressed):
        from ..paths import not_a_file
        reason = not_a_file(compressed)
        raise CheckpointError(f"{compressed}: {reason}" if reason else
                              f"{compressed}: finetune takes a compressed file written by `fpd-convert compress`; "
                              "this is not one (compress it first)")
    if rank == 0:
        check_output(output, [compressed, train_data] + ([val_data] if val_data else []), force or resume)
        check_output(state_path, [compressed, train_data] + ([val_data] if val_data else []), force=True)
    torch.manual_seed(seed)
    if torchrec:
        from ..torchrec.training import torchrec_trainee
        model, opt = torchrec_trainee(compressed, dev, optimizer, lr, tt_lr, dist.is_initialized())
    else:
        model = load(compressed).train().to(dev)  # before the optimizer: its state lives with the params
        if not hasattr(model, "architecture"):
            raise ValueError(f"{compressed}: a generic state_dict has no model to fine-tune")
        opt = make_optimizer(model, optimizer, lr, tt_lr)
    rows = table_rows_of_model(model)
    train_set = CriteoData(train_data, rows, batch_size, dense_transform, strict)
    if workers:
        from ..data import data_loader
        train_iter = data_loader(train_set, workers)
    else:
        train_iter = train_set
    val_set = CriteoData(val_data, rows, 8192, dense_transform, strict) if val_data else None
    log = (lambda s: print(s, file=sys.stderr)) if progress and rank == 0 else (lambda s: None)
    res = fit(model, train_iter, val_set, opt, epochs=epochs, max_steps=max_steps, eval_every=eval_every,
              patience=patience, device=dev, progress=progress, state_path=state_path, resume=resume,
              interrupt_after=interrupt_after, val_batches=val_batches, log=log, eval_at_start=True,
              checkpoint_every=checkpoint_every, checkpoint_seconds=checkpoint_seconds)
    out = {"output": str(output), "steps": res.steps, "samples": res.samples, "seconds": res.seconds,
           "samples_per_s": res.samples / max(res.seconds, 1e-9), "best": res.best_metrics,
           "history": res.history, "interrupted": res.interrupted, "stopped_early": res.stopped_early,
           "device": str(dev), "world_size": dist.get_world_size() if dist.is_initialized() else 1}
    if res.interrupted:
        out["resume_state"] = str(state_path)
        return out
    if rank == 0:
        _, meta = read_compressed(compressed)
        meta.extras = {**meta.extras, "finetune": {"steps": res.steps, "samples": res.samples,
                                                   "best_val": res.best_metrics}}
        write_compressed(output, compressed_state_from_model(res.best_state, meta), meta)
        if state_path.exists():
            state_path.unlink()  # the output is safely written: the resume state is stale
    if dist.is_initialized():
        dist.barrier()
    return out


def describe_best(r: dict) -> str:
    """The best validation result of :func:`finetune`'s return, said plainly when fine-tuning never beat
    the model it started from."""
    best = r.get("best")
    if not best:
        return "no validation data: the last step is kept"
    if best.get("step", 0) == 0:
        return f"no step beat the start (val AUC {best['auc']:.4f}): kept the start"
    return f"best val AUC {best['auc']:.4f} at step {best['step']:,}"
