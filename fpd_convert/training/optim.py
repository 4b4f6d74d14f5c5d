"""Optimizers with a separate learning rate for TT cores."""
from __future__ import annotations

import torch

from ..layers.tt_table import _TTTable

OPTIMIZERS = ("sgd", "adagrad", "adam")


def tt_parameters(model: torch.nn.Module):
    ids = set()
    for m in model.modules():
        if isinstance(m, _TTTable):
            ids |= {id(p) for p in m.parameters()}
    return ids


def optimizer_class(name: str):
    """The ``torch.optim`` class of ``name`` (sgd, adagrad, adam)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer should be one of {OPTIMIZERS} but got {name!r}")
    return {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}[name]


def make_optimizer(model: torch.nn.Module, name: str = "adagrad", lr: float = 0.01, tt_lr=None):
    """``name`` in sgd/adagrad/adam; TT cores get ``tt_lr`` (default ``lr``)."""
    cls = optimizer_class(name)
    tt = tt_parameters(model)
    groups = [{"params": [p for p in model.parameters() if id(p) not in tt], "lr": lr},
              {"params": [p for p in model.parameters() if id(p) in tt], "lr": tt_lr if tt_lr is not None else lr}]
    groups = [g for g in groups if g["params"]]
    return cls(groups, lr=lr)
