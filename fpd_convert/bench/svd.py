"""TT-SVD benchmark: the in-memory (TensorLy) path and the streaming path on the same table.

A table of ``rows x dim`` (TT-structured plus noise, so that errors mean something) is
written to a real ``.safetensors`` (or ``.pt``) file in row chunks, never held whole;
then ``fpd-convert compress`` runs once per path, each in its own process, which
reports its wall time and peak resident memory (``ru_maxrss``).  The in-memory path is
skipped, and said so, where its expected peak does not fit in the memory available.
"""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..outputs import atomic_path
from ..convert.plan import MEMORY_FACTOR, memory_available
from ..kernels.reference import tt_rows
from ..tt import choose_row_factors, clamp_ranks, factor_dims

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_table_safetensors(path: Path, key: str, rows: int, dim: int, dtype: torch.dtype,
                            chunk: Callable[[int, int], torch.Tensor], chunk_rows: int = 1 << 18) -> None:
    """A one-tensor safetensors file written chunk by chunk (the format is a JSON header + raw bytes)."""
    nbytes = rows * dim * torch.tensor([], dtype=dtype).element_size()
    header = json.dumps({key: {"dtype": _ST_DTYPES[dtype], "shape": [rows, dim], "data_offsets": [0, nbytes]}},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for s in range(0, rows, chunk_rows):
            f.write(chunk(s, min(rows, s + chunk_rows)).to(dtype).contiguous().numpy().view("uint8").tobytes())


def structured_rows(rows: int, dim: int, rank: int = 8, noise: float = 0.3, seed: int = 0,
                    row_factors: Optional[Sequence[int]] = None):
    """``chunk(start, stop)``: rows of a fixed random TT table of rank ``rank`` plus noise (unit scale),
    in ``row_factors`` (default: the layout ``compress`` picks at ``rank``)."""
    g = torch.Generator().manual_seed(seed)
    df = factor_dims(dim, 3)
    rf = list(row_factors) if row_factors is not None else choose_row_factors(rows, df, rank)
    ranks = clamp_ranks(rank, rf, df, warn=False)
    cores = [torch.randn(ranks[j], rf[j], df[j], ranks[j + 1], generator=g) for j in range(3)]
    scale = 1.0 / math.sqrt(math.prod(ranks))

    def chunk(start: int, stop: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
        base = tt_rows(cores, torch.arange(start, stop)) * scale
        return base + noise * torch.randn(base.shape, generator=gen)
    return chunk


# Peak RSS of this process: VmHWM starts afresh at exec, while ru_maxrss carries the parent's
# peak over fork + exec (a child of a big parent would report the parent's size).
_HWM = ("def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1]) * 1024\n"
        "    import resource\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n")


def _baseline_rss() -> int:
    """Peak RSS of a process that only imports fpd_convert and torch (what every run starts with)."""
    code = ("import fpd_convert, torch, tensorly\n" + _HWM + "print(hwm())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return int(proc.stdout.strip() or 0)


def _run_compress(src: Path, out: Path, rank: int, path: str, power_iters: int, timeout: Optional[float]) -> dict:
    code = ("import json, time, sys\n" + _HWM +
            "from fpd_convert import compress\n"
            "from fpd_convert.convert.importance import FidelityOptions\n"
            "t = time.perf_counter()\n"  # plain TT-SVD: the paths' errors compare (a row map would reorder rows)
            f"s = compress({str(src)!r}, {str(out)!r}, rank={rank}, svd_path={path!r}, power_iters={power_iters}, "
            "num_largest=1, progress=False, force=True, fidelity=FidelityOptions('none'))\n"
            "d = s.to_dict()\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, "
            "'peak_rss_bytes': hwm(), "
            "'relative_error': d['tables'][0]['relative_error'], 'ranks': d['tables'][0]['ranks']}))\n")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"path": path, "failed": tail}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_baseline_rss_bytes"] = _baseline_rss()
    result.update(path=path, wall_seconds=time.perf_counter() - started)
    return result


def bench_svd(rows: int = 1_000_000, dim: int = 64, rank: int = 32, dtype: str = "float32",
              paths: Sequence[str] = ("memory", "stream"), folder: Optional[str] = None, power_iters: int = 1,
              keep: bool = False, timeout: Optional[float] = None, echo=None) -> dict:
    """Seconds, peak RSS and relative error of each TT-SVD path on one table, in one run."""
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    tmp = tempfile.TemporaryDirectory(dir=folder) if not keep else None
    where = Path(tmp.name if tmp else (folder or tempfile.mkdtemp()))
    src = where / f"table_{rows}x{dim}.safetensors"
    table_bytes = rows * dim * torch.tensor([], dtype=torch_dtype).element_size()
    t = time.perf_counter()
    layout = choose_row_factors(rows, factor_dims(dim, 3), rank)  # the row factors compress picks at this rank
    write_table_safetensors(src, "table.weight", rows, dim, torch_dtype, structured_rows(rows, dim, row_factors=layout))
    out = {"rows": rows, "dim": dim, "rank": rank, "dtype": dtype, "table_bytes": table_bytes,
           "write_seconds": time.perf_counter() - t, "threads": torch.get_num_threads(),
           "memory_available": memory_available(), "torch": torch.__version__, "results": []}
    if echo:
        echo(f"wrote {src} ({table_bytes / 1e9:.2f} GB) in {out['write_seconds']:.1f} s")
    try:
        for path in paths:
            if path == "memory" and MEMORY_FACTOR * rows * dim * 4 > 0.9 * memory_available():
                r = {"path": path, "skipped": f"expected peak {MEMORY_FACTOR * rows * dim * 4 / 1e9:.1f} GB does "
                                              f"not fit in {memory_available() / 1e9:.1f} GB available"}
            else:
                r = _run_compress(src, where / f"out_{path}.safetensors", rank, path, power_iters, timeout)
                if "peak_rss_bytes" in r:
                    r["peak_rss_over_table"] = r["peak_rss_bytes"] / table_bytes
            out["results"].append(r)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


def format_svd_result(r: dict) -> str:
    if "skipped" in r:
        return f"{r['path']:7s} skipped: {r['skipped']}"
    if "failed" in r:
        return f"{r['path']:7s} failed: {r['failed']}"
    return (f"{r['path']:7s} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_bytes'] / 1e9:6.2f} GB "
            f"({r['peak_rss_over_table']:.2f}x the table; {r['process_baseline_rss_bytes'] / 1e9:.2f} GB of it the "
            f"process after imports)   rel. error {r['relative_error']:.5f}   ranks {r['ranks']}")


def format_svd(out: dict) -> str:
    head = (f"TT-SVD of a {out['rows']:,} x {out['dim']} {out['dtype']} table ({out['table_bytes'] / 1e9:.2f} GB), "
            f"rank {out['rank']}, {out['threads']} threads, torch {out['torch']}")
    return "\n".join([head] + [format_svd_result(r) for r in out["results"]])
