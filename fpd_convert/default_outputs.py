"""The file a command writes when it is not told where (no ``-o``): beside its input, named after it.

======================  ==============================  ==========================================
command                 input                           output
======================  ==============================  ==========================================
``compress``            ``model.pt``                    ``model.tt.safetensors``
``compress``            ``ckpt.100/`` (a DCP folder)    ``ckpt.100.tt.safetensors``
``finetune``            ``model.tt.safetensors``        ``model.ft.safetensors``
``decompress``          ``model.tt.safetensors``        ``model.dense.pt`` (``.dense.safetensors``
                                                        for a safetensors source)
``export``              ``model.ft.safetensors``        ``model.ft.pt2``, ``model.ft.aoti.pt2``,
                                                        ``model.ft.onnx``
======================  ==============================  ==========================================

The name is only a default: an existing file is still refused without ``force``
(:func:`fpd_convert.outputs.check_output`).
"""
from __future__ import annotations

import os
from pathlib import Path

_EXPORT = {"pt2": ".pt2", "aoti": ".aoti.pt2", "onnx": ".onnx"}


def _base(path: Path, drop_tt: bool) -> str:
    """The name without its last suffix (and, for a compressed file, a ``.tt`` before it); a folder's (a
    torch.distributed.checkpoint's, ``step.100/``) whole."""
    name = path.name[:-len(path.suffix)] if path.suffix and not path.is_dir() else path.name
    return name[:-3] if drop_tt and name.endswith(".tt") and len(name) > 3 else name


def compressed_output(model: os.PathLike) -> Path:
    path = Path(model)
    return path.with_name(_base(path, drop_tt=False) + ".tt.safetensors")


def finetuned_output(compressed: os.PathLike) -> Path:
    path = Path(compressed)
    return path.with_name(_base(path, drop_tt=True) + ".ft.safetensors")


def dense_output(compressed: os.PathLike, container: str) -> Path:
    """``container``: the source's, as the compressed file's metadata names it (``safetensors`` or a ``.pt``)."""
    path = Path(compressed)
    suffix = ".safetensors" if container == "safetensors" else ".pt"
    return path.with_name(_base(path, drop_tt=True) + ".dense" + suffix)


def exported_output(compressed: os.PathLike, format: str) -> Path:
    path = Path(compressed)
    return path.with_name(_base(path, drop_tt=False) + _EXPORT[format])
