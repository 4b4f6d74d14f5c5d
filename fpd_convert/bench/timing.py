"""Timing helpers shared by the benchmarks: warm-up, repetitions, median."""
from __future__ import annotations

import statistics
import time

import torch


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def median_seconds(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` over ``reps`` runs after ``warmup`` runs (CUDA-synchronized)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
