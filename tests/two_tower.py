"""A small sequence model of TorchRec parts, for tests/test_torchrec.py and tests/torchrec_dmp_step.py: the
user's history through an ``EmbeddingCollection`` (unpooled), their profile through an
``EmbeddingBagCollection``."""
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

ITEMS, SHOPS, USERS, AGES = 4000, 30, 2500, 10


class TwoTower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.history = EmbeddingCollection([
            EmbeddingConfig(name="item", embedding_dim=8, num_embeddings=ITEMS, feature_names=["seen", "next"]),
            EmbeddingConfig(name="shops", embedding_dim=8, num_embeddings=SHOPS, feature_names=["shop"])])
        self.profile = EmbeddingBagCollection([
            EmbeddingBagConfig(name="users", embedding_dim=8, num_embeddings=USERS, feature_names=["user"]),
            EmbeddingBagConfig(name="ages", embedding_dim=8, num_embeddings=AGES, feature_names=["age"])])
        self.mlp = torch.nn.Linear(32, 1)

    def forward(self, seq: KeyedJaggedTensor, user: KeyedJaggedTensor) -> torch.Tensor:
        jt = self.history(seq)
        b = user.stride()
        seen = jt["seen"].to_padded_dense(desired_length=3).sum(1)  # (B, 8): the history, up to 3 items
        nxt, shop = jt["next"].to_padded_dense(desired_length=1)[:, 0], jt["shop"].to_padded_dense(1)[:, 0]
        return self.mlp(torch.cat([seen * nxt, shop, self.profile(user).values().reshape(b, 16)], 1))


def two_tower_batch(b: int, seed: int, part: slice = slice(None)):
    """``(seq, user)`` KJTs of ``b`` generated samples (0-3 items seen, an item next, a shop, a user, an age
    each), of the samples in ``part`` only."""
    g = torch.Generator().manual_seed(seed)
    seen = [torch.randint(0, ITEMS, (int(n),), generator=g) for n in torch.randint(0, 4, (b,), generator=g)]
    one = {name: torch.randint(0, rows, (b,), generator=g)
           for name, rows in [("next", ITEMS), ("shop", SHOPS), ("user", USERS), ("age", AGES)]}
    seen, one = seen[part], {k: v[part] for k, v in one.items()}
    n = len(seen)
    ones = torch.ones(n, dtype=torch.long)
    seq = KeyedJaggedTensor.from_lengths_sync(
        ["seen", "next", "shop"], torch.cat([*seen, one["next"], one["shop"]]),
        torch.cat([torch.tensor([len(s) for s in seen], dtype=torch.long), ones, ones]))
    user = KeyedJaggedTensor.from_lengths_sync(["user", "age"], torch.cat([one["user"], one["age"]]),
                                               torch.cat([ones, ones]))
    return seq, user
