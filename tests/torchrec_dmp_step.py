"""Run by tests/test_torchrec.py under ``torchrun --nproc-per-node 2`` (CPU, gloo): one training step of a
TorchRec DLRM with TT tables under DistributedModelParallel, each rank on half of a batch, against the
single-process step on the whole batch; then the same for a sequence model of TorchRec parts (an
EmbeddingCollection and an EBC, tests/two_tower.py).  Rank 0 writes the largest difference per tensor as JSON."""
import copy
import json
import logging
import os
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

import fpd_convert
import fpd_convert.torchrec as ftr
from two_tower import TwoTower, two_tower_batch

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

def differences(single, dmp, start):
    """Per tensor of the one-process model: the largest difference from DMP's, and how far the step moved it."""
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
    return diffs


out = {"diffs": differences(single, dmp, start), "plan": plan,
       "tt": sorted(ftr.TTEmbeddingBagCollection.tt_tables(dmp.module.sparse_arch.embedding_bag_collection))}

# a sequence model of your own: an EmbeddingCollection and an EBC, compressed with fpd_convert.compress_module (TT
# layers inside TorchRec's own collections, as load_into leaves them too), made TT collections for DMP
torch.manual_seed(0)
seq_model, _ = fpd_convert.compress_module(TwoTower(), rank=4, num_largest=2)
single = copy.deepcopy(seq_model)
start = {k: v.clone() for k, v in single.state_dict().items()}
labels = (torch.rand(b, generator=g) < 0.4).float()
opt = torch.optim.SGD(single.parameters(), lr=lr)
loss(single(*two_tower_batch(b, 3)).squeeze(1), labels).backward()
opt.step()
ftr.tt_collections(seq_model)
apply_optimizer_in_backward(torch.optim.SGD, [*seq_model.history.dense.parameters(),
                                              *seq_model.profile.dense.parameters()], {"lr": lr})
dmp = ftr.distribute(seq_model, device=torch.device("cpu"))
rest = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                             lambda params: torch.optim.SGD(params, lr=lr))
loss(dmp(*two_tower_batch(b, 3, half)).squeeze(1), labels[half]).backward()
rest.step()
out["two_tower"] = {"diffs": differences(single, dmp, start),
                    "plan": sorted(p for m in dmp.plan.plan.values() for p in m),
                    "tt": sorted([*dmp.module.history.tt_tables(), *dmp.module.profile.tt_tables()])}
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
dist.destroy_process_group()
sys.stdout.flush()
# the work is done and written: leave without C++'s exit-time destructors, where one of TorchRec's / gloo's
# threads, still joinable, aborts the process now and then ("terminate called without an active exception",
# about 1 run in 10 on a busy 2-core machine) and torchrun reports the run failed
os._exit(0)
