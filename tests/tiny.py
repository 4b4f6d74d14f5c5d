"""A tiny trained DLRM and its compressed file, for tests of the commands around them."""
from pathlib import Path

import fpd_convert
from fpd_convert.data.synth import synth
from fpd_convert.training.train import train

ROWS = [2000, 1500, 1000, 800, 600] + [50] * 21


def tiny_model(d: Path, train_rows: int = 3000, held_out: str = "val.npz", held_out_rows: int = 500,
               steps: int = 3, tables=("0", "1", "2"), seed: int = 0):
    """``train.npz``, ``held_out``, ``base.pt`` (trained ``steps`` steps) and ``comp.safetensors`` (``tables`` at
    rank 4) in ``d``; returns compress's summary."""
    synth(d / "train.npz", train_rows, seed=0, table_rows=ROWS)
    synth(d / held_out, held_out_rows, seed=1, table_rows=ROWS)
    train(d / "train.npz", d / "base.pt", table_rows=ROWS, max_steps=steps, progress=False, seed=seed)
    return fpd_convert.compress(d / "base.pt", d / "comp.safetensors", rank=4, tables=list(tables), progress=False)
