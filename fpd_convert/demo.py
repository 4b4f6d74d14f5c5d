"""``demo``: the whole job on generated data, in a few minutes on 2 CPU cores."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .convert import compress
from .data.synth import synth
from .outputs import write_text
from .reporting.report import format_report, plot_report, report, to_json
from .training.finetune import describe_best, finetune
from .training.train import train


def run_demo(folder="fpd-demo", train_rows: int = 300_000, val_rows: int = 30_000, test_rows: int = 50_000,
             ratio: float = 20.0, seed: int = 0, progress: bool = True, device: str = "auto",
             echo: Callable[[str], None] = print) -> dict:
    """synth -> train -> compress (5 largest tables) -> finetune -> report, into ``folder``.

    Re-running overwrites the demo's own files in ``folder`` and nothing else.
    """
    from .convert.compress import check_ranks_rule
    check_ranks_rule(None, ratio, None, None)  # before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    f = {name: folder / name for name in ("train.npz", "val.npz", "test.npz", "baseline.pt",
                                          "compressed.safetensors", "finetuned.safetensors", "control.safetensors",
                                          "report.json",
                                          "report.md", "report.png")}
    t0 = time.time()
    for name, n, s in (("train.npz", train_rows, seed), ("val.npz", val_rows, seed + 1), ("test.npz", test_rows, seed + 2)):
        synth(f[name], n, seed=s, force=True)
    echo(f"[1/5] data: {f['train.npz']} ({train_rows:,} rows), {f['val.npz']}, {f['test.npz']}")
    tr = train(f["train.npz"], f["baseline.pt"], val_data=f["val.npz"], force=True, progress=progress, seed=seed,
               device=device)
    echo(f"[2/5] baseline DLRM (facebookresearch/dlrm layout): {f['baseline.pt']}, val AUC {tr['val']['auc']:.4f}")
    cs = compress(f["baseline.pt"], f["compressed.safetensors"], ratio=ratio, force=True, progress=progress)
    echo(f"[3/5] compressed: {f['compressed.safetensors']}\n" + cs.format())
    ft = finetune(f["compressed.safetensors"], f["train.npz"], f["finetuned.safetensors"], val_data=f["val.npz"],
                  force=True, progress=progress, eval_every=200, seed=seed, device=device, control=f["baseline.pt"],
                  control_output=f["control.safetensors"])
    echo(f"[4/5] fine-tuned: {f['finetuned.safetensors']}\n      {describe_best(ft)}\n"
         f"      control, the baseline fine-tuned the same way: {f['control.safetensors']}\n"
         f"      {describe_best(ft['control'])}")
    r = report(f["baseline.pt"], f["compressed.safetensors"], f["finetuned.safetensors"], data=f["test.npz"], device=device,
               control=f["control.safetensors"])
    for name, text in (("report.json", to_json(r)), ("report.md", format_report(r, markdown=True))):
        write_text(f[name], text + "\n", force=True)
    try:
        plot_report(r, f["report.png"], force=True)
        plotted = True
    except ValueError:
        plotted = False
    echo(f"[5/5] report: {f['report.json']}, {f['report.md']}" + (f", {f['report.png']}" if plotted else ""))
    echo(format_report(r))
    echo(f"done in {time.time() - t0:.0f} s")
    return {"files": {k: str(v) for k, v in f.items()}, "report": r, "seconds": time.time() - t0}
