"""Deploy a compressed model: export it in every format and score a batch with each in a fresh process.

Each program is loaded where fpd-convert is *not* importable (the child process blocks the package),
as on a serving machine that has torch, or only ONNX Runtime:

- ``model.pt2``  (``--format pt2``):  ``torch.export.load(path).module()(dense, sparse)``
- ``model.aoti.pt2`` (``--format aoti``): ``torch._inductor.aoti_load_package(path)(dense, sparse)``
- ``model.onnx`` (``--format onnx``): ``onnxruntime.InferenceSession(path).run(...)``

    python examples/serve_exported.py --dir /tmp/fpd-serve        # builds a small compressed model first
    python examples/serve_exported.py --model my.tt.safetensors   # or exports yours
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import torch

import fpd_convert

FRESH = textwrap.dedent('''
    import importlib.abc, sys
    class Blocked(importlib.abc.MetaPathFinder):  # this process has no fpd-convert
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "fpd_convert":
                raise ImportError("fpd_convert is not installed here")
    sys.meta_path.insert(0, Blocked())
    import numpy as np
    fmt, path, batch = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
    dense, sparse = batch["dense"], batch["sparse"]
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        scores = session.run(None, {"dense": dense, "sparse": sparse})[0]
    else:
        import torch
        run = torch.export.load(path).module() if fmt == "pt2" else torch._inductor.aoti_load_package(path)
        scores = run(torch.from_numpy(dense), torch.from_numpy(sparse)).detach().numpy()
    print(" ".join(f"{v:.6f}" for v in scores.reshape(-1)[:4]))
''')


def small_model(folder: Path) -> Path:
    """A compressed DLRM of the demo's shapes with random weights (your own file replaces this)."""
    from fpd_convert.data import DEFAULT_TABLE_ROWS
    from fpd_convert.models import DLRMNet
    from fpd_convert.training.train import dlrm_architecture, init_dlrm
    model = DLRMNet(dlrm_architecture(DEFAULT_TABLE_ROWS))
    init_dlrm(model, seed=0)
    torch.save({"state_dict": model.state_dict()}, folder / "baseline.pt")
    fpd_convert.compress(folder / "baseline.pt", folder / "model.tt.safetensors", ratio=20, progress=False, force=True)
    return folder / "model.tt.safetensors"


def main(argv=None):
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's notes to its own developers
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="fpd-serve", help="Where to write the programs.")
    p.add_argument("--model", help="A compressed DLRM file (default: a small one built here).")
    p.add_argument("--formats", default="pt2,aoti,onnx", help="Comma-separated: pt2, aoti, onnx.")
    args = p.parse_args(argv)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    compressed = Path(args.model) if args.model else small_model(folder)

    model = fpd_convert.load(compressed)
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(5, model.architecture["num_dense"], generator=g)
    sparse = torch.stack([torch.randint(0, t["rows"], (5,), generator=g) for t in model.architecture["tables"]], 1)
    np.savez(folder / "batch.npz", dense=dense.numpy(), sparse=sparse.numpy())
    with torch.no_grad():
        print("eager load():", " ".join(f"{v:.6f}" for v in model(dense, sparse).reshape(-1)[:4]))
    for fmt in args.formats.split(","):
        out = folder / {"pt2": "model.pt2", "aoti": "model.aoti.pt2", "onnx": "model.onnx"}[fmt]
        r = fpd_convert.export(compressed, out, format=fmt, force=True)
        done = subprocess.run([sys.executable, "-c", FRESH, fmt, str(out), str(folder / "batch.npz")],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr)
        print(f"{fmt} ({r['bytes']:,} bytes, without fpd_convert):", done.stdout.strip())


if __name__ == "__main__":
    main()
