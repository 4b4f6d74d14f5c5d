"""fpd-convert: compress trained recommender models with tensor-train embedding tables.

Python API (each command has its function)::

    import fpd_convert
    summary = fpd_convert.compress("model.pt", "model.tt.safetensors", ratio=50)
    model = fpd_convert.load("model.tt.safetensors")          # nn.Module, eval mode
    mine = fpd_convert.load_into(MyModel(), "my_model.tt.safetensors")  # your own model, TT tables inside
    mine, summary = fpd_convert.compress_module(my_model, ratio=20)      # or compressed in memory
    fpd_convert.save(mine, "mine.ft.safetensors")             # after your fine-tuning: a compressed file again
    with fpd_convert.portable(mine, onnx=True):               # its programs need no fpd_convert to run
        torch.onnx.export(mine, args, dynamo=True).save("mine.onnx")
    fpd_convert.decompress("model.tt.safetensors", "model.dense.pt")
    fpd_convert.inspect("model.tt.safetensors")
    fpd_convert.export("model.tt.safetensors", "model.pt2", format="aoti")  # runs where only torch is
    fpd_convert.keep_freed_memory()  # once, before serving on the CPU (glibc; see fpd_convert.allocator)

The names are imported on first use (PEP 562), so that ``import fpd_convert`` and
``fpd-convert --help`` do not load torch and TensorLy (2 s) before they are needed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {"compress": ".convert", "compress_module": ".convert", "decompress": ".convert", "export": ".convert",
            "inspect": ".convert", "load": ".convert", "load_into": ".convert", "save": ".convert",
            "portable": ".layers.traced",
            "TTEmbedding": ".layers", "TTEmbeddingBag": ".layers", "decompose_table": ".tt",
            "keep_freed_memory": ".allocator"}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
