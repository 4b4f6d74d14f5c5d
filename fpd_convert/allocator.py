"""Keeping freed memory in the process (Linux, glibc), so that CPU steps stop page-faulting.

glibc's ``malloc`` serves a buffer of more than 128 KB from fresh pages (``mmap``) and, once
freed, hands it back to the kernel; it raises that limit only for sizes it has seen freed, and it
trims the top of the heap once 2x that much is free there.  A model's CPU step allocates and frees
buffers of a few MB (batch 2,048 through the DLRM interaction: 3-6 MB each) every time, so every
step faults their pages in again and the kernel zeroes them: on the 2-core machine of
docs/benchmarks.md, 1,173 minor faults a step and 9.8 against 2.6 ms for the demo model's CPU
inference at batch 2,048.

:func:`keep_freed_memory` sets glibc's two limits for the process (``mallopt``, as the environment
variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` would): buffers under
:data:`MMAP_THRESHOLD` come from the heap, and up to :data:`TRIM_THRESHOLD` of freed heap is kept
for the next step.  Larger buffers (a table's TT-SVD chunks) are still returned at once.  The
``fpd-convert`` command calls it; it does nothing where the user chose otherwise: ``MALLOC_*``
variables set, another allocator preloaded (jemalloc, tcmalloc), or ``FPD_MALLOC=system``.

:func:`return_freed_memory` goes the other way, once a long piece of work is done: compress calls it
after each layout of a table, whose candidates allocate and free many table- and core-sized arrays;
without it the freed heap, fragmented by the small arrays that stay, made the resident memory climb
by a table or more per layout (1.27 -> 2.33 GB over one 1M x 64 table's layouts).
"""
from __future__ import annotations

import ctypes
import os

#: buffers smaller than this come from the heap (glibc's own ceiling for its adaptive limit)
MMAP_THRESHOLD = 32 << 20
#: freed heap kept at its top before glibc trims it
TRIM_THRESHOLD = 128 << 20

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def _user_chose() -> bool:
    """Whether the environment already says how memory is managed."""
    preload = os.environ.get("LD_PRELOAD", "")
    return (os.environ.get("FPD_MALLOC", "keep") == "system" or "jemalloc" in preload or "tcmalloc" in preload
            or any(name.startswith("MALLOC_") for name in os.environ))


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not POSIX, or not glibc
        return False


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel (glibc's ``malloc_trim``; elsewhere nothing)."""
    if _glibc():
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def keep_freed_memory() -> bool:
    """Set glibc's limits (see the module's docstring) for this process; True where they were set.

    Example::

        from fpd_convert.allocator import keep_freed_memory
        keep_freed_memory()  # before a CPU evaluation loop
    """
    if _user_chose() or not _glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError):
        return False
