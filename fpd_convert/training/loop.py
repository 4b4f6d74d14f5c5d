"""The training loop shared by ``train`` and ``finetune``.

Every parameter trains; the loss is binary cross-entropy on logits.  Validation AUC and
log loss every ``eval_every`` steps and at each epoch's end; the best state (by AUC) is
kept; ``patience`` evaluations without improvement stop early.  With a ``state_path``, the
loop writes its resume state there (atomically) every ``checkpoint_every`` steps and every
``checkpoint_seconds``, so a killed process loses at most one interval; on SIGINT/SIGTERM it
finishes its step, writes the state and returns ``interrupted=True``.  With ``resume=True``
it continues from that state exactly where it stopped (data order is deterministic), bit for
bit.  The caller removes the state once its output is safely written.  Data that gives no
batch, and a loss that turns NaN, stop the loop with a :class:`TrainingError`.  Under ``torch.distributed`` each rank trains on its slice of every global
batch (DDP averages the gradients, so the result equals one process with that batch).
"""
from __future__ import annotations

import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoints import CheckpointError, load_torch_file
from ..outputs import atomic_path
from .metrics import evaluate
from .sparse_grads import sparse_table_gradients

logger = logging.getLogger(__name__)

#: seconds between progress lines when stderr is not a terminal (no progress bar then)
LINE_EVERY_S = 30.0
#: seconds between resume states written while training (``checkpoint_seconds``' default)
CHECKPOINT_EVERY_S = 600.0


class TrainingError(ValueError):
    """Training that cannot give a usable model: no data, or a loss that is not finite."""


class LogitModel(torch.nn.Module):
    """Wraps a model so that ``forward`` gives logits (what DDP and the loss need)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, dense, sparse):
        return self.model.logits(dense, sparse).reshape(-1)


@dataclass
class FitResult:
    best_state: dict
    best_metrics: Optional[dict]
    history: list = field(default_factory=list)
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    stopped_early: bool = False


def _cpu_state(model):
    """Whole tensors of the model's state on the CPU (a model that shards its tables across processes
    gathers them: ``full_state_dict``, a collective call)."""
    if hasattr(model, "full_state_dict"):
        return model.full_state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def planned_steps(train_data, epochs: int, max_steps: Optional[int]) -> Optional[int]:
    """The steps a run will take: ``epochs`` times the data's batches (estimated for text files), capped by
    ``max_steps``; None when neither is known."""
    data = getattr(train_data, "dataset", train_data)  # a DataLoader over our dataset
    per_epoch = data.num_batches() if hasattr(data, "num_batches") else None
    total = per_epoch * epochs if per_epoch else None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    return total


def progress_line(desc: str, step: int, total: Optional[int], epoch: int, epochs: int, loss: float, rate: float,
                  steps_per_s: float) -> str:
    """One progress line for a log: ``finetune: step 1,200/4,000 (30%), epoch 1/1, loss 0.4512, 51,000
    samples/s, ETA 1m05s``."""
    where = f"step {step:,}"
    if total:
        where += f"/{total:,} ({min(step / total, 1):.0%})"
    eta = ""
    if total and steps_per_s > 0:
        left = max(total - step, 0) / steps_per_s
        eta = f", ETA {int(left // 60)}m{int(left % 60):02d}s"
    return f"{desc}: {where}, epoch {epoch + 1}/{epochs}, loss {loss:.4f}, {rate:,.0f} samples/s{eta}"


def fit(model: torch.nn.Module, train_data, val_data, optimizer, epochs: int = 1, max_steps: Optional[int] = None,
        eval_every: Optional[int] = None, patience: Optional[int] = None, device="cpu", progress: bool = True,
        state_path: Optional[Path] = None, resume: bool = False, interrupt_after: Optional[int] = None,
        val_batches: Optional[int] = None, log: Callable[[str], None] = lambda s: None,
        eval_at_start: bool = False, checkpoint_every: Optional[int] = None,
        checkpoint_seconds: Optional[float] = CHECKPOINT_EVERY_S, desc: str = "train") -> FitResult:
    """Train ``model`` in place; returns the best state and the evaluation history.  ``desc`` names the
    progress bar (on a terminal: a bar with the total steps and the ETA; otherwise a line every
    :data:`LINE_EVERY_S` seconds with the same figures)."""
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model.to(device).train()
    net = LogitModel(model)
    sharded = getattr(model, "parallel_inside", False)  # DMP: its own data parallelism; states gathered together
    if distributed and not sharded:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    use_bf16 = device.type == "cuda"
    start = {"epoch": 0, "batch": 0, "step": 0, "samples": 0, "best_auc": -math.inf, "best_metrics": None,
             "history": [], "bad_evals": 0, "best_state": None, "done": False}
    if resume:
        if state_path is None or not Path(state_path).exists():
            raise FileNotFoundError(f"no resume state at {state_path}; run without --resume")
        saved = load_torch_file(state_path, mmap=False)
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            start.update({k: saved[k] for k in start if k != "done"}, done=saved.get("done", False))
        except (KeyError, TypeError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{state_path}: not a resume state of this model and optimizer "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); run without --resume "
                                  "to start over") from None
        log(f"resuming at epoch {start['epoch']}, step {start['step']}")
    st = dict(start)
    best_state = st["best_state"] or _cpu_state(model)
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    old = {}
    if (rank == 0 or sharded) and hasattr(signal, "SIGTERM"):  # (every rank of a sharded model saves)
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old[s] = signal.signal(s, on_signal)
            except ValueError:  # not the main thread
                pass

    last_save = [time.time()]

    def save_state():
        last_save[0] = time.time()
        if state_path is None or (rank != 0 and not sharded):
            return
        state = _cpu_state(model)
        if rank != 0:
            return
        with atomic_path(state_path) as tmp:
            torch.save({"model": state, "optimizer": optimizer.state_dict(), **{k: st[k] for k in st}}, tmp)

    def checkpoint_due() -> bool:
        if state_path is None:
            return False
        if checkpoint_every and st["step"] % checkpoint_every == 0:
            return True
        # a clock differs between ranks: a sharded model (a collective save) checkpoints by steps only
        return not sharded and checkpoint_seconds is not None and time.time() - last_save[0] >= checkpoint_seconds

    def run_eval():
        nonlocal best_state
        if val_data is None:
            return False
        m = evaluate(model, val_data, device, val_batches)
        m.update(step=st["step"], samples=st["samples"])
        st["history"].append(m)
        say(f"step {st['step']:,}: val AUC {m['auc']:.4f}, logloss {m['logloss']:.4f}")
        if m["auc"] > st["best_auc"]:
            st.update(best_auc=m["auc"], best_metrics=m, bad_evals=0)
            best_state = _cpu_state(model)
        else:
            st["bad_evals"] += 1
        st["best_state"] = best_state
        return patience is not None and st["bad_evals"] >= patience

    total = planned_steps(train_data, epochs, max_steps)
    logger.info("%s: %s steps planned (%d epoch%s%s) on %s, %s, evaluating %s", desc,
                f"{total:,}" if total else "an unknown number of", epochs, "s" if epochs > 1 else "",
                f", at most {max_steps:,} steps" if max_steps else "", device, type(optimizer).__name__,
                f"every {eval_every:,} steps and at each epoch's end" if eval_every else "at each epoch's end"
                if val_data is not None else "never (no validation data)")
    bar = tqdm(total=total, desc=desc, unit="step", disable=True if (not progress or rank != 0) else None,
               file=sys.stderr, mininterval=1.0, initial=st["step"])

    def say(text: str) -> None:  # a line above the bar, never glued onto it
        if bar.disable:
            log(text)
        else:
            bar.write(text, file=sys.stderr)

    if eval_at_start and not resume:
        run_eval()  # the starting point competes for "best" too
    t0, done_samples0, done_steps0 = time.time(), st["samples"], st["step"]
    result = FitResult(best_state, None)
    last_line = [time.time()]
    sparse_grads = sparse_table_gradients(model, optimizer, distributed)  # dense tables: exact sparse updates
    sparse_grads.__enter__()  # left in the finally below
    try:
        for epoch in range(st["epoch"], epochs if not st["done"] else 0):  # done: resumed after the last step
            for i, batch in enumerate(train_data):
                if i < st["batch"]:
                    continue  # resumed: these batches were already seen
                if world > 1:
                    per = len(batch) // world
                    batch = type(batch)(*(t[rank * per:(rank + 1) * per] for t in batch))
                batch = batch.to(device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = net(batch.dense, batch.sparse)
                loss = loss_fn(logits.float(), batch.labels)
                if st["step"] % 50 == 0 and not bool(torch.isfinite(loss)):  # a read syncs the GPU: now and then
                    raise TrainingError(f"the loss became {loss.item()} at step {st['step'] + 1}: training diverged; "
                                        "lower the learning rate (--lr, --tt-lr)")
                loss.backward()
                optimizer.step()
                st["step"] += 1
                st["batch"] = i + 1
                st["samples"] += len(batch) * world
                bar.update(1)
                if st["step"] % 50 == 1:  # loss.item() syncs the GPU: read it now and then
                    rate = (st["samples"] - done_samples0) / max(time.time() - t0, 1e-9)
                    bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:,.0f}")
                    if progress and rank == 0 and bar.disable and time.time() - last_line[0] >= LINE_EVERY_S:
                        last_line[0] = time.time()  # no bar (stderr is not a terminal): a line now and then
                        log(progress_line(desc, st["step"], total, epoch, epochs, loss.item(), rate,
                                          (st["step"] - done_steps0) / max(time.time() - t0, 1e-9)))
                if eval_every and st["step"] % eval_every == 0 and run_eval():
                    result.stopped_early = True
                    break
                if interrupt_after is not None and st["step"] >= interrupt_after:
                    stop["flag"] = True
                if stop["flag"]:
                    save_state()
                    result.interrupted = True
                    result.steps, result.samples = st["step"], st["samples"]
                    result.seconds = time.time() - t0
                    return result
                if max_steps is not None and st["step"] >= max_steps:
                    break
                if checkpoint_due():
                    save_state()
            else:
                if st["step"] == 0 and st["batch"] == 0:
                    raise TrainingError("the training data gave no batch (no valid rows)")
                st["epoch"], st["batch"] = epoch + 1, 0
                if not eval_every or st["step"] % eval_every:
                    if run_eval():
                        result.stopped_early = True
                        break
                continue
            if not result.stopped_early and (not eval_every or st["step"] % eval_every):
                run_eval()
            break
        if not st["done"] and state_path is not None:
            st["done"] = True
            save_state()  # the whole run, kept until the caller has written its output
    finally:
        bar.close()
        sparse_grads.__exit__(None, None, None)
        for s, h in old.items():
            signal.signal(s, h)
    if val_data is None:
        best_state = _cpu_state(model)
    result.best_state = best_state
    result.best_metrics = st["best_metrics"]
    result.history = st["history"]
    result.steps, result.samples = st["step"], st["samples"]
    result.seconds = time.time() - t0
    if not all(bool(torch.isfinite(v).all()) for v in best_state.values() if v.is_floating_point()):
        raise TrainingError("training gave NaN or infinite weights: it diverged; lower the learning rate "
                            "(--lr, --tt-lr)")
    return result
