"""Big models in bounded memory: compress and decompress of a multi-table checkpoint written to disk.

The model is a facebookresearch/dlrm checkpoint (``.pt``) with the Criteo Terabyte table sizes capped
at ``rows_cap`` rows (``rows_cap=10_000_000, dim=64``: 26 tables, 49.1M rows, 12.6 GB), written one table
at a time (:func:`fpd_convert.checkpoints.writers.write_torch`), with random rows as dlrm initializes
them: memory does not depend on the values.  Then, each in its own process, timed, with its peak
resident memory (``VmHWM``):

- ``compress --ratio R``: its peak against the plan it states before the work (``planned_peak_bytes``,
  what it expects to add to the process as it started);
- ``decompress`` of the result: its peak against the largest table (it rebuilds and writes one table
  at a time);
- ``compress`` of the same model saved as a torch.distributed.checkpoint folder (``dcp.save({"model":
  state_dict})``, as TorchRec training saves it): its peak against its plan.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from ..checkpoints.writers import Planned, write_torch
from ..convert.plan import memory_available
from ..outputs import atomic_path
from .dlrm_step import terabyte_architecture
from .svd import _HWM


def write_dlrm_checkpoint(path: Path, rows_cap: int, dim: int, seed: int = 0) -> dict:
    """A dlrm-layout checkpoint of the Terabyte tables capped at ``rows_cap`` (one table in memory at a
    time); returns its architecture."""
    from ..models import build_model
    arch = terabyte_architecture(rows_cap, dim, bottom=(64,), top=(64, 32))
    with torch.device("meta"):
        shapes = {k: (v.dtype, tuple(v.shape)) for k, v in build_model(arch).state_dict().items()}

    def rows_of(key: str, shape, index: int):
        def make() -> torch.Tensor:
            g = torch.Generator().manual_seed(seed * 1000 + index)
            return torch.rand(shape, generator=g).mul_(2).sub_(1).mul_((1.0 / shape[0]) ** 0.5)
        return make
    state = {k: Planned(k, dtype, shape, rows_of(k, shape, i)) for i, (k, (dtype, shape)) in enumerate(shapes.items())}
    with atomic_path(path) as tmp:
        write_torch(tmp, {"state_dict": state, "epoch": 0, "iter": 0})
    return arch


def write_dcp_folder(checkpoint: Path, folder: Path) -> None:
    """The checkpoint's state_dict saved as a torch.distributed.checkpoint app state, ``{"model": ...}``, from
    its memory-mapped tensors."""
    import warnings
    import torch.distributed.checkpoint as dcp
    state = torch.load(checkpoint, mmap=True, weights_only=True)["state_dict"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, checkpoint_id=str(folder), no_dist=True)


def _compress_child(src: Path, out: Path, ratio: float, workers: int, baseline: int, timeout: Optional[float]) -> dict:
    c = _child(
        "from fpd_convert import compress\nt = time.perf_counter()\n"
        f"s = compress({str(src)!r}, {str(out)!r}, ratio={ratio}, workers={workers}, progress=False)\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_bytes': hwm(), "
        "'planned_peak_bytes': s.planned_peak_bytes, 'workers': s.workers, "
        "'tables_compressed': len(s.tables), 'output_bytes': __import__('os').path.getsize(s.output)}))", timeout)
    if "peak_rss_bytes" in c:
        c["added_rss_bytes"] = c["peak_rss_bytes"] - baseline
        c["added_over_plan"] = c["added_rss_bytes"] / max(c["planned_peak_bytes"], 1)
    return c


def _child(code: str, timeout: Optional[float]) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import json, time\n" + _HWM + code], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        return {"failed": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.perf_counter() - started
    return out


def bench_memory(rows_cap: int = 4_000_000, dim: int = 64, ratio: float = 50.0, workers: int = 1,
                 folder: Optional[str] = None, keep: bool = False, timeout: Optional[float] = None, echo=None) -> dict:
    """Peak RSS of compress (against its plan) and decompress (against the largest table), in one run."""
    tmp = tempfile.TemporaryDirectory(dir=folder) if not keep else None
    where = Path(tmp.name if tmp else (folder or tempfile.mkdtemp()))
    src, small, back = where / "model.pt", where / "model.tt.safetensors", where / "model.dense.pt"
    try:
        t = time.perf_counter()
        arch = write_dlrm_checkpoint(src, rows_cap, dim)
        table_bytes = [t_["rows"] * t_["dim"] * 4 for t_ in arch["tables"]]
        out = {"rows_cap": rows_cap, "dim": dim, "ratio": ratio, "workers": workers, "tables": len(table_bytes),
               "rows": sum(t_["rows"] for t_ in arch["tables"]), "model_bytes": src.stat().st_size,
               "largest_table_bytes": max(table_bytes), "write_seconds": time.perf_counter() - t,
               "threads": torch.get_num_threads(), "memory_available": memory_available(), "torch": torch.__version__}
        if echo:
            echo(f"wrote {src} ({out['model_bytes'] / 1e9:.2f} GB, {out['tables']} tables, {out['rows']:,} rows) "
                 f"in {out['write_seconds']:.0f} s")
        baseline = _child("import fpd_convert, fpd_convert.convert, torch, tensorly\nprint(json.dumps({'rss': hwm()}))",
                          timeout)
        out["process_baseline_rss_bytes"] = baseline.get("rss", 0)
        out["compress"] = c = _compress_child(src, small, ratio, workers, out["process_baseline_rss_bytes"], timeout)
        if echo:
            echo(format_step("compress", c))
        if "failed" not in c:
            out["decompress"] = _child(
                "from fpd_convert import decompress\nt = time.perf_counter()\n"
                f"decompress({str(small)!r}, {str(back)!r})\n"
                "print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_bytes': hwm()}))", timeout)
            d = out["decompress"]
            if "peak_rss_bytes" in d:
                d["limit_bytes"] = 2 * out["largest_table_bytes"] + (1 << 30)
                d["over_largest_table"] = d["peak_rss_bytes"] / out["largest_table_bytes"]
            if echo:
                echo(format_step("decompress", d))
            t = time.perf_counter()
            write_dcp_folder(src, where / "model.dcp")
            out["dcp_write_seconds"] = time.perf_counter() - t
            out["compress_dcp"] = _compress_child(where / "model.dcp", where / "model.dcp.tt.safetensors", ratio,
                                                  workers, out["process_baseline_rss_bytes"], timeout)
            if echo:
                echo(format_step("compress (DCP folder)", out["compress_dcp"]))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


def format_step(name: str, r: dict) -> str:
    if "failed" in r:
        return f"{name:10s} failed: {r['failed']}"
    line = f"{name:10s} {r['seconds']:7.1f} s   peak RSS {r['peak_rss_bytes'] / 1e9:6.2f} GB"
    if "planned_peak_bytes" in r:
        line += (f"   added {r['added_rss_bytes'] / 1e9:.2f} GB against a plan of {r['planned_peak_bytes'] / 1e9:.2f} GB "
                 f"({r['added_over_plan']:.2f}x; {r['workers']} worker(s), {r['tables_compressed']} tables)")
    if "limit_bytes" in r:
        line += (f"   {r['over_largest_table']:.2f}x the largest table "
                 f"(target: under 2x it + 1 GB = {r['limit_bytes'] / 1e9:.2f} GB)")
    return line


def format_memory(out: dict) -> str:
    head = (f"dlrm checkpoint: {out['tables']} tables (Terabyte sizes capped at {out['rows_cap']:,} rows) x {out['dim']}, "
            f"{out['model_bytes'] / 1e9:.2f} GB, largest table {out['largest_table_bytes'] / 1e9:.2f} GB; "
            f"compress --ratio {out['ratio']:g}; {out['threads']} threads, torch {out['torch']}, "
            f"process after imports {out['process_baseline_rss_bytes'] / 1e9:.2f} GB")
    lines = [head]
    for name, label in (("compress", "compress"), ("decompress", "decompress"),
                        ("compress_dcp", "compress (DCP folder)")):
        if name in out:
            lines.append(format_step(label, out[name]))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - python -m fpd_convert.bench.memory [rows_cap]
    res = bench_memory(int(sys.argv[1]) if len(sys.argv) > 1 else 4_000_000, echo=print)
    print(json.dumps(res, indent=2))
