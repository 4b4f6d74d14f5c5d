"""Serving a whole model in every runtime it can leave for, compressed beside dense, in one run.

For each batch size: the latency of the compressed model and of the same model with dense tables, in
eager PyTorch, under ``torch.compile`` (inductor; the TT lookups around each table's serving form), as an
AOTInductor package and in ONNX Runtime (both with the lookups lowered to standard operators: what runs
where fpd-convert is not installed).  All timed in turns in one process (:func:`interleaved_rounds`); a ratio
is the median of the ratios within each round.
Default model: the demo's (``fpd-convert demo``: a facebookresearch/dlrm DLRM, 26 tables of dim 16, the
5 largest compressed 20x), with random weights: speed does not depend on training.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..devices import resolve_device
from .lookups import zipf_ids
from .timing import device_name, interleaved_rounds, paired_ratio

RUNTIMES = ("eager", "compile", "aoti", "onnx")


def demo_models(folder: Path, ratio: float = 20.0, seed: int = 0):
    """``(dense, compressed)`` models of the demo's architecture (random weights, tables as the demo
    compresses them)."""
    from ..convert import compress, load
    from ..data import DEFAULT_TABLE_ROWS
    from ..models import DLRMNet
    from ..training.train import dlrm_architecture, init_dlrm
    import numpy as np
    dense = DLRMNet(dlrm_architecture(DEFAULT_TABLE_ROWS))
    init_dlrm(dense, seed)
    ckpt = {"state_dict": dense.state_dict(), "epoch": 0, "test_auc": np.float64(0.0)}
    torch.save(ckpt, folder / "baseline.pt")
    compress(folder / "baseline.pt", folder / "compressed.safetensors", ratio=ratio, progress=False, force=True)
    return dense.eval(), load(folder / "compressed.safetensors")


def dense_twin(model: nn.Module) -> nn.Module:
    """The same architecture with dense tables holding the TT tables' rows."""
    from ..models import build_model
    from ..layers import TTEmbeddingBag
    twin = build_model(model.architecture)
    state = {k: v for k, v in model.state_dict().items() if ".cores." not in k and "exact_" not in k
             and not k.endswith("row_map")}
    for name, m in model.named_modules():
        if isinstance(m, TTEmbeddingBag):
            state[f"{name}.weight"] = m.to_dense()
    twin.load_state_dict(state)
    return twin.eval()


def _program(model: nn.Module, dense: torch.Tensor, sparse: torch.Tensor, onnx: bool = False):
    from ..convert.export import export_program
    from torch.export import Dim
    b = Dim("batch", min=1)
    return export_program(model, (dense, sparse), ({0: b}, {0: b}), "portable", onnx=onnx)


def _runners(model: nn.Module, runtimes: Sequence[str], example, folder: Path, tag: str) -> Dict[str, Callable]:
    """A callable per runtime that scores ``(dense, sparse)`` with this model."""
    out: Dict[str, Callable] = {}
    if "eager" in runtimes:
        out["eager"] = model
    if "compile" in runtimes:
        out["compile"] = torch.compile(model, dynamic=True)
    if "aoti" in runtimes:
        program = _program(model, *example)
        out["aoti"] = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(program, package_path=str(folder / f"{tag}.pt2")))
    if "onnx" in runtimes:
        import onnxruntime as ort
        path = str(folder / f"{tag}.onnx")
        from ..convert.export import _quiet
        with torch.no_grad(), _quiet("torch.onnx"):
            program = _program(model, *example, onnx=True)
            torch.onnx.export(program, example, dynamo=True, input_names=["dense", "sparse"],
                              verbose=False).save(path, external_data=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch's runtimes
        options.inter_op_num_threads = 1
        # its threads spin after a run (its default) on the cores the next function timed needs: eager dense,
        # timed after ONNX Runtime, took 8.8-10.6 ms at 2,048 against 4.2-5.6 without ONNX Runtime in the run
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        out["onnx"] = lambda d, s: session.run(None, {"dense": d.numpy(), "sparse": s.numpy()})
    return out


def bench_serve(model: Optional[str] = None, batches: Sequence[int] = (1, 64, 2048), runtimes=RUNTIMES,
                reps: int = 60, zipf: float = 1.1, device: str = "cpu", seed: int = 0,
                echo: Optional[Callable[[str], None]] = None) -> dict:
    """Latency (s) of the compressed and the dense model per runtime and batch, and their ratios."""
    from ..convert import load
    dev = resolve_device(device)
    runtimes = [r for r in RUNTIMES if r in runtimes]
    if dev.type != "cpu":
        runtimes = [r for r in runtimes if r != "onnx"]  # ONNX Runtime's CPU provider only
    log = echo or (lambda text: None)
    with tempfile.TemporaryDirectory(prefix="fpd-serve-") as tmp:
        folder = Path(tmp)
        if model is None:
            log("building the demo's model and compressing its 5 largest tables 20x")
            dense, tt = demo_models(folder)
            what = "the demo's DLRM (26 tables of dim 16; the 5 largest compressed 20x), random weights"
        else:
            tt = load(model)
            if getattr(tt, "architecture", None) is None:
                raise ValueError(f"{model}: a generic file has no model to serve; give a DLRM file")
            dense = dense_twin(tt)
            what = f"{model} and the same model with its TT tables made dense"
        dense, tt = dense.to(dev), tt.to(dev)
        rows = [t["rows"] for t in tt.architecture["tables"]]
        g = torch.Generator().manual_seed(seed)

        def inputs(b):
            return (torch.rand(b, tt.architecture["num_dense"], generator=g).to(dev),
                    torch.stack([zipf_ids(n, b, zipf, dev, g) for n in rows], 1))
        example = inputs(16)
        log(f"preparing {', '.join(runtimes)} for both models (AOTInductor compiles C++: a minute or two)")
        fns = {}
        for tag, m in (("dense", dense), ("tt", tt)):
            for rt, fn in _runners(m, runtimes, example, folder, tag).items():
                fns[(rt, tag)] = fn
        out = {"model": what, "device": device_name(dev), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "runtimes": runtimes, "batches": list(batches), "seconds": {}}
        out["ratios"] = {}
        for b in batches:
            d, s = inputs(b)
            # a runtime's dense and TT models timed one after the other in every round
            timed = {f"{rt}/{tag}": (lambda fn=fns[(rt, tag)]: fn(d, s)) for rt in runtimes for tag in ("dense", "tt")}
            with torch.no_grad():
                # short blocks, many rounds: this 2-core machine's slow spells last seconds (in blocks of 10, two
                # runs' TT/dense at 2,048 differed 1.3x); ratios are taken within each round
                rounds = interleaved_rounds(timed, dev, reps, block=4, settle=2)
            out["seconds"][str(b)] = {k: statistics.median(t for r in rounds for t in r[k]) for k in timed}
            out["ratios"][str(b)] = _ratios(rounds, runtimes)
            log(f"batch {b:,}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in out["seconds"][str(b)].items()))
    return out


def _ratios(rounds, runtimes) -> dict:
    """Per runtime: ``tt_vs_dense`` (time, TT / dense in the same runtime) and ``vs_eager_tt`` (time, this
    runtime's TT / eager TT), each the median over rounds of the ratio within a round: below 1.0 is faster."""
    return {rt: {"tt_vs_dense": paired_ratio(rounds, f"{rt}/tt", f"{rt}/dense"),
                 "vs_eager_tt": paired_ratio(rounds, f"{rt}/tt", "eager/tt") if "eager" in runtimes else None}
            for rt in runtimes}


def format_serve(r: dict) -> str:
    lines = [f"serving {r['model']}, {r['device']}, torch {r['torch']}, {r['threads']} threads",
             f"{'batch':>6}  {'runtime':<8} {'TT ms':>9} {'dense ms':>9} {'TT/dense':>9} {'TT/eager TT':>12}"]
    for b, sec in r["seconds"].items():
        for rt in r["runtimes"]:
            ratio = r["ratios"][b][rt]
            vs = "" if ratio["vs_eager_tt"] is None else f"{ratio['vs_eager_tt']:.2f}x"
            lines.append(f"{int(b):>6,}  {rt:<8} {sec[f'{rt}/tt'] * 1e3:>9.3f} {sec[f'{rt}/dense'] * 1e3:>9.3f} "
                         f"{ratio['tt_vs_dense']:>8.2f}x {vs:>12}")
    lines.append("time ratios (each the median of the ratios within a round of turns): below 1.00x is faster; targets: "
                 "each compiled or exported TT model no slower than "
                 "eager TT (TT/eager TT <= 1), and TT/dense <= 1.3 at batch 2,048")
    return "\n".join(lines)
