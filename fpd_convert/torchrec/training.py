"""Fine-tuning a compressed TorchRec model as TorchRec runs it: ``fpd-convert finetune --torchrec``.

:func:`torchrec_trainee` loads the file as a real TorchRec DLRM (:func:`fpd_convert.torchrec.load`) and
gives the training loop (:func:`fpd_convert.training.loop.fit`) what it drives: ``logits(dense, sparse)``
for Criteo batches (their (B, 26) ids become the model's ``KeyedJaggedTensor``) and state dicts of whole
tensors.  Under ``torchrun`` the model runs under ``DistributedModelParallel``
(:func:`fpd_convert.torchrec.distribute`): TorchRec's planner shards the tables kept dense, which take
their optimizer in the backward as TorchRec trains them; the TT tables and the MLPs are replicated and
take the usual optimizer, their gradients averaged.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .collection import TTEmbeddingBagCollection
from .convert import distribute, load, to_kjt


class CriteoTrainee(nn.Module):
    """A TorchRec DLRM (``model``, or its DMP ``parallel``) driven by Criteo batches."""

    #: the training loop must not wrap it in DDP: DMP does its data parallelism
    parallel_inside = True

    def __init__(self, model: nn.Module, architecture: dict, parallel: Optional[nn.Module] = None):
        super().__init__()
        self.net = parallel if parallel is not None else model
        self.architecture = architecture
        ebc = model.sparse_arch.embedding_bag_collection
        self.feature_names: List[str] = [f for c in ebc.embedding_bag_configs() for f in c.feature_names]
        self.parallel_inside = parallel is not None

    def logits(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        if not isinstance(sparse, torch.Tensor):
            raise ValueError("finetune --torchrec takes one id per feature (Criteo data)")
        return self.net(dense, to_kjt(sparse, self.feature_names))

    forward = logits

    def load_state_dict(self, state, strict: bool = True):
        """Whole tensors (as :meth:`full_state_dict` gives them) into the model, sharded or not."""
        return self.net.load_state_dict(dict(state), strict=strict)

    def full_state_dict(self) -> dict:
        """Whole tensors of every parameter and buffer (sharded tables gathered, on every rank: a
        collective call under DMP)."""
        state = self.net.state_dict()
        out = {}
        for k, v in state.items():
            key = k[len("module."):] if k.startswith("module.") else k
            if hasattr(v, "local_shards"):  # a ShardedTensor
                full = torch.zeros(v.size(), dtype=v.dtype)
                v.gather(dst=0, out=full if dist.get_rank() == 0 else None)
                dist.broadcast(full, src=0)
                v = full
            out[key] = v.detach().to("cpu", copy=True)
        return out


def torchrec_trainee(path, device: torch.device, optimizer: str, lr: float, tt_lr: Optional[float],
                     distributed: bool) -> Tuple[CriteoTrainee, torch.optim.Optimizer]:
    """``(trainee, optimizer)`` for ``finetune --torchrec``: the file as a TorchRec DLRM in train mode, under
    DMP when ``distributed``; the optimizer covers what DMP does not train in the backward."""
    import warnings
    from ..checkpoints import read_compressed_meta
    from ..training.optim import make_optimizer, optimizer_class
    # fbgemm's CPU lookup under DMP warns that it has no autograd kernel; TorchRec trains those tables
    # through its own backward (measured: the same weights as one process, tests/test_torchrec.py)
    warnings.filterwarnings("ignore", message=".*dense_embedding_codegen_lookup_function.*")
    model = load(path).train().to(device)
    architecture = read_compressed_meta(path).architecture
    if not distributed:
        return CriteoTrainee(model, architecture), make_optimizer(model, optimizer, lr, tt_lr)
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    ebc = model.sparse_arch.embedding_bag_collection
    if isinstance(ebc, TTEmbeddingBagCollection) and ebc.dense is not None:
        apply_optimizer_in_backward(optimizer_class(optimizer), ebc.dense.parameters(), {"lr": lr})
    parallel = distribute(model, device=device)
    rest = dict(in_backward_optimizer_filter(parallel.named_parameters()))
    tt_ids = {id(p) for m in parallel.modules() if hasattr(m, "tt_shape") for p in m.parameters()}
    cls = optimizer_class(optimizer)

    def build(params):
        params = list(params)
        groups = [{"params": [p for p in params if id(p) not in tt_ids], "lr": lr},
                  {"params": [p for p in params if id(p) in tt_ids], "lr": tt_lr if tt_lr is not None else lr}]
        return cls([g for g in groups if g["params"]], lr=lr)
    return CriteoTrainee(model, architecture, parallel), KeyedOptimizerWrapper(rest, build)
