"""fpd_convert.allocator: freed buffers stay in the process, so a repeated step stops faulting pages in."""
import os
import subprocess
import sys

import pytest

from fpd_convert import allocator

GLIBC = sys.platform.startswith("linux") and allocator._glibc()

# three 16 MB buffers a step, written and freed, as a CPU step's activations are: glibc's adaptive
# limits serve them from the heap but trim its top after each step, so each step faults 12,288 pages in
STEP = r"""
import ctypes, resource
from fpd_convert.allocator import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 16 << 20
def step():
    bufs = [libc.malloc(size) for _ in range(3)]
    for b in bufs:
        ctypes.memset(b, 1, size)
    for b in bufs:
        libc.free(b)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def run_step(**env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "FPD_MALLOC"}
    out = subprocess.run([sys.executable, "-c", STEP], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_memory_stops_the_page_faults_of_a_repeated_step():
    applied, faults = run_step()
    assert applied and faults < 100  # of 12,288 pages a step
    applied, faults_system = run_step(FPD_MALLOC="system")
    assert not applied
    print(f"page faults a step: {faults} kept, {faults_system} with glibc's defaults")


@pytest.mark.parametrize("name,value", [("FPD_MALLOC", "system"), ("MALLOC_ARENA_MAX", "2"),
                                        ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2"),
                                        ("LD_PRELOAD", "/usr/lib/libtcmalloc_minimal.so.4")])
def test_the_users_own_choice_is_left_alone(monkeypatch, name, value):
    for key in [k for k in os.environ if k.startswith("MALLOC_")] + ["FPD_MALLOC", "LD_PRELOAD"]:
        monkeypatch.delenv(key, raising=False)
    assert not allocator._user_chose()
    monkeypatch.setenv(name, value)
    assert allocator._user_chose() and not allocator.keep_freed_memory()
