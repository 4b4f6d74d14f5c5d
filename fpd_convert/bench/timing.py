"""Timing helpers shared by the benchmarks: warm-up, repetitions, median."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def median_seconds(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``reps`` runs after ``warmup`` runs (CUDA-synchronized)."""
    return interleaved_medians({"fn": fn}, device, reps, warmup)["fn"]


def interleaved_medians(fns: Dict[str, Callable[[], object]], device: torch.device, reps: int,
                        warmup: int = 3, block: int = 10, settle: int = 3) -> Dict[str, float]:
    """Median wall time of each function over ``reps`` runs, timed in blocks that take turns.

    Each round times every function for a block of ``block`` back-to-back runs, after
    ``settle`` untimed ones, so that on a shared machine a slow spell falls on all sides of
    a ratio alike (timing all of one function's repetitions before another's moved the dense
    baseline 2x between runs).  The untimed runs let caches and the allocator reach the
    function's own steady state: on the CPU, the first run after another function's large
    temporaries pays for page faults (measured 4x slower, and 1.1-1.3x for two more runs).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    while min(len(ts) for ts in times.values()) < reps:
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            for _ in range(min(block, reps - len(times[name]))):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}
