"""Run by tests/test_torchrec.py under ``torchrun --nproc-per-node 2`` (CPU, gloo): one training step of a
TorchRec DLRM with TT tables under DistributedModelParallel, each rank on half of a batch, against the
single-process step on the whole batch.  Rank 0 writes the largest difference per tensor as JSON."""
import copy
import json
import logging
import sys
import warnings

import torch
import torch.distributed as dist
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

import fpd_convert.torchrec as ftr

warnings.simplefilter("ignore")
logging.disable(logging.WARNING)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
rows = [5000, 3000, 40, 2000, 30]
configs = [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f_{i}"])
           for i, n in enumerate(rows)]
model = DLRM(embedding_bag_collection=EmbeddingBagCollection(configs), dense_in_features=13,
             dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
tt_model, _ = ftr.compress_module(model, rank=4, num_largest=2)
single = copy.deepcopy(tt_model)
start = {k: v.clone() for k, v in single.state_dict().items()}
keys = [c.feature_names[0] for c in configs]
g = torch.Generator().manual_seed(1)
b = 16
dense = torch.rand(b, 13, generator=g)
ids = torch.stack([torch.randint(0, n, (b,), generator=g) for n in rows], 1)
labels = (torch.rand(b, generator=g) < 0.4).float()
lr = 0.1
loss = torch.nn.BCEWithLogitsLoss()

opt = torch.optim.SGD(single.parameters(), lr=lr)  # one process, the whole batch
loss(single(dense, ftr.to_kjt(ids, keys)).squeeze(1), labels).backward()
opt.step()

# the tables TorchRec shards take their optimizer in the backward, as TorchRec trains them
apply_optimizer_in_backward(torch.optim.SGD, tt_model.sparse_arch.embedding_bag_collection.dense.parameters(),
                            {"lr": lr})
dmp = ftr.distribute(tt_model, device=torch.device("cpu"))
plan = {name: str(p.sharding_type) for name, p in dmp.plan.plan["sparse_arch.embedding_bag_collection.dense"].items()}
rest = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                             lambda params: torch.optim.SGD(params, lr=lr))
half = slice(rank * b // world, (rank + 1) * b // world)
loss(dmp(dense[half], ftr.to_kjt(ids[half], keys)).squeeze(1), labels[half]).backward()
rest.step()

got_state, diffs = dmp.state_dict(), {}
for k, want in single.state_dict().items():
    got = got_state.get(k, got_state.get("module." + k))
    if hasattr(got, "local_shards"):  # a sharded table: gathered on rank 0
        full = torch.zeros_like(want)
        got.gather(dst=0, out=full if rank == 0 else None)
        got = full
    if rank == 0:
        moved = float((want.float() - start[k].float()).abs().max()) if want.is_floating_point() else 0.0
        diffs[k] = {"diff": float((got.float() - want.float()).abs().max()), "moved": moved}
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"diffs": diffs, "plan": plan, "tt": sorted(ftr.TTEmbeddingBagCollection.tt_tables(
            dmp.module.sparse_arch.embedding_bag_collection))}, f)
dist.destroy_process_group()
