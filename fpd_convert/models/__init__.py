"""DLRM-style models assembled from named parts, matching the source checkpoints' layouts."""
from .dlrm import DLRMNet, TorchRecDLRM, build_model, make_table, probabilities

__all__ = ["DLRMNet", "TorchRecDLRM", "build_model", "make_table", "probabilities"]
