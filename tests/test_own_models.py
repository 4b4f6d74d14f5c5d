"""The user's own model with TT tables: ``fpd_convert.load_into`` (from a file), ``compress_module`` (in memory)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fpd_convert
from fpd_convert.checkpoints import CheckpointError, read_source
from fpd_convert.layers import TTEmbedding, TTEmbeddingBag
from fpd_convert.models import build_model
from layouts import batch, dlrm_checkpoint, dlrm_state


class Mine(nn.Module):
    def __init__(self, users=3000, items=2000, dim=8, max_norm=None):
        super().__init__()
        self.user_emb = nn.Embedding(users, dim, padding_idx=1, max_norm=max_norm)
        self.towers = nn.ModuleDict({"item_emb": nn.EmbeddingBag(items, dim, mode="max", include_last_offset=True)})
        self.head = nn.Linear(2 * dim, 1)

    def forward(self, user, items, offsets):
        return self.head(torch.cat([self.user_emb(user), self.towers["item_emb"](items, offsets)], 1))


def _compressed(tmp_path, model):
    torch.save(model.state_dict(), tmp_path / "mine.pt")
    out = tmp_path / "mine.tt.safetensors"
    fpd_convert.compress(tmp_path / "mine.pt", out, rank=4, progress=False)
    return out


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, 2000, (40,), generator=g)
    return torch.randint(0, 3000, (16,), generator=g), items, torch.tensor([0, 3, 3, 10, 12, 20, 22, 25, 30, 31, 33,
                                                                            34, 35, 36, 37, 39, 40])


def test_own_model_gets_tt_layers_with_its_options_and_the_files_other_tensors(tmp_path):
    torch.manual_seed(0)
    original = Mine()
    path = _compressed(tmp_path, original)
    fresh = Mine()
    mine = fpd_convert.load_into(fresh, path)
    assert mine is fresh and mine.user_emb.training  # in place, in the replaced module's mode (a new one trains)
    user, bag = mine.user_emb, mine.towers["item_emb"]
    assert isinstance(user, TTEmbedding) and user.padding_idx == 1
    assert isinstance(bag, TTEmbeddingBag) and (bag.mode, bag.include_last_offset) == ("max", True)
    torch.testing.assert_close(mine.head.weight, original.head.weight)  # the file's other tensors, not fresh ones
    generic = fpd_convert.load(path)  # the same TT tables as load() gives
    torch.testing.assert_close(user.to_dense(), generic.table("user_emb.weight").to_dense())
    reference = Mine()
    reference.load_state_dict({**original.state_dict(), "user_emb.weight": user.to_dense(),
                               "towers.item_emb.weight": bag.to_dense()})
    args = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(mine.eval()(*args), reference.eval()(*args), atol=1e-5, rtol=1e-5)
        program = torch.export.export(mine, args)
        torch.testing.assert_close(program.module()(*args), reference(*args), atol=1e-5, rtol=1e-5)


def test_a_dlrm_file_goes_into_the_dense_dlrm_class(tmp_path):
    torch.save(dlrm_checkpoint(dlrm_state(weighted=True)), tmp_path / "m.pt")
    out = tmp_path / "c.safetensors"
    fpd_convert.compress(tmp_path / "m.pt", out, rank=4, tables=["0", "2"], progress=False)
    dense_model = build_model(read_source(tmp_path / "m.pt").architecture)  # nn.EmbeddingBag tables
    mine = fpd_convert.load_into(dense_model, out).eval()
    assert [type(t).__name__ for t in mine.emb_l][:3] == ["TTEmbeddingBag", "EmbeddingBag", "TTEmbeddingBag"]
    dense, ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(mine(dense, ids), fpd_convert.load(out)(dense, ids), atol=1e-6, rtol=1e-6)


def test_load_into_refuses_what_does_not_fit(tmp_path):
    torch.manual_seed(0)
    path = _compressed(tmp_path, Mine())
    torch.save(Mine().state_dict(), tmp_path / "plain.pt")

    class Renamed(Mine):
        def __init__(self):
            super().__init__()
            self.users = self.user_emb
            del self.user_emb

    class Wider(Mine):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    class NotATable(Mine):
        def __init__(self):
            super().__init__()
            self.user_emb = nn.Linear(8, 3000)

    for model, target, message in [(Mine(), tmp_path / "plain.pt", "not one"),
                                   (Renamed(), path, "no module 'user_emb'"),
                                   (Mine(users=2999), path, "3,000 x 8 in the file but 2,999 x 8"),
                                   (NotATable(), path, "is a Linear"),
                                   (Mine(max_norm=1.0), path, "max_norm"),
                                   (Wider(), path, "missing ['extra.weight', 'extra.bias']")]:
        with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
            fpd_convert.load_into(model, target)


def test_a_torchrec_state_dict_file_goes_into_the_users_own_torchrec_model(tmp_path):
    pytest.importorskip("torchrec")
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    rows = [4000, 50, 2500]

    def make(device=None):  # feature names of its own, which a state_dict does not hold
        configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
                   for i, n in enumerate(rows)]
        return DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=configs, device=device),
                    dense_in_features=13, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1],
                    dense_device=device)

    torch.manual_seed(0)
    original = make()
    torch.save(original.state_dict(), tmp_path / "tr.pt")
    fpd_convert.compress(tmp_path / "tr.pt", tmp_path / "tr.tt.safetensors", rank=4, tables=["t0", "t2"],
                         progress=False)
    mine = fpd_convert.load_into(make(), tmp_path / "tr.tt.safetensors").eval()
    bags = mine.sparse_arch.embedding_bag_collection.embedding_bags
    assert [type(bags[t]).__name__ for t in ("t0", "t1", "t2")] == ["TTEmbeddingBag", "EmbeddingBag", "TTEmbeddingBag"]
    reference = make().eval()
    state = original.state_dict()
    for t in ("t0", "t2"):
        state[f"sparse_arch.embedding_bag_collection.embedding_bags.{t}.weight"] = bags[t].to_dense()
    reference.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 3, (3 * 8,), generator=g)
    values = torch.cat([torch.randint(0, n, (int(lengths[i * 8:(i + 1) * 8].sum()),), generator=g)
                        for i, n in enumerate(rows)])
    features = KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2"], values, lengths)  # its own feature names
    dense = torch.randn(8, 13, generator=g)
    # TorchRec's way to build a model too big to allocate: on the meta device
    from_meta = fpd_convert.load_into(make(torch.device("meta")), tmp_path / "tr.tt.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(dense, features), reference(dense, features), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(from_meta(dense, features), mine(dense, features), atol=0, rtol=0)


def test_compress_module_swaps_the_largest_embedding_modules_in_a_copy():
    torch.manual_seed(0)
    original = Mine()
    mine, summary = fpd_convert.compress_module(original, rank=4, num_largest=1)
    assert type(original.user_emb) is nn.Embedding  # a copy unless inplace
    assert isinstance(mine.user_emb, TTEmbedding) and mine.user_emb.padding_idx == 1
    assert type(mine.towers["item_emb"]) is nn.EmbeddingBag  # the one largest only
    assert [t.key for t in summary.tables] == ["user_emb.weight"] and summary.tables[0].bytes_after < 3000 * 8 * 4
    torch.testing.assert_close(mine.head.weight, original.head.weight)
    counts = {"towers.item_emb": np.arange(2000, dtype=np.int64)}  # by module name, as tables= takes them
    same, summary = fpd_convert.compress_module(original, tables=["towers.item_emb"], rank=4, counts=counts,
                                                inplace=True)
    assert same is original and isinstance(original.towers["item_emb"], TTEmbeddingBag)
    assert original.towers["item_emb"].mode == "max" and summary.tables[0].importance == "data"
    reference = Mine()
    reference.load_state_dict({**Mine().state_dict(), **{k: v for k, v in original.state_dict().items() if "towers" not in k
                                                        and "user_emb" not in k},
                               "user_emb.weight": original.user_emb.weight,
                               "towers.item_emb.weight": original.towers["item_emb"].to_dense()})
    args = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(original.eval()(*args), reference.eval()(*args), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds no nn.Embedding"):
        fpd_convert.compress_module(nn.Linear(3, 3), rank=2)


def test_a_file_saved_through_ddp_or_compile_fits_the_bare_model(tmp_path):
    torch.manual_seed(0)
    original = Mine()
    for wrapper in ("module.", "_orig_mod."):
        torch.save({wrapper + k: v for k, v in original.state_dict().items()}, tmp_path / "wrapped.pt")
        out = tmp_path / f"wrapped{wrapper[:-1]}.tt.safetensors"
        fpd_convert.compress(tmp_path / "wrapped.pt", out, rank=4, progress=False)
        mine = fpd_convert.load_into(Mine(), out)
        assert isinstance(mine.user_emb, TTEmbedding)
        torch.testing.assert_close(mine.head.bias, original.head.bias)


def test_a_bfloat16_model_gets_bfloat16_tt_layers(tmp_path):
    torch.manual_seed(0)
    path = _compressed(tmp_path, Mine())
    mine = fpd_convert.load_into(Mine().to(torch.bfloat16), path).eval()
    assert {p.dtype for p in mine.user_emb.parameters()} == {torch.bfloat16}
    user, items, offsets = _inputs()
    with torch.no_grad():
        assert mine(user, items, offsets).dtype == torch.bfloat16  # the user's forward runs as it did


def test_a_model_built_on_the_meta_device_comes_back_on_the_cpu_with_the_files_tensors(tmp_path):
    torch.manual_seed(0)
    path = _compressed(tmp_path, Mine())
    expected = fpd_convert.load_into(Mine(), path).eval()
    for dtype in (torch.float32, torch.bfloat16):
        with torch.device("meta"):  # the dense tables are never allocated
            model = Mine().to(dtype)
        mine = fpd_convert.load_into(model, path).eval()
        tensors = [*mine.parameters(), *mine.buffers()]
        assert {t.device.type for t in tensors} == {"cpu"} and {p.dtype for p in mine.parameters()} == {dtype}
        assert isinstance(mine.user_emb, TTEmbedding) and mine.user_emb.padding_idx == 1
        assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in mine.head.parameters())
        with torch.no_grad():
            if dtype == torch.float32:
                torch.testing.assert_close(mine(*_inputs()), expected(*_inputs()), atol=0, rtol=0)
            torch.testing.assert_close(mine.head.weight, expected.head.weight.to(dtype), atol=0, rtol=0)

    class WithScale(Mine):  # a buffer a state_dict does not hold cannot come from the file
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(1), persistent=False)

    with torch.device("meta"):
        model = WithScale()
    with pytest.raises(CheckpointError, match=r"meta device and the file does not hold \['scale'\]"):
        fpd_convert.load_into(model, path)
    assert fpd_convert.load_into(WithScale(), path).scale.item() == 1.0  # built on the CPU: its own buffer


def test_report_gives_a_generic_files_sizes_and_refuses_data_it_cannot_score(tmp_path):
    from click.testing import CliRunner
    from fpd_convert.cli import main
    from fpd_convert.reporting.report import report
    torch.manual_seed(0)
    path = _compressed(tmp_path, Mine())
    r = report(tmp_path / "mine.pt", path)
    assert r["layout"] == "generic" and set(r["models"]) == {"original", "compressed", "int8_rowwise"}
    dense = (3000 + 2000) * 8 * 4
    assert [t["key"] for t in r["tables"]] == ["user_emb.weight", "towers.item_emb.weight"]
    assert r["totals"]["tables_bytes_before"] == dense and r["totals"]["tables_ratio"] > 5
    assert r["models"]["compressed"]["bytes"] < r["models"]["int8_rowwise"]["bytes"] < r["models"]["original"]["bytes"]
    assert "auc" not in r["models"]["compressed"] and "generic state_dict: sizes and errors only" in r["warnings"][0]
    data = Path(__file__).parent / "data" / "criteo_kaggle_head1000.txt"
    res = CliRunner().invoke(main, ["report", str(tmp_path / "mine.pt"), str(path), "--data", str(data)])
    assert res.exit_code == 1 and "has no model for fpd-convert to score, so --data cannot give an AUC" in res.output


def test_save_writes_a_fine_tuned_own_model_that_load_into_inspect_and_decompress_read(tmp_path):
    """compress -> load_into -> your training -> save -> load_into / decompress: the loop for your own model."""
    from fpd_convert.convert.importance import FidelityOptions
    from fpd_convert.outputs import OutputError
    from fpd_convert.tt.core_quant import decode, encode
    torch.manual_seed(0)
    torch.save(Mine().state_dict(), tmp_path / "mine.pt")
    fpd_convert.compress(tmp_path / "mine.pt", tmp_path / "mine.tt.safetensors", rank=4, progress=False,
                         fidelity=FidelityOptions(core_dtype="int8", exact_fraction=0.01))
    mine = fpd_convert.load_into(Mine(), tmp_path / "mine.tt.safetensors")
    opt = torch.optim.Adam(mine.parameters(), lr=0.05)
    for step in range(3):  # fine-tuned: the cores leave the int8 grid
        opt.zero_grad()
        mine(*_inputs(step)).square().sum().backward()
        opt.step()
    exact = fpd_convert.save(mine, tmp_path / "exact.safetensors", core_dtype="float32")
    again = fpd_convert.save(mine, tmp_path / "again.safetensors")  # as the file said: int8 cores
    args = _inputs(7)
    back = fpd_convert.load_into(Mine(), exact).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(*args), mine.eval()(*args), atol=0, rtol=0)
        int8 = fpd_convert.load_into(Mine(), again)
        for j, core in enumerate(mine.user_emb.cores):  # quantized again, exactly as compress quantizes
            assert not torch.equal(core, int8.user_emb.cores[j])
            torch.testing.assert_close(int8.user_emb.cores[j], decode(*encode(core, "int8", axis=1), axis=1))
    info = {t["key"]: t for t in fpd_convert.inspect(again)["tables"]}
    assert info["user_emb.weight"]["kind"] == "tt" and info["user_emb.weight"]["core_dtype"] == "int8"
    assert info["user_emb.weight"]["exact_rows"] > 0 and info["towers.item_emb.weight"]["kind"] == "tt"
    assert fpd_convert.inspect(exact)["tables"][0]["core_dtype"] == "float32"
    fpd_convert.decompress(exact, tmp_path / "dense.pt")  # a dense state_dict of the class itself
    dense = Mine()
    dense.load_state_dict(torch.load(tmp_path / "dense.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(*args), back(*args), atol=1e-5, rtol=1e-5)
    before = exact.read_bytes()
    with pytest.raises(OutputError, match="exists"):
        fpd_convert.save(mine, exact)
    assert exact.read_bytes() == before
    with pytest.raises(ValueError, match="holds no TT layer"):
        fpd_convert.save(Mine(), tmp_path / "none.safetensors")
    assert not (tmp_path / "none.safetensors").exists()
    live, summary = fpd_convert.compress_module(Mine(), rank=4, importance="norm")  # in memory, then saved
    fpd_convert.save(live, tmp_path / "live.safetensors")
    errors = {t["key"]: t["relative_error"] for t in fpd_convert.inspect(tmp_path / "live.safetensors")["tables"]
              if t["kind"] == "tt"}
    assert errors == {f"{t.name}.weight": t.relative_error for t in summary.tables}
