"""Threads benchmark: the default thread choice against every explicit one, quiet and on a busy machine.

Two workloads, each a real ``fpd-convert`` command in its own process: a 200-step ``train`` on generated
data (the demo's table sizes) and ``compress --ratio 20`` of that model (the demo's compress).  Each runs
with the default threads (:func:`fpd_convert.threads.fit_threads`: no ``--threads``, no
``OMP_NUM_THREADS``) and with ``--threads 1 .. N`` (N: the CPUs usable), first on the machine as it is,
then with ``busy`` CPU-bound processes spinning beside it.  A run that takes more than ``cap`` times the
quiet best of its workload is stopped and counted at that time (a thrashing pool can take 30-50x).
The figure: default / best, per workload and condition (target: at most 1.2).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

from ..threads import USER_VARIABLES, usable_cpus


def _run(args: List[str], threads: Optional[int], cwd: Path, timeout: Optional[float]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in USER_VARIABLES}
    cmd = [sys.executable, "-m", "fpd_convert", *args] + ([] if threads is None else ["--threads", str(threads)])
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return float(timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - t


def bench_threads(steps: int = 200, busy: int = 2, cap: float = 8.0, folder: Optional[str] = None,
                  echo: Optional[Callable[[str], None]] = None) -> dict:
    settings: List[Optional[int]] = [None] + list(range(1, usable_cpus() + 1))
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        where = Path(tmp)
        _run(["synth", "-o", "train.npz", "-n", str(steps * 512)], None, where, None)
        _run(["train", "--train", "train.npz", "-o", "model.pt", "--max-steps", str(steps)], 1, where, None)
        workloads = {
            f"train ({steps} steps)": ["train", "--train", "train.npz", "-o", "again.pt", "--max-steps", str(steps), "--force"],
            "compress --ratio 20": ["compress", "model.pt", "-o", "model.tt.safetensors", "--ratio", "20", "--force"],
        }
        out = {"usable_cpus": usable_cpus(), "busy_processes": busy, "cap": cap, "results": []}
        best_quiet = {}
        for condition in ("quiet", "busy"):
            burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in
                       range(busy if condition == "busy" else 0)]
            try:
                time.sleep(0.5 if burners else 0)
                for name, args in workloads.items():
                    timeout = cap * best_quiet[name] if name in best_quiet else None
                    seconds = {("default" if t is None else str(t)): _run(args, t, where, timeout) for t in settings}
                    explicit = {k: v for k, v in seconds.items() if k != "default"}
                    best = min(explicit, key=explicit.get)
                    if condition == "quiet":
                        best_quiet[name] = min(seconds.values())
                    row = {"workload": name, "condition": condition, "seconds": seconds, "best": best,
                           "default_over_best": seconds["default"] / explicit[best],
                           "stopped_at": timeout}
                    out["results"].append(row)
                    if echo:
                        echo(format_row(row))
            finally:
                for p in burners:
                    p.kill()
                    p.wait()
    return out


def format_row(r: dict) -> str:
    cells = "  ".join(f"{k}: {v:6.1f} s{'+' if r['stopped_at'] and v >= r['stopped_at'] else ''}"
                      for k, v in r["seconds"].items())
    return (f"{r['workload']:22s} {r['condition']:5s}  {cells}   default / best (--threads {r['best']}): "
            f"{r['default_over_best']:.2f}x")


def format_threads(out: dict) -> str:
    head = (f"threads: the default against --threads 1..{out['usable_cpus']}; busy: {out['busy_processes']} CPU-bound "
            f"processes beside (a run past {out['cap']:g}x the quiet best is stopped there: '+')")
    return "\n".join([head] + [format_row(r) for r in out["results"]])
