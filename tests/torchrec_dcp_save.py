"""Run by tests/test_torchrec.py under ``torchrun --nproc-per-node 2`` (CPU, gloo): a TorchRec DLRM sharded
by DistributedModelParallel (TorchRec's planner: its tables split over the two ranks), saved as TorchRec
users save one, with torch.distributed.checkpoint: ``dcp.save({"model": ..., "epoch": ...})``.  The model's
weights come from a seed, so the test rebuilds them unsharded."""
import logging
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
dmp = DistributedModelParallel(model, device=torch.device("cpu"), sharders=[EmbeddingBagCollectionSharder()])
dmp.load_state_dict(torchrec_state(seed=0))  # DMP initializes the tables it shards: the weights go in after
sharded = [k for k, v in dmp.state_dict().items() if hasattr(v, "local_shards")]
assert sharded, "the planner sharded no table"
dcp.save({"model": dmp.state_dict(), "epoch": 3}, checkpoint_id=sys.argv[1])
if dist.get_rank() == 0:  # what not to do: rank 0's torch.save holds ShardedTensors, its shards only
    torch.save(dmp.state_dict(), sys.argv[1] + ".rank0.pt")
dist.destroy_process_group()
