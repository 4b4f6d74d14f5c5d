"""``export``: a compressed model as a program other runtimes load: ``torch.export``, AOTInductor, ONNX.

The program takes what the loaded model's ``forward`` takes (:func:`fpd_convert.load`):

- DLRM families (facebookresearch/dlrm, TorchRec DLRM / DCN / Projection): ``dense`` (B, 13) float32
  and ``sparse`` (B, F) int64, one id per feature, positionally; ``pooled=True`` takes ``sparse`` as F
  ``(indices (N_f,), offsets (B,))`` pairs instead.  It returns the model's scores (B, 1): click
  probabilities for dlrm, logits for TorchRec, as ``load`` gives them.
- Generic files: one ``ids_k`` (N_k,) int64 per compressed table, returning its rows (N_k, D_k).

The batch B (and every N) is dynamic.  ``pt2`` (``torch.export.save``), ``aoti`` (an AOTInductor
package) and ``onnx`` lower the TT lookup to standard operators (:func:`fpd_convert.layers.traced.
portable_lookups`), so loading them needs torch (or ONNX Runtime) alone; ``lookup="fpd"`` keeps the
package's operators in a ``pt2`` program (faster on the CPU; ``import fpd_convert.layers`` before
loading it).  The written file is checked against eager ``load()`` on a generated batch of another size.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Callable, List, Optional, Union

import torch

from ..checkpoints import CheckpointError, is_compressed
from ..default_outputs import exported_output
from ..outputs import atomic_path, check_output, releases_outputs
from ..paths import not_a_file
from .load import load

FORMATS = ("pt2", "aoti", "onnx")
LOOKUPS = ("portable", "fpd")
#: parity with eager: float32 sums in another order (inductor fuses and reorders the row contraction)
TOLERANCE = 1e-5


def _inputs(model: torch.nn.Module, batch: int, pooled: bool, seed: int, bag: int = 3):
    """``(args, names, dynamic_shapes)`` of a generated batch for the model's ``forward``."""
    from torch.export import Dim
    g = torch.Generator().manual_seed(seed)
    arch = getattr(model, "architecture", None)
    if arch is None:  # generic: one id vector per compressed table
        tables = [model.table(k) for k in model.keys]
        args = tuple(torch.randint(0, t.num_embeddings, (batch * bag,), generator=g) for t in tables)
        names = [f"ids_{i}" for i in range(len(args))]
        dims = tuple({0: Dim(f"n_{i}", min=1)} for i in range(len(args)))
        return args, names, dims
    rows = [t["rows"] for t in arch["tables"]]
    dense = torch.rand(batch, arch["num_dense"], generator=g) * 3
    b = Dim("batch", min=1)
    if not pooled:
        sparse = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in rows], dim=1)
        return (dense, sparse), ["dense", "sparse"], ({0: b}, {0: b})
    pairs, specs = [], []
    for f, n in enumerate(rows):
        lengths = torch.randint(0, 2 * bag, (batch,), generator=g)
        offsets = torch.cumsum(lengths, 0) - lengths
        pairs.append((torch.randint(0, n, (int(lengths.sum()),), generator=g), offsets))
        specs.append(({0: Dim(f"n_{f}", min=0)}, {0: b}))
    return (dense, pairs), ["dense", "sparse"], ({0: b}, specs)


def signature(args, names, dims) -> List[dict]:
    """Name, dtype, shape (dynamic dims by name) of each flat input."""
    out = []

    def add(name, t, spec):
        shape = [spec[i].__name__ if i in spec else int(s) for i, s in enumerate(t.shape)]
        out.append({"name": name, "dtype": str(t.dtype).replace("torch.", ""), "shape": shape,
                    "dynamic": sorted(spec)})
    for name, a, spec in zip(names, args, dims):
        if isinstance(a, torch.Tensor):
            add(name, a, spec)
        else:
            for f, ((ids, offsets), (s_ids, s_off)) in enumerate(zip(a, spec)):
                add(f"{name}[{f}].indices", ids, s_ids)
                add(f"{name}[{f}].offsets", offsets, s_off)
    return out


def _flat(args) -> List[torch.Tensor]:
    flat = []
    for a in args:
        flat.extend([a] if isinstance(a, torch.Tensor) else [t for pair in a for t in pair])
    return flat


def export_program(model: torch.nn.Module, args, dims, lookup: str = "portable",
                   onnx: bool = False) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of ``model`` with dynamic dims, the TT lookups as ``lookup`` says (``onnx``:
    in operators ONNX has)."""
    from ..layers import serving_form
    from ..layers.traced import portable
    # a generic model's forward takes *ids: its dims are one entry, for the varargs
    shapes = tuple(dims) if getattr(model, "architecture", None) is not None else (tuple(dims),)
    with torch.no_grad(), (portable(model, onnx) if lookup == "portable" else serving_form.hidden(model)):
        return torch.export.export(model, tuple(args), dynamic_shapes=shapes)


def _write(fmt: str, model, program, args, names, dims, tmp: Path) -> None:
    if fmt in ("pt2", "aoti"):  # through an open file: the archive's folder is "archive", not the temp file's name
        with open(tmp, "wb") as f:
            if fmt == "pt2":
                torch.export.save(program, f)
            else:
                torch._inductor.aoti_compile_and_package(program, package_path=f)
    else:
        onnx_inputs = [n["name"].replace("[", "_").replace("].", "_") for n in signature(args, names, dims)]
        with torch.no_grad(), _quiet("torch.onnx"):
            onnx_program = torch.onnx.export(program, tuple(args), dynamo=True, input_names=onnx_inputs,
                                             verbose=False)
        onnx_program.save(str(tmp), external_data=False)


@contextlib.contextmanager
def _quiet(logger: str):
    """The exporter's log lines (operators of packages this model does not use) are not the user's."""
    log = logging.getLogger(logger)
    saved = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(saved)


def runner(fmt: str, path: Union[str, Path]) -> Callable:
    """A callable that runs an exported file on the model's inputs (as the program takes them)."""
    path = str(path)
    if fmt in ("pt2", "aoti"):  # from an open file: any name (the check runs on the temp file)
        with open(path, "rb") as f:
            return torch.export.load(f).module() if fmt == "pt2" else torch._inductor.aoti_load_package(f)
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args):
        outs = session.run(None, {n: t.numpy() for n, t in zip(names, _flat(args))})
        return torch.from_numpy(outs[0]) if len(outs) == 1 else tuple(torch.from_numpy(o) for o in outs)
    return run


def _max_diff(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0
    return max(_max_diff(x, y) for x, y in zip(a, b))


def _check_format(fmt: str, lookup: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"--format should be one of {', '.join(FORMATS)} but got {fmt!r}")
    if lookup not in LOOKUPS:
        raise ValueError(f"--lookup should be one of {', '.join(LOOKUPS)} but got {lookup!r}")
    if lookup == "fpd" and fmt != "pt2":
        raise ValueError("--lookup fpd keeps fpd-convert's operators in the program, which only a pt2 program "
                         "run from Python can call; AOTInductor and ONNX need --lookup portable")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--format onnx needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                             "pip install onnx onnxscript onnxruntime, or the package's [export] extra") from None


@releases_outputs
def export(compressed: Union[str, Path], output: Union[str, Path, None] = None, format: str = "pt2",
           pooled: bool = False, lookup: str = "portable", force: bool = False, batch: int = 64, seed: int = 0,
           log: Optional[Callable[[str], None]] = None) -> dict:
    """Write ``compressed`` (a file from ``compress`` or ``finetune``) as a ``format`` program to ``output``
    (default: beside it, ``model.pt2``, ``model.aoti.pt2``, ``model.onnx``) and check it against eager
    :func:`fpd_convert.load` on a generated batch.  Returns the input signature, the file's size, the parity
    (largest absolute difference) and the seconds taken."""
    _check_format(format, lookup)
    compressed = Path(compressed)
    output = exported_output(compressed, format) if output is None else Path(output)
    check_output(output, [compressed], force)
    if not is_compressed(compressed):
        reason = not_a_file(compressed)
        raise CheckpointError(f"{compressed}: {reason}" if reason else f"{compressed}: export takes a compressed file "
                              "written by `fpd-convert compress` or `finetune`; this is not one")
    model = load(compressed)
    if pooled and getattr(model, "architecture", None) is None:
        raise ValueError("--pooled is for the DLRM families; a generic file's program takes one id vector per table")
    t0 = time.time()
    args, names, dims = _inputs(model, batch, pooled, seed)
    program = export_program(model, args, dims, lookup, onnx=format == "onnx")
    if log is not None:
        log(f"traced in {time.time() - t0:.1f} s; writing {format}" +
            (" (AOTInductor compiles C++: a minute or more)" if format == "aoti" else ""))
    with atomic_path(output) as tmp:  # ".tmp": a killed run's temp file is found and removed by the next
        _write(format, model, program, args, names, dims, tmp)
        check_args, _, _ = _inputs(model, max(batch // 2 - 1, 1), pooled, seed + 1)  # another size: dims dynamic
        with torch.no_grad():
            want = model(*check_args)
            got = runner(format, tmp)(*check_args)
        diff = _max_diff(want, got)
        scale = max(float(want.abs().max()) if isinstance(want, torch.Tensor) else 1.0, 1.0)
        if not diff <= TOLERANCE * scale:
            raise CheckpointError(f"the {format} program's scores differ from the eager model's by {diff:.3g} "
                                  f"(allowed {TOLERANCE * scale:.1g}); nothing was written")
    outputs = ["scores (B, 1)"] if getattr(model, "architecture", None) else [
        f"rows_{i} (n_{i}, {model.table(k).embedding_dim})" for i, k in enumerate(model.keys)]
    return {"input": str(compressed), "output": str(output), "format": format, "lookup": lookup, "pooled": pooled,
            "inputs": signature(args, names, dims), "outputs": outputs, "bytes": os.path.getsize(output),
            "parity_max_abs_diff": diff, "parity_batch": int(_flat(check_args)[0].shape[0]),
            "seconds": time.time() - t0, "needs": "torch and fpd_convert (import fpd_convert.layers)"
            if lookup == "fpd" else ("onnxruntime" if format == "onnx" else "torch")}


def format_export(r: dict) -> str:
    from ..reporting.tables import format_bytes
    lines = [f"wrote {r['output']} ({r['format']}, {format_bytes(r['bytes'])}; runs with {r['needs']}) in "
             f"{r['seconds']:.1f} s", "inputs:"]
    for i in r["inputs"]:
        dyn = f"  dynamic: {', '.join(str(d) for d in i['dynamic'])}" if i["dynamic"] else ""
        lines.append(f"  {i['name']:<22} {i['dtype']:<8} ({', '.join(map(str, i['shape']))}){dyn}")
    lines.append("outputs: " + ", ".join(r["outputs"]))
    lines.append(f"parity with eager load() on a batch of {r['parity_batch']}: largest difference "
                 f"{r['parity_max_abs_diff']:.2e}")
    return "\n".join(lines)


__all__ = ["FORMATS", "LOOKUPS", "export", "export_program", "format_export", "runner", "signature"]
