"""AUC and log loss of a model on a dataset (scikit-learn computes the metrics)."""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

from ..data import Batch
from ..models import probabilities


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[Batch], device="cpu", max_batches: Optional[int] = None):
    """(probabilities, labels) as numpy arrays."""
    model.eval()
    ps, ys = [], []
    for i, b in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        b = b.to(device)
        ps.append(probabilities(model, b.dense, b.sparse).float().cpu().numpy())
        ys.append(b.labels.cpu().numpy())
    if not ps:
        raise ValueError("the evaluation data gave no rows")
    return np.concatenate(ps), np.concatenate(ys)


def scores(p: np.ndarray, y: np.ndarray) -> dict:
    """``auc``, ``logloss``, ``n``, ``ctr``; AUC is NaN when only one class is present."""
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    return {"auc": auc, "logloss": float(log_loss(y, p, labels=[0, 1])), "n": int(len(y)), "ctr": float(y.mean())}


def evaluate(model, batches, device="cpu", max_batches: Optional[int] = None) -> dict:
    was_training = model.training
    out = scores(*predict(model, batches, device, max_batches))
    model.train(was_training)
    return out
