"""Run by tests/test_torchrec.py under ``torchrun --nproc-per-node 2`` (CPU, gloo): a TorchRec DLRM sharded
by DistributedModelParallel (TorchRec's planner: its tables split over the two ranks), saved as TorchRec
users save one, with torch.distributed.checkpoint: ``dcp.save({"model": ..., "epoch": ...})`` to argv[1]
(the weights come from a seed: the test rebuilds them unsharded), then after one step of its fused
Adagrad, with the optimizer's state, ``{"model": ..., "optim": ...}``, to argv[1] + ".adagrad"."""
import logging
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, sys.argv[2])
from layouts import ROWS, torchrec_state  # noqa: E402

warnings.simplefilter("ignore")
logging.disable(logging.WARNING)
dist.init_process_group("gloo")
configs = [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f_{i}"])
           for i, n in enumerate(ROWS)]
model = DLRM(embedding_bag_collection=EmbeddingBagCollection(configs), dense_in_features=13,
             dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[32, 1])
model.load_state_dict(torchrec_state(seed=0))
apply_optimizer_in_backward(torch.optim.Adagrad, model.sparse_arch.parameters(), {"lr": 0.1})
dmp = DistributedModelParallel(model, device=torch.device("cpu"), sharders=[EmbeddingBagCollectionSharder()])
dmp.load_state_dict(torchrec_state(seed=0))  # DMP initializes the tables it shards: the weights go in after
sharded = [k for k, v in dmp.state_dict().items() if hasattr(v, "local_shards")]
assert sharded, "the planner sharded no table"
dcp.save({"model": dmp.state_dict(), "epoch": 3}, checkpoint_id=sys.argv[1])
if dist.get_rank() == 0:  # what not to do: rank 0's torch.save holds ShardedTensors, its shards only
    torch.save(dmp.state_dict(), sys.argv[1] + ".rank0.pt")
g = torch.Generator().manual_seed(1)
ids = torch.stack([torch.randint(0, n // 10 + 1, (8,), generator=g) for n in ROWS], 1)  # the first tenth only
features = KeyedJaggedTensor.from_lengths_sync([c.feature_names[0] for c in configs], ids.t().reshape(-1),
                                               torch.ones(ids.numel(), dtype=torch.long))
dmp(torch.rand(8, 13, generator=g), features).sum().backward()  # the fused optimizer steps in the backward
dcp.save({"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()}, checkpoint_id=sys.argv[1] + ".adagrad")
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
# the work is done and written: leave without C++'s exit-time destructors, where one of TorchRec's / gloo's
# threads, still joinable, aborts the process now and then ("terminate called without an active exception",
# about 1 run in 10 on a busy 2-core machine) and torchrun reports the run failed
os._exit(0)
