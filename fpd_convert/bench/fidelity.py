"""The fidelity set: trained models of our own, compressed with and without data, fine-tuned against a control.

Each model of the set is a facebookresearch/dlrm DLRM trained by ``fpd_convert.training.train`` on ``synth``
data (300k training rows by default, 30k validation, 50k test) with one optimizer, one embedding dim and
more than one epoch, and one is a TorchRec DLRM trained by TorchRec code (KeyedJaggedTensors, TorchRec's
KeyedOptimizer, its state saved apart and given to compress with ``optimizer_state``).  Per model, on the test rows: the baseline's AUC; ``--ratio 50`` without data (the
importance ``auto`` takes: the optimizer's state, or norms), beside plain TT-SVD and int8 row-wise of the
same tables; ``--ratio 200`` with ``--data`` before and after one epoch of fine-tuning, and the control
(the original fine-tuned the same way).  The figures go to docs/benchmarks.md ("Fidelity set").
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

LEARNING_RATES = {"sgd": 0.5, "adagrad": 0.05, "adam": 0.001}


def _auc_diffs(original, compressed, test, finetuned=None, control=None, int8=False) -> dict:
    from ..reporting.report import report
    r = report(original, compressed, finetuned, data=test, int8=int8, control=control)
    out = {name: m["auc_diff"] for name, m in r["models"].items()}
    out["baseline_auc"] = r["models"]["original"]["auc"]
    out["tables_ratio"] = r["totals"]["tables_ratio"]
    out["tables_bytes"] = r["totals"]["tables_bytes_after"]
    if "finetuned_vs_control" in r:
        out["finetuned_vs_control"] = r["finetuned_vs_control"]["auc_diff"]
    return out


def fidelity_model(where: Path, optimizer: str, dim: int, epochs: int, echo=None) -> dict:
    """One model of the set, trained, compressed three ways, fine-tuned with its control; AUC differences."""
    from ..convert import compress
    from ..convert.importance import FidelityOptions
    from ..training.finetune import finetune
    from ..training.train import train
    name = f"{optimizer}-d{dim}-e{epochs}"
    base = where / f"{name}.pt"
    t0 = time.perf_counter()
    train(where / "train.npz", base, val_data=where / "val.npz", dim=dim, epochs=epochs, optimizer=optimizer,
          lr=LEARNING_RATES[optimizer], force=True, progress=False)
    test = where / "test.npz"
    out = {"model": name, "optimizer": optimizer, "dim": dim, "epochs": epochs}
    r50 = compress(base, where / f"{name}.r50.safetensors", ratio=50, force=True, progress=False)
    out["r50"] = _auc_diffs(base, where / f"{name}.r50.safetensors", test, int8=True)
    out["r50"]["importance"] = r50.tables[0].importance
    compress(base, where / f"{name}.plain.safetensors", ratio=50, force=True, progress=False,
             fidelity=FidelityOptions("none"))
    out["r50_plain"] = _auc_diffs(base, where / f"{name}.plain.safetensors", test)
    comp = where / f"{name}.r200.safetensors"
    compress(base, comp, ratio=200, data=where / "train.npz", force=True, progress=False)
    ft = where / f"{name}.r200.ft.safetensors"
    finetune(comp, where / "train.npz", ft, where / "val.npz", device="cpu", eval_every=200, force=True,
             progress=False, control=base)
    out["r200"] = _auc_diffs(base, comp, test, ft, where / f"{name}.r200.ft.control.safetensors")
    out["seconds"] = time.perf_counter() - t0
    if echo:
        echo(format_model(out))
    return out


def train_torchrec_model(where: Path, dim: int = 16, epochs: int = 1, batch_size: int = 512) -> Path:
    """A TorchRec DLRM (an EmbeddingBagCollection of 26 tables fed KeyedJaggedTensors) trained by TorchRec code
    with TorchRec's KeyedOptimizer (Adagrad), its state_dict and the optimizer's saved apart as TorchRec users
    save them: ``torchrec.pt`` and ``torchrec.opt.pt``."""
    import torch
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from ..data import DEFAULT_TABLE_ROWS, CriteoData
    from ..torchrec import to_kjt
    torch.manual_seed(0)
    names = [f"f_{i}" for i in range(len(DEFAULT_TABLE_ROWS))]
    configs = [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=dim, num_embeddings=n, feature_names=[names[i]])
               for i, n in enumerate(DEFAULT_TABLE_ROWS)]
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(configs), dense_in_features=13,
                 dense_arch_layer_sizes=[64, dim], over_arch_layer_sizes=[64, 32, 1])
    opt = KeyedOptimizerWrapper(dict(model.named_parameters()), lambda p: torch.optim.Adagrad(p, lr=0.05))
    for _ in range(epochs):
        for b in CriteoData(where / "train.npz", DEFAULT_TABLE_ROWS, batch_size):
            logits = model(b.dense, to_kjt(b.sparse, names)).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.state_dict(), where / "torchrec.pt")
    torch.save(opt.state_dict(), where / "torchrec.opt.pt")
    return where / "torchrec.pt"


def fidelity_torchrec(where: Path, echo=None) -> dict:
    """The set's TorchRec model: compressed with its optimizer's state given apart, and as the dlrm models."""
    from ..convert import compress
    from ..convert.importance import FidelityOptions
    from ..training.finetune import finetune
    t0 = time.perf_counter()
    base = train_torchrec_model(where)
    test = where / "test.npz"
    out = {"model": "torchrec-adagrad-d16-e1", "optimizer": "adagrad", "dim": 16, "epochs": 1}
    compress(base, where / "tr.r50.safetensors", ratio=50, force=True, progress=False,
             optimizer_state=where / "torchrec.opt.pt")
    out["r50"] = _auc_diffs(base, where / "tr.r50.safetensors", test, int8=True)
    out["r50"]["importance"] = "optimizer"
    compress(base, where / "tr.plain.safetensors", ratio=50, force=True, progress=False,
             fidelity=FidelityOptions("none"))
    out["r50_plain"] = _auc_diffs(base, where / "tr.plain.safetensors", test)
    comp, ft = where / "tr.r200.safetensors", where / "tr.r200.ft.safetensors"
    compress(base, comp, ratio=200, data=where / "train.npz", force=True, progress=False)
    finetune(comp, where / "train.npz", ft, where / "val.npz", device="cpu", eval_every=200, force=True,
             progress=False, control=base)
    out["r200"] = _auc_diffs(base, comp, test, ft, where / "tr.r200.ft.control.safetensors")
    out["seconds"] = time.perf_counter() - t0
    if echo:
        echo(format_model(out))
    return out


def bench_fidelity(optimizers: Sequence[str] = ("sgd", "adagrad", "adam"), dims: Sequence[int] = (16, 64),
                   epochs: int = 2, train_rows: int = 300_000, folder: Optional[str] = None,
                   echo: Optional[Callable[[str], None]] = None, torchrec: bool = True) -> dict:
    """Every model of the set (``optimizers`` x ``dims``, ``epochs`` epochs each, and a TorchRec DLRM trained by
    TorchRec code for one epoch, where torchrec is installed) in one run."""
    import torch
    from ..data.synth import synth
    out = {"train_rows": train_rows, "threads": torch.get_num_threads(), "torch": torch.__version__, "models": []}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        where = Path(tmp)
        for name, n, seed in (("train.npz", train_rows, 0), ("val.npz", 30_000, 1), ("test.npz", 50_000, 2)):
            synth(where / name, n, seed=seed, force=True)
        for dim in dims:
            for optimizer in optimizers:
                out["models"].append(fidelity_model(where, optimizer, dim, epochs, echo))
        if torchrec:
            import importlib.util
            if importlib.util.find_spec("torchrec") is None:
                if echo:
                    echo("torchrec is not installed: the set's TorchRec model is left out (docs/torchrec.md)")
            else:
                out["models"].append(fidelity_torchrec(where, echo))
    return out


def _signed(x) -> str:
    from ..reporting.tables import signed
    return "" if x is None else signed(x)


def format_model(m: dict) -> str:
    r50, plain, r200 = m["r50"], m["r50_plain"], m["r200"]
    return (f"{m['model']}: baseline {r50['baseline_auc']:.4f}; r50 ({r50['importance']}) "
            f"{_signed(r50['compressed'])} (plain {_signed(plain['compressed'])}, int8 "
            f"{_signed(r50['int8_rowwise'])}); r200 with data {_signed(r200['compressed'])}, fine-tuned "
            f"{_signed(r200['finetuned'])}, control {_signed(r200['control'])}, against the control "
            f"{_signed(r200['finetuned_vs_control'])} ({m['seconds']:.0f} s)")


def format_fidelity(out: dict) -> str:
    from ..reporting.tables import format_bytes, render_table
    import textwrap
    at50, at200 = [], []
    for m in out["models"]:
        r50, plain, r200 = m["r50"], m["r50_plain"], m["r200"]
        at50.append([m["model"], f"{r50['baseline_auc']:.4f}", format_bytes(r50["tables_bytes"]),
                     f"{r50['tables_ratio']:.0f}x", _signed(r50["compressed"]), _signed(plain["compressed"]),
                     _signed(r50["int8_rowwise"])])
        at200.append([m["model"], format_bytes(r200["tables_bytes"]), f"{r200['tables_ratio']:.0f}x",
                      _signed(r200["compressed"]), _signed(r200["finetuned"]), _signed(r200["control"]),
                      _signed(r200["finetuned_vs_control"])])
    return (render_table(["model", "AUC", "r50 tables", "ratio", "r50", "plain", "int8"], at50) + "\n\n"
            + render_table(["model", "r200 tables", "ratio", "r200", "tuned", "control", "vs control"], at200)
            + "\n" + textwrap.fill(
                "AUC differences from each baseline on 50,000 test rows; tables: the compressed tables' bytes (every "
                "tensor counted) and their ratio; r50: --ratio 50 without data, plain: --importance none, int8: "
                "row-wise int8 of the same tables; r200: --ratio 200 --data; tuned: then one epoch of fine-tuning; "
                "control: the original fine-tuned the same way", width=100))
