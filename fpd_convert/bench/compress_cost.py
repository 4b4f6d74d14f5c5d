"""What importance-aware compress costs beside plain TT-SVD, on the same files in one run.

Two sources: the demo's model (trained as ``fpd-convert demo`` trains it, Adagrad state in the file) at
``--ratio 20``, and a ``rows x dim`` table written to a real ``.safetensors`` file at ``--ratio 50``.  Each is
compressed twice, ``--importance none`` and ``auto`` (the candidate search under the byte budget), each in
its own process; the CPU seconds of the ``compress`` call (every thread's) and of the whole process
(imports included) give the ratios.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

_CHILD = ("import json, resource, sys, time\n"
          "from fpd_convert import compress\n"
          "from fpd_convert.convert.importance import FidelityOptions\n"
          "src, out, ratio, imp = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]\n"
          "cpu, wall = time.process_time(), time.perf_counter()\n"
          "s = compress(src, out, ratio=ratio, num_largest=5, progress=False, force=True,\n"
          "             fidelity=FidelityOptions(imp))\n"
          "cpu, wall = time.process_time() - cpu, time.perf_counter() - wall\n"
          "u = resource.getrusage(resource.RUSAGE_SELF)\n"
          "print(json.dumps({'cpu_seconds': cpu, 'wall_seconds': wall, 'process_cpu_seconds': u.ru_utime + u.ru_stime,\n"
          "                  'tables_bytes_after': sum(t.bytes_after for t in s.tables),\n"
          "                  'weighted_errors': [t.weighted_error for t in s.tables],\n"
          "                  'relative_errors': [t.relative_error for t in s.tables]}))\n")


def _compress(src: Path, out: Path, ratio: float, importance: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), str(ratio), importance],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compress of {src} ({importance}) failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _demo_model(where: Path) -> Path:
    from ..data.synth import synth
    from ..training.train import train
    synth(where / "train.npz", 300_000, seed=0, force=True)
    synth(where / "val.npz", 30_000, seed=1, force=True)
    train(where / "train.npz", where / "baseline.pt", val_data=where / "val.npz", force=True, progress=False)
    return where / "baseline.pt"


def _table(where: Path, rows: int, dim: int) -> Path:
    from .svd import structured_rows, write_table_safetensors
    import torch
    path = where / f"table_{rows}x{dim}.safetensors"
    write_table_safetensors(path, "table.weight", rows, dim, torch.float32, structured_rows(rows, dim))
    return path


def bench_compress_cost(rows: int = 1_000_000, dim: int = 64, folder: Optional[str] = None,
                        echo: Optional[Callable[[str], None]] = None) -> dict:
    """CPU seconds of ``compress --importance none`` and ``auto`` on the demo model and on a table."""
    import torch
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "results": []}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        where = Path(tmp)
        sources = [("demo model", _demo_model(where), 20.0), (f"{rows:,} x {dim} table", _table(where, rows, dim), 50.0)]
        for name, src, ratio in sources:
            runs = {}
            for importance in ("none", "auto"):
                runs[importance] = _compress(src, where / f"out_{importance}.safetensors", ratio, importance)
                if echo:
                    echo(f"{name}: --importance {importance}: {runs[importance]['cpu_seconds']:.1f} CPU s")
            out["results"].append({"source": name, "ratio": ratio, "none": runs["none"], "auto": runs["auto"],
                                   "cpu_ratio": runs["auto"]["cpu_seconds"] / runs["none"]["cpu_seconds"],
                                   "process_cpu_ratio": runs["auto"]["process_cpu_seconds"] /
                                   runs["none"]["process_cpu_seconds"]})
    return out


def format_compress_cost(out: dict) -> str:
    from ..reporting.tables import render_table
    rows = [[r["source"], f"{r['ratio']:g}", f"{r['none']['cpu_seconds']:.1f}", f"{r['auto']['cpu_seconds']:.1f}",
             f"{r['cpu_ratio']:.2f}x", f"{r['process_cpu_ratio']:.2f}x"] for r in out["results"]]
    return (render_table(["source", "--ratio", "plain CPU s", "importance CPU s", "ratio", "ratio (process)"], rows)
            + f"\nCPU seconds of the compress call, every thread's ({out['threads']} torch threads); process: "
              "with the imports")
