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
    """Median wall time of each function over ``reps`` runs, timed in blocks that take turns
    (:func:`interleaved_rounds`)."""
    rounds = interleaved_rounds(fns, device, reps, warmup, block, settle)
    return {name: statistics.median(t for r in rounds for t in r[name]) for name in fns}


def interleaved_rounds(fns: Dict[str, Callable[[], object]], device: torch.device, reps: int,
                       warmup: int = 3, block: int = 10, settle: int = 3) -> List[Dict[str, List[float]]]:
    """Wall times of each function, ``reps`` runs in all, per round: each round times every function for a
    block of ``block`` back-to-back runs, after ``settle`` untimed ones, so that on a shared machine a slow
    spell falls on all sides of a ratio alike (timing all of one function's repetitions before another's
    moved the dense baseline 2x between runs), and a ratio can be taken within each round
    (:func:`paired_ratio`).  The untimed runs let caches and the allocator reach the function's own steady
    state: on the CPU, the first run after another function's large temporaries pays for page faults
    (measured 4x slower, and 1.1-1.3x for two more runs).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    rounds: List[Dict[str, List[float]]] = []
    done = 0
    while done < reps:
        size = min(block, reps - done)
        times: Dict[str, List[float]] = {}
        for name, fn in fns.items():
            for _ in range(settle):
                fn()
            times[name] = []
            for _ in range(size):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
        rounds.append(times)
        done += size
    return rounds


def paired_ratio(rounds: List[Dict[str, List[float]]], top: str, bottom: str) -> float:
    """The median over rounds of ``top``'s median time over ``bottom``'s in the same round: a ratio that
    a slow spell of the machine longer than a round does not move."""
    return statistics.median(statistics.median(r[top]) / statistics.median(r[bottom]) for r in rounds)
