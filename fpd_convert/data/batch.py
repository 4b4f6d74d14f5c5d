"""A batch of Criteo-style samples and the dense-feature transforms."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

NUM_DENSE = 13
NUM_SPARSE = 26

DENSE_TRANSFORMS = ("log", "none")


class Batch(NamedTuple):
    """``dense`` (B, 13) float32, ``sparse`` (B, 26) int64 row ids, ``labels`` (B,) float32."""

    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.dense.to(device), self.sparse.to(device), self.labels.to(device))

    def __len__(self):
        return self.labels.shape[0]


def transform_dense(x: np.ndarray, how: str = "log") -> np.ndarray:
    """``log``: ``log(1 + max(x, 0))`` (the DLRM/TorchRec convention); ``none``: as is."""
    if how == "log":
        return np.log1p(np.maximum(x, 0)).astype(np.float32)
    if how == "none":
        return x.astype(np.float32)
    raise ValueError(f"dense transform should be one of {DENSE_TRANSFORMS} but got {how!r}")


def make_batch(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray, transform: str) -> Batch:
    return Batch(torch.from_numpy(transform_dense(dense, transform)),
                 torch.from_numpy(np.ascontiguousarray(sparse, dtype=np.int64)),
                 torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)))
