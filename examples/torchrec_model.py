"""A TorchRec DLRM, trained by TorchRec code, compressed in place and still a TorchRec model.

1. build and train a small `torchrec.models.dlrm.DLRM` (an EmbeddingBagCollection fed by KeyedJaggedTensors);
2. `fpd_convert.torchrec.compress_module`: its two largest tables become TT tables;
3. the compressed model takes the same KJTs; its scores equal a TorchRec model holding the TT
   reconstructions as dense tables;
4. save it in the compressed format and load it back as a real TorchRec DLRM.

    python examples/torchrec_model.py --dir /tmp/fpd-torchrec
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import fpd_convert.torchrec as ftr

ROWS = {"user": 20_000, "item": 10_000, "country": 200, "device": 8}


def batch(b: int, seed: int):
    """Dense features, a KJT of bags of 1-3 ids a feature, and labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 4, (len(ROWS) * b,), generator=g)
    values = torch.cat([torch.randint(0, n, (int(lengths[i * b:(i + 1) * b].sum()),), generator=g)
                        for i, n in enumerate(ROWS.values())])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f"f_{k}" for k in ROWS], values=values, lengths=lengths)
    return torch.rand(b, 13, generator=g), kjt, (torch.rand(b, generator=g) < 0.3).float()


def main(argv=None):
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="fpd-torchrec")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)  # 1. a TorchRec model, trained by TorchRec code
    tables = [EmbeddingBagConfig(name=f"t_{k}", embedding_dim=16, num_embeddings=n, feature_names=[f"f_{k}"])
              for k, n in ROWS.items()]
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables), dense_in_features=13,
                 dense_arch_layer_sizes=[32, 16], over_arch_layer_sizes=[32, 1])
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    for step in range(args.steps):
        dense, kjt, labels = batch(256, step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    tt_model, summary = ftr.compress_module(model, rank=8, num_largest=2)  # 2. in TT
    ebc = tt_model.sparse_arch.embedding_bag_collection
    print(f"compressed: {type(tt_model).__name__} with {type(ebc).__name__}, TT tables {sorted(ebc.tt_tables())}")
    for t in summary.tables:
        print(f"  {t.name}: {t.rows:,} x {t.dim}, {t.bytes_before:,} -> {t.bytes_after:,} bytes ({t.ratio:.0f}x)")

    dense, kjt, _ = batch(64, 999)  # 3. the same KJTs, the scores of the TT reconstructions
    twin = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables), dense_in_features=13,
                dense_arch_layer_sizes=[32, 16], over_arch_layer_sizes=[32, 1])
    state = model.state_dict()
    for name, layer in ebc.tt_tables().items():
        state[f"sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"] = layer.to_dense()
    twin.load_state_dict(state)
    with torch.no_grad():
        got, want = tt_model.eval()(dense, kjt), twin.eval()(dense, kjt)
    print(f"largest difference from TorchRec with the TT reconstructions: {float((got - want).abs().max()):.2e}")

    path = ftr.save(tt_model, folder / "model.tt.safetensors", force=True)  # 4. the file, and back
    back = ftr.load(path)
    with torch.no_grad():
        same = torch.equal(back(dense, kjt), got)
    print(f"loaded {path} as {type(back).__module__}.{type(back).__name__}: same scores {same}")


if __name__ == "__main__":
    main()
