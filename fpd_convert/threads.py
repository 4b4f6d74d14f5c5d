"""Threads that fit the machine: torch's and BLAS's pools sized from the CPUs this process may use.

torch sizes its intra-op pool, and OpenBLAS (numpy's SVDs) its own, by the host's cores.  In a
container with a CPU quota, under ``taskset``, or beside other CPU-bound work, those threads outnumber
the CPUs they get and spin against each other: on the 2-core machine of docs/benchmarks.md, shared
with other work, ``train`` ran 11.8x and ``compress`` 14x slower than with one thread.

:func:`fit_threads` chooses instead:

- the CPUs **usable**: the process's CPU affinity, capped by a cgroup CPU quota (v2 ``cpu.max``, v1
  ``cpu.cfs_quota_us``) and shared among the processes of one ``torchrun`` (``LOCAL_WORLD_SIZE``);
- less those **busy** with other work: the runnable tasks the kernel counts (``/proc/loadavg``), other
  than this process, sampled a few times, in proportion to the share of the host's CPUs usable;
- at least one.  torch gets that many threads; BLAS gets one (the SVDs of compress are many and
  small: a second BLAS thread beside torch's pool oversubscribes the cores).

A user's choice wins: ``--threads N`` (both pools), or ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` /
``OPENBLAS_NUM_THREADS`` in the environment (then nothing is changed).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

USER_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class ThreadChoice:
    torch: int
    blas: int
    usable: int  # CPUs this process may use
    busy: int  # of those, taken by other work when the command started
    reason: str  # "chosen", "--threads", or the environment variable that decided

    def describe(self) -> str:
        if self.reason == "chosen":
            busy = f", {self.busy} busy with other work" if self.busy else ""
            how = f"{self.usable} CPU(s) usable{busy}; --threads N to choose"
        else:
            how = f"as {self.reason} says"
        return f"threads: {self.torch} (BLAS {self.blas}; {how})"

    def to_dict(self) -> dict:
        return {"torch": self.torch, "blas": self.blas, "usable_cpus": self.usable, "busy_cpus": self.busy,
                "reason": self.reason}


def _quota(root: Path = Path("/sys/fs/cgroup")) -> Optional[float]:
    """CPUs the cgroup's quota allows (None: no quota)."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def host_cpus() -> int:
    return os.cpu_count() or 1


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup quota, shared under torchrun."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = host_cpus()
    quota = _quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cpus // max(local, 1))


def busy_cpus(usable: int, samples: int = 5, interval: float = 0.01) -> int:
    """Of the ``usable`` CPUs, about how many other work keeps busy: the median count of runnable tasks
    besides this one (``/proc/loadavg``), scaled by the share of the host's CPUs that are usable."""
    counts = []
    for i in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(max(0, running - 1))
        if i + 1 < samples:
            time.sleep(interval)
    others = sorted(counts)[len(counts) // 2]
    return min(usable, round(others * usable / max(host_cpus(), usable)))


def fit_threads(threads: Optional[int] = None) -> ThreadChoice:
    """Size torch's and BLAS's thread pools for this process (see the module's docstring); returns the
    choice, whose :meth:`ThreadChoice.describe` is the line long commands print first."""
    import torch
    if threads is None:
        for name in USER_VARIABLES:
            if os.environ.get(name):
                return ThreadChoice(torch.get_num_threads(), _blas_threads(), usable_cpus(), 0, name)
    usable = usable_cpus()
    if threads is not None:
        choice = ThreadChoice(threads, threads, usable, 0, "--threads")
    else:
        busy = busy_cpus(usable)
        choice = ThreadChoice(max(1, usable - busy), 1, usable, busy, "chosen")
    torch.set_num_threads(choice.torch)
    _limit_blas(choice.blas)
    return choice


_limits = []  # threadpoolctl's handle: the limit lasts while it lives


def _limit_blas(n: int) -> None:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return
    _limits[:] = [threadpool_limits(limits=n, user_api="blas")]


def _blas_threads() -> int:
    try:
        from threadpoolctl import threadpool_info
        return max((p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"), default=1)
    except ImportError:  # pragma: no cover
        return 1
