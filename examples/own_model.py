"""Your own PyTorch model in, your own model out: a compressed state_dict loaded into your model class.

1. A two-tower-style model of its own class: an ``nn.Embedding`` of user ids, an ``nn.EmbeddingBag`` of the
   items a user saw (mean-pooled, 0 as padding) and an MLP; its state_dict saved as a training script
   saves it (``torch.save``).  Its tables are generated with TT structure plus noise (a trained table has
   far less: fine-tune to recover the AUC, docs/benchmarks.md).
2. ``fpd_convert.compress``: a generic state_dict, whose default tables are the tensors named as
   embedding tables (``user_emb``, ``item_emb``), not the MLP's weights.
3. ``fpd_convert.load_into(TwoTower(), file)``: the same class, its tables now ``TTEmbedding`` /
   ``TTEmbeddingBag`` with the modules' own options; scores equal to the dense model holding the TT
   reconstructions, to float rounding.
4. ``fpd_convert.save``: the model (after your fine-tuning, say) as a compressed file again, which
   ``load_into`` reads back.
5. ``torch.compile(fullgraph=True)`` and ``torch.export`` (a dynamic batch) of that model, your class;
   within ``fpd_convert.portable(model)`` its programs hold standard operators only: an ONNX file that
   ONNX Runtime scores (``--onnx``; needs the ``[export]`` extra).

    python examples/own_model.py --dir /tmp/fpd-own
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import fpd_convert
from fpd_convert.bench.svd import structured_rows


class TwoTower(nn.Module):
    def __init__(self, users: int = 50_000, items: int = 100_000, dim: int = 32):
        super().__init__()
        self.user_emb = nn.Embedding(users, dim)
        self.item_emb = nn.EmbeddingBag(items, dim, mode="mean", padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``user`` (B,), ``items`` (B, L) with 0 as padding -> click probabilities (B, 1)."""
        return torch.sigmoid(self.mlp(torch.cat([self.user_emb(user), self.item_emb(items)], dim=1)))


def batch(b: int, users: int, items: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    seen = torch.randint(1, items, (b, 6), generator=g)
    seen[:, 4:] = torch.where(torch.rand(b, 2, generator=g) < 0.5, 0, seen[:, 4:])  # some bags padded
    return torch.randint(0, users, (b,), generator=g), seen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("fpd-own"))
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--ratio", type=float, default=20)
    p.add_argument("--onnx", action="store_true", help="also export to ONNX and score it with ONNX Runtime")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = TwoTower(args.users, args.items).eval()
    with torch.no_grad():
        model.user_emb.weight.copy_(structured_rows(args.users, 32, rank=8, seed=1)(0, args.users))
        model.item_emb.weight.copy_(structured_rows(args.items, 32, rank=8, seed=2)(0, args.items))
    source, compressed = args.dir / "two_tower.pt", args.dir / "two_tower.tt.safetensors"
    torch.save(model.state_dict(), source)

    summary = fpd_convert.compress(source, compressed, ratio=args.ratio, force=True, progress=False)
    for t in summary.tables:
        print(f"  {t.key}: {t.rows:,} x {t.dim}, {t.bytes_before:,} -> {t.bytes_after:,} bytes, "
              f"relative error {t.relative_error:.3f}")
    print(f"file: {source.stat().st_size:,} -> {compressed.stat().st_size:,} bytes")

    mine = fpd_convert.load_into(TwoTower(args.users, args.items), compressed).eval()
    print(f"loaded into TwoTower: user_emb {type(mine.user_emb).__name__}, item_emb {type(mine.item_emb).__name__}"
          f" (mode {mine.item_emb.mode!r}, padding_idx {mine.item_emb.padding_idx})")
    reference = TwoTower(args.users, args.items).eval()
    with torch.no_grad():
        reference.load_state_dict({**model.state_dict(), "user_emb.weight": mine.user_emb.to_dense(),
                                   "item_emb.weight": mine.item_emb.to_dense()})
    user, items = batch(512, args.users, args.items, seed=3)
    with torch.no_grad():
        got = mine(user, items)
        print(f"largest difference from TwoTower with the TT reconstructions: "
              f"{float((got - reference(user, items)).abs().max()):.2e}")
        print(f"mean |score difference| from the original: {float((got - model(user, items)).abs().mean()):.4f}")

    saved = fpd_convert.save(mine, args.dir / "two_tower.saved.tt.safetensors", force=True)
    with torch.no_grad():
        again = fpd_convert.load_into(TwoTower(args.users, args.items), saved).eval()
        print(f"fpd_convert.save, then load_into: same scores {torch.equal(again(user, items), got)}")

        compiled = torch.compile(mine, fullgraph=True)
        print(f"torch.compile(fullgraph=True): same scores {torch.allclose(compiled(user, items), got, atol=1e-5)}")
        b = torch.export.Dim("batch", min=1)
        program = torch.export.export(mine, (user, items), dynamic_shapes=({0: b}, {0: b}))
        other_user, other_items = batch(37, args.users, args.items, seed=4)
        same = torch.allclose(program.module()(other_user, other_items), mine(other_user, other_items), atol=1e-5)
        print(f"torch.export (dynamic batch), another batch size: same scores {same}")
        with fpd_convert.portable(mine):
            program = torch.export.export(mine, (user, items), dynamic_shapes=({0: b}, {0: b}))
        ours = sorted({str(n.target) for n in program.graph.nodes if "fpd_convert" in str(n.target)})
        print(f"within fpd_convert.portable: fpd_convert operators in the program: {ours or 'none'}")
        if args.onnx:
            import onnxruntime as ort
            with fpd_convert.portable(mine, onnx=True):
                onnx_program = torch.onnx.export(mine, (user, items), dynamic_shapes=({0: b}, {0: b}), dynamo=True,
                                                 input_names=["user", "items"], verbose=False)
            onnx_program.save(str(args.dir / "two_tower.onnx"))
            session = ort.InferenceSession(str(args.dir / "two_tower.onnx"), providers=["CPUExecutionProvider"])
            scores = session.run(None, {"user": other_user.numpy(), "items": other_items.numpy()})[0]
            same = torch.allclose(torch.from_numpy(scores), mine(other_user, other_items), atol=1e-5)
            print(f"ONNX Runtime, another batch size: same scores {same}")


if __name__ == "__main__":
    main()
