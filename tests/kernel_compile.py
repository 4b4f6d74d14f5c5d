"""Compile every Triton kernel of the package for an H100 (sm_90) without a GPU.

Triton's interpreter (how the tests run the kernels on the CPU) does not compile them, so a
kernel that type-checks only in Python would pass every CPU test and fail on its first GPU
run.  This compiles each ``*_kernel`` through Triton's whole pipeline (TTIR, TTGIR, LLVM IR,
PTX, and ``ptxas`` to a cubin) for ``sm_90``, with the table shape of the bench
(10M x 128, rank 32), the pooled and sorted-entry kernels for every mode and option, and prints each
cubin's registers and stack (spills) per thread and its memory barriers (``MEMBAR``: an
``acq_rel`` atomic add, Triton's default, costs one each; the kernels' relaxed adds none), as
``cuobjdump`` reads them.  Run it without
``TRITON_INTERPRET`` (``@triton.jit`` reads it at import)::

    python3 tests/kernel_compile.py        # prints one line per compiled kernel

Exits non-zero with the compiler's message on the first failure.
"""
import itertools
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fpd_convert.kernels import triton_pooled, triton_suffix, triton_tt

TARGET = GPUTarget("cuda", 90, 32)
# cores (1, 250, 8, 32), (32, 200, 4, 32), (32, 200, 4, 1); tiles as the launchers pick them
VALUES = dict(NT=250 * 200 * 200, SS=200 * 4 * 200 * 32 * 4, N2=200, N3=200, R1=32, R2=32, D1=8, D2=4, D3=4, BD1=8, BD2=4, BD3=4, BR1=32, BR2=32,
              P1=16, P3=16, Q1=32, Q2=32, QC=16, PREC="tf32x3", NEED1=True, NEEDS=True, N1=250, SM=False,
              NEEDS_ID=True, SM_DS=False,
              MODE=0, FIXED=False, HAS_W=False, HAS_SKIP=False, HAS_EXACT=False, BY_LEN=False, NEEDX=False)
INDEX_POINTERS = ("idx_ptr", "perm_ptr", "code_ptr", "bounds_ptr", "pos_ptr", "bag_ptr")


def signature(kernel, **overrides):
    sig, constants = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constants[p.name] = overrides.get(p.name, VALUES[p.name])
        elif p.name in INDEX_POINTERS:
            sig[p.name] = "*i64"
        elif p.name.endswith("_ptr") or p.name in ("c1", "c2", "c3"):
            sig[p.name] = "*fp32"
        else:
            sig[p.name] = "i64" if p.name == "SKIP" else "i32"
    return sig, constants


def resources(cubin: bytes) -> str:
    """``REG:n STACK:n MEMBAR:n`` of a cubin (registers and spill stack per thread, memory
    barriers in its code), '' without cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    words = [w for line in usage.splitlines() if "REG:" in line for w in line.split()
             if w.startswith(("REG:", "STACK:"))]
    return " ".join(words + [f"MEMBAR:{sass.count('MEMBAR')}"])


def kernels():
    for module in (triton_tt, triton_suffix, triton_pooled):
        for name in sorted(dir(module)):
            fn = getattr(module, name)
            if name.endswith("_kernel") and isinstance(fn, triton.runtime.jit.JITFunction):
                yield f"{module.__name__.rsplit('.', 1)[-1]}.{name}", fn


def main() -> int:
    if not isinstance(triton_tt._fwd_kernel, triton.runtime.jit.JITFunction):
        print("TRITON_INTERPRET is set: the kernels were not built for compiling", file=sys.stderr)
        return 2
    count = 0
    for name, fn in kernels():
        variants = [{}]
        if name.endswith("_pooled_kernel"):  # every mode, with and without each option
            variants = [dict(MODE=m, FIXED=f, HAS_W=o, HAS_SKIP=o, HAS_EXACT=o)
                        for m, f, o in itertools.product((0, 1, 2), (False, True), (False, True))]
        if name.endswith(("_entries_fwd_kernel", "_entries_bwd_kernel")):  # bags by length or map, options
            variants = [dict(BY_LEN=b, HAS_W=o, HAS_EXACT=o, SM=m)
                        for b, o, m in itertools.product((False, True), (False, True), (False, True))]
            if "bwd" in name:  # dS per id (id-major codes) or per run of a digit pair (suffix-major)
                variants = [dict(v, NEEDX=v["HAS_EXACT"], NEEDS_ID=not v["SM"], SM_DS=v["SM"]) for v in variants]
        for overrides in variants:
            sig, constants = signature(fn, **overrides)
            try:
                compiled = triton.compile(ASTSource(fn, sig, constants), target=TARGET, options={"num_warps": 2})
            except Exception as e:  # the compiler's message names the line
                print(f"FAILED {name} {overrides}: {type(e).__name__}: {e}", file=sys.stderr)
                return 1
            count += 1
            print(f"ok {name} {overrides or ''} {resources(compiled.asm['cubin'])}")
    print(f"{count} kernels compiled for sm_90")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
