"""The device a command runs on, from its ``--device`` option."""
from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA where there is a device, else the CPU; otherwise the named device, refused
    with a ValueError when it is not a device name or names CUDA on a machine without it.

    Example::

        resolve_device("auto")   # device(type='cuda') on a GPU machine, device(type='cpu') elsewhere
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device should be auto, cpu, cuda or cuda:N but got {device!r}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but this machine has no CUDA device")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device should be auto, cpu, cuda or cuda:N but got {device!r}")
    return d
