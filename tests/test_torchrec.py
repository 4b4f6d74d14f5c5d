"""TorchRec-native: TT tables in an EmbeddingBagCollection that TorchRec's DLRM models, KeyedJaggedTensors
and DistributedModelParallel take as they are (skipped where torchrec is not installed)."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

torchrec = pytest.importorskip("torchrec")
from torchrec.models.dlrm import DLRM, DLRM_DCN  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

import fpd_convert  # noqa: E402
import fpd_convert.torchrec as ftr  # noqa: E402
from fpd_convert.convert.importance import FidelityOptions  # noqa: E402
from layouts import torchrec_state  # noqa: E402
from two_tower import TwoTower, two_tower_batch  # noqa: E402

warnings.filterwarnings("ignore")
ROWS = [5000, 3000, 40, 2000, 30]
ATOL = 1e-5


def _configs(pooling=PoolingType.SUM):
    out = [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f_{i}"],
                              pooling=pooling) for i, n in enumerate(ROWS)]
    out[3].feature_names = ["f_3", "f_3b"]  # one table, two features
    return out


def _spec(configs):
    """What a config says (its init_fn, a partial, compares by identity)."""
    return [(c.name, c.num_embeddings, c.embedding_dim, list(c.feature_names), c.pooling) for c in configs]


def _kjt(configs, b, seed, weighted, empty=True):
    g = torch.Generator().manual_seed(seed)
    keys = [f for c in configs for f in c.feature_names]
    rows = {f: c.num_embeddings for c in configs for f in c.feature_names}
    lengths = torch.randint(0 if empty else 1, 4, (len(keys) * b,), generator=g)  # empty bags included
    values = torch.cat([torch.randint(0, rows[k], (int(lengths[i * b:(i + 1) * b].sum()),), generator=g)
                        for i, k in enumerate(keys)])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=weights)


def _trained(cls, weighted, pooling=PoolingType.SUM, **kw):
    """A TorchRec model trained five steps by TorchRec code (its EBC, KJTs, an optimizer)."""
    torch.manual_seed(0)
    configs = _configs(pooling)
    model = cls(embedding_bag_collection=EmbeddingBagCollection(configs, is_weighted=weighted), dense_in_features=13,
                dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1], **kw)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        dense, labels = torch.rand(32, 13, generator=g), (torch.rand(32, generator=g) < 0.3).float()
        out = model(dense, _kjt(configs, 32, step, weighted)).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, configs


def _reference(model, tt_model, cls, configs, weighted, **kw):
    """The TorchRec model whose compressed tables hold their TT reconstructions, as dense tables."""
    ref = cls(embedding_bag_collection=EmbeddingBagCollection(configs, is_weighted=weighted), dense_in_features=13,
              dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1], **kw)
    state = model.state_dict()
    for name, layer in tt_model.sparse_arch.embedding_bag_collection.tt_tables().items():
        state[f"sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"] = layer.to_dense()
    ref.load_state_dict(state)
    return ref.eval()


@pytest.mark.parametrize("cls,kw", [(DLRM, {}), (DLRM_DCN, {"dcn_num_layers": 2, "dcn_low_rank_dim": 4})],
                         ids=["DLRM", "DLRM_DCN"])
@pytest.mark.parametrize("weighted,pooling", [(True, PoolingType.SUM), (False, PoolingType.MEAN)],
                         ids=["weighted-sum", "unweighted-mean"])
def test_compress_module_equals_torchrec_with_the_tt_reconstructions(cls, kw, weighted, pooling):
    model, configs = _trained(cls, weighted, pooling, **kw)
    tt_model, summary = ftr.compress_module(model, rank=4, num_largest=2, importance="norm", exact_rows=0.01)
    ebc = tt_model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, ftr.TTEmbeddingBagCollection) and isinstance(tt_model, cls)
    assert sorted(ebc.tt_tables()) == ["t_0", "t_1"] and [t.name for t in summary.tables] == ["t_0", "t_1"]
    assert _spec(ebc.embedding_bag_configs()) == _spec(configs) and ebc.is_weighted() == weighted
    assert all(layer.exact_ids is not None for layer in ebc.tt_tables().values())
    assert model.sparse_arch.embedding_bag_collection is not ebc  # a copy: the input model is untouched
    ref = _reference(model, tt_model, cls, configs, weighted, **kw)
    dense = torch.rand(24, 13)
    features = _kjt(configs, 24, 99, weighted)
    with torch.no_grad():
        got, want = tt_model.eval()(dense, features), ref(dense, features)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
        assert not torch.allclose(got, model.eval()(dense, features), atol=1e-4)  # the TT is not the original


def test_a_tt_collection_keeps_torchrec_semantics_for_shared_features_and_empty_bags():
    configs = [EmbeddingBagConfig(name="big", embedding_dim=4, num_embeddings=3000, feature_names=["a", "shared"]),
               EmbeddingBagConfig(name="small", embedding_dim=4, num_embeddings=20, feature_names=["shared"])]
    ebc = EmbeddingBagCollection(configs)
    tt_ebc, _ = ftr.compress_module(ebc, rank=3, num_largest=1, importance="none")
    assert isinstance(tt_ebc, ftr.TTEmbeddingBagCollection)
    features = KeyedJaggedTensor.from_lengths_sync(keys=["a", "shared"], values=torch.tensor([5, 2999, 7, 3]),
                                                   lengths=torch.tensor([2, 0, 0, 2]))
    got = tt_ebc(features)
    assert got.keys() == ebc(features).keys() == ["a", "shared@big", "shared@small"]
    dense = EmbeddingBagCollection(configs)
    dense.load_state_dict({"embedding_bags.big.weight": tt_ebc.tt_tables()["big"].to_dense(),
                           "embedding_bags.small.weight": ebc.embedding_bags["small"].weight.detach()})
    torch.testing.assert_close(got.values(), dense(features).values(), atol=ATOL, rtol=ATOL)
    values = got.values()  # empty bags: "a" of sample 1, "shared" of sample 0 (both tables' outputs)
    assert values[1, :4].abs().sum() == 0 and values[0, 4:].abs().sum() == 0 and values[1, 4:].abs().sum() > 0
    assert sorted(tt_ebc.state_dict()) == ["embedding_bags.big.cores.0", "embedding_bags.big.cores.1",
                                           "embedding_bags.big.cores.2", "embedding_bags.small.weight"]


def _jagged_equal(got, want, atol=ATOL):
    """Two ``Dict[str, JaggedTensor]``: the same names in the same order, lengths, weights and values."""
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name].lengths(), want[name].lengths()), name
        w_got, w_want = got[name].weights_or_none(), want[name].weights_or_none()
        assert (w_got is None) == (w_want is None) and (w_got is None or torch.equal(w_got, w_want)), name
        torch.testing.assert_close(got[name].values(), want[name].values(), atol=atol, rtol=atol)


def test_a_tt_embedding_collection_keeps_torchrec_semantics():
    """An EmbeddingCollection (unpooled, a sequence model's): shared features, ``feature@table`` names, the ids
    passed on with ``need_indices``, empty bags, TorchRec's state_dict keys."""
    torch.manual_seed(0)
    configs = [EmbeddingConfig(name="big", embedding_dim=4, num_embeddings=3000, feature_names=["a", "shared"]),
               EmbeddingConfig(name="small", embedding_dim=4, num_embeddings=20, feature_names=["shared"])]
    ec = EmbeddingCollection(configs, need_indices=True)
    tt_ec, _ = ftr.compress_module(ec, rank=3, num_largest=1, importance="none")
    assert isinstance(tt_ec, ftr.TTEmbeddingCollection) and isinstance(tt_ec.tt_tables()["big"], fpd_convert.TTEmbedding)
    assert tt_ec.need_indices() and tt_ec.embedding_dim() == 4
    assert tt_ec.embedding_names_by_table() == ec.embedding_names_by_table() == [["a", "shared@big"], ["shared@small"]]
    features = KeyedJaggedTensor.from_lengths_sync(keys=["a", "shared"], values=torch.tensor([5, 2999, 7, 3, 11]),
                                                   lengths=torch.tensor([2, 0, 0, 3]))  # empty bags
    dense = EmbeddingCollection(configs, need_indices=True)
    dense.load_state_dict({"embeddings.big.weight": tt_ec.tt_tables()["big"].to_dense(),
                           "embeddings.small.weight": ec.embeddings["small"].weight.detach()})
    got = tt_ec(features)
    _jagged_equal(got, dense(features))
    assert not torch.allclose(got["a"].values(), ec(features)["a"].values(), atol=1e-3)  # the TT, not the original
    assert sorted(tt_ec.state_dict()) == ["embeddings.big.cores.0", "embeddings.big.cores.1",
                                          "embeddings.big.cores.2", "embeddings.small.weight"]
    again, _ = ftr.compress_module(EmbeddingCollection(configs, need_indices=True), rank=3, num_largest=1,
                                   importance="none")
    again.load_state_dict(tt_ec.state_dict())  # TorchRec's keys in, too
    _jagged_equal(again(features), got, atol=0)
    with pytest.raises(ValueError, match="one dim"):
        ftr.TTEmbeddingCollection([configs[0], EmbeddingConfig(name="x", embedding_dim=8, num_embeddings=5)], {})


def test_compress_module_of_a_model_with_both_collections_and_tt_collections_of_a_loaded_one(tmp_path):
    torch.manual_seed(0)
    model = TwoTower()
    tt_model, summaries = ftr.compress_module(model, rank=4, num_largest=1, importance="none")
    assert isinstance(tt_model.history, ftr.TTEmbeddingCollection)
    assert isinstance(tt_model.profile, ftr.TTEmbeddingBagCollection)
    assert [[t.name for t in s.tables] for s in summaries] == [["item"], ["users"]]
    only, summary = ftr.compress_module(model, rank=4, tables=["users"], importance="none")  # the other one stays
    assert type(only.history) is EmbeddingCollection and [t.name for t in summary.tables] == ["users"]
    assert isinstance(only.profile, ftr.TTEmbeddingBagCollection)
    with pytest.raises(ValueError, match="no table named 'nope' in the collections of TwoTower; their tables: item"):
        ftr.compress_module(model, rank=4, tables=["users", "nope"])
    big, _ = ftr.compress_module(model, rank=4, min_rows=3000, importance="none")  # only the EC has such a table
    assert isinstance(big.history, ftr.TTEmbeddingCollection) and type(big.profile) is EmbeddingBagCollection
    with pytest.raises(ValueError, match="no table matches the selection"):
        ftr.compress_module(model, rank=4, min_rows=10_000)
    ref = TwoTower()  # TorchRec's own collections holding the TT reconstructions
    state = dict(model.state_dict())
    state["history.embeddings.item.weight"] = tt_model.history.tt_tables()["item"].to_dense()
    state["profile.embedding_bags.users.weight"] = tt_model.profile.tt_tables()["users"].to_dense()
    ref.load_state_dict(state)
    seq, user = two_tower_batch(16, 5)
    with torch.no_grad():
        got = tt_model(seq, user)
        torch.testing.assert_close(got, ref(seq, user), atol=ATOL, rtol=ATOL)
    fpd_convert.save(tt_model, tmp_path / "saved.safetensors")  # a live model written, and loaded into the class
    with torch.no_grad():
        saved = fpd_convert.load_into(TwoTower(), tmp_path / "saved.safetensors")
        torch.testing.assert_close(saved(seq, user), got, atol=0, rtol=0)
    # the same model from a file: fpd-convert compress of its state_dict, load_into TorchRec's own collections,
    # then tt_collections (what distribute does first) gives the TT collections, same keys, same scores
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fpd_convert.compress(tmp_path / "m.pt", tmp_path / "m.tt.safetensors", rank=4, num_largest=2,
                         fidelity=FidelityOptions("none"), progress=False)
    mine = fpd_convert.load_into(TwoTower(), tmp_path / "m.tt.safetensors")
    assert type(mine.history) is EmbeddingCollection and isinstance(mine.history.embeddings["item"],
                                                                     fpd_convert.TTEmbedding)
    keys = sorted(mine.state_dict())
    with torch.no_grad():
        want = mine(seq, user)
        ftr.tt_collections(mine)
        assert isinstance(mine.history, ftr.TTEmbeddingCollection) and sorted(mine.history.tt_tables()) == ["item"]
        assert isinstance(mine.profile, ftr.TTEmbeddingBagCollection) and sorted(mine.state_dict()) == keys
        torch.testing.assert_close(mine(seq, user), want, atol=0, rtol=0)


def test_your_models_dcp_app_state_compresses_and_loads_into_your_class(tmp_path):
    """A sequence model saved as TorchRec training saves it (``dcp.save({"model": ..., "epoch": ...})``): its
    keys carry the app state's ``model.``, which load_into fits to the bare class."""
    import torch.distributed.checkpoint as dcp
    torch.manual_seed(0)
    model = TwoTower()
    dcp.save({"model": model.state_dict(), "epoch": 2}, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    summary = fpd_convert.compress(tmp_path / "ckpt", tmp_path / "c.safetensors", rank=4, num_largest=2,
                                   progress=False)
    assert [t.key for t in summary.tables] == ["model.history.embeddings.item.weight",
                                               "model.profile.embedding_bags.users.weight"]
    mine = fpd_convert.load_into(TwoTower(), tmp_path / "c.safetensors").eval()
    ref = TwoTower().eval()
    ref.load_state_dict({**model.state_dict(),
                         "history.embeddings.item.weight": mine.history.embeddings["item"].to_dense(),
                         "profile.embedding_bags.users.weight": mine.profile.embedding_bags["users"].to_dense()})
    seq, user = two_tower_batch(12, 2)
    with torch.no_grad():
        torch.testing.assert_close(mine(seq, user), ref(seq, user), atol=ATOL, rtol=ATOL)


def test_torch_compile_fullgraph_of_both_tt_collections_equals_eager():
    """KJTs in, JaggedTensors and KeyedTensors out, TT lookups inside: one graph, in training (the same
    gradients) and in eval mode (the serving form)."""
    torch.manual_seed(0)
    tt_model, _ = ftr.compress_module(TwoTower(), rank=4, num_largest=1, importance="none", exact_rows=0.01)
    seq, user = two_tower_batch(16, 5)
    compiled = torch.compile(tt_model, fullgraph=True)
    grads = []
    for run in (tt_model, compiled):
        tt_model.zero_grad()
        run(seq, user).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in tt_model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(".cores." in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=ATOL, rtol=ATOL, msg=n)
    tt_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(seq, user), tt_model(seq, user), atol=ATOL, rtol=ATOL)


def test_save_and_load_round_trip_keeps_keys_configs_and_scores(tmp_path):
    model, configs = _trained(DLRM, True)
    tt_model, _ = ftr.compress_module(model, rank=4, num_largest=2)
    ftr.save(tt_model, tmp_path / "m.safetensors")
    back = ftr.load(tmp_path / "m.safetensors")
    assert type(back) is DLRM and sorted(back.state_dict()) == sorted(tt_model.state_dict())
    assert _spec(back.sparse_arch.embedding_bag_collection.embedding_bag_configs()) == _spec(configs)
    dense, features = torch.rand(10, 13), _kjt(configs, 10, 7, True)
    with torch.no_grad():
        torch.testing.assert_close(back(dense, features), tt_model.eval()(dense, features), atol=0, rtol=0)
    info = fpd_convert.inspect(tmp_path / "m.safetensors")
    assert info["layout"] == "torchrec" and {t["key"].split(".")[-2] for t in info["tables"] if t["kind"] == "tt"} \
        == {"t_0", "t_1"}
    with pytest.raises(fpd_convert.checkpoints.CheckpointError, match="fpd_convert.torchrec.load"):
        fpd_convert.load(tmp_path / "m.safetensors")  # t_3 reads two features: our own model class cannot


@pytest.mark.parametrize("variant", ["dot", "dcn", "projection"])
def test_load_of_a_compress_output_scores_as_fpd_convert_load(tmp_path, variant):
    state = torchrec_state(variant=variant)
    torch.save(state, tmp_path / "m.pt")
    fpd_convert.compress(tmp_path / "m.pt", tmp_path / "c.safetensors", rank=4, num_largest=2, progress=False)
    ours, theirs = fpd_convert.load(tmp_path / "c.safetensors"), ftr.load(tmp_path / "c.safetensors")
    assert type(theirs).__module__ == "torchrec.models.dlrm"
    names = [c.feature_names[0] for c in theirs.sparse_arch.embedding_bag_collection.embedding_bag_configs()]
    g = torch.Generator().manual_seed(3)
    dense = torch.rand(12, 13, generator=g)
    ids = torch.stack([torch.randint(0, n, (12,), generator=g) for n in [3000, 50, 1200, 7, 400]], 1)
    with torch.no_grad():
        torch.testing.assert_close(theirs(dense, ftr.to_kjt(ids, names)), ours(dense, ids), atol=ATOL, rtol=ATOL)


@pytest.mark.slow
def test_a_training_step_under_dmp_equals_one_process_for_dlrm_and_a_sequence_model(tmp_path):
    script = Path(__file__).parent / "torchrec_dmp_step.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path / "out.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["tt"] == ["t_0", "t_1"]  # replicated, the rest sharded by TorchRec's planner:
    assert set(out["plan"]) == {"t_2", "t_3", "t_4"}
    moved = [k for k, d in out["diffs"].items() if d["moved"] > 0]
    assert any(".cores." in k for k in moved) and any("t_3.weight" in k for k in moved)  # the step trained both
    for k, d in out["diffs"].items():
        assert d["diff"] <= 1e-6 + 1e-4 * d["moved"], (k, d)
    # a sequence model of your own (an EmbeddingCollection and an EBC; TT layers inside TorchRec's collections,
    # as fpd_convert.compress_module / load_into leave them): TT tables replicated, the others sharded
    seq = out["two_tower"]
    assert seq["tt"] == ["item", "users"] and seq["plan"] == ["ages", "shops"]
    moved = [k for k, d in seq["diffs"].items() if d["moved"] > 0]
    assert {"history.embeddings.item.cores.2", "history.embeddings.shops.weight"} <= set(moved)
    for k, d in seq["diffs"].items():
        assert d["diff"] <= 1e-6 + 1e-4 * d["moved"], (k, d)


def _finetune_files(tmp_path):
    from fpd_convert.data.synth import synth
    rows = [3000, 50, 1200, 7, 400] + [20] * 21
    torch.save(torchrec_state(rows=rows), tmp_path / "m.pt")
    fpd_convert.compress(tmp_path / "m.pt", tmp_path / "c.safetensors", rank=4, num_largest=2, progress=False)
    synth(tmp_path / "train.npz", 1500, seed=0, table_rows=rows)
    synth(tmp_path / "val.npz", 400, seed=1, table_rows=rows)
    return ["finetune", str(tmp_path / "c.safetensors"), "--train", str(tmp_path / "train.npz"), "--val",
            str(tmp_path / "val.npz"), "--max-steps", "6", "--batch-size", "64"]


def _tensors(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_finetune_as_a_torchrec_model_equals_our_own_model_class(tmp_path):
    from click.testing import CliRunner
    from fpd_convert.cli import main
    args = _finetune_files(tmp_path)
    for name, extra in (("ours", []), ("torchrec", ["--torchrec"])):
        r = CliRunner().invoke(main, args + ["-o", str(tmp_path / f"{name}.safetensors")] + extra)
        assert r.exit_code == 0, r.output
    a, b = _tensors(tmp_path / "ours.safetensors"), _tensors(tmp_path / "torchrec.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.slow
def test_finetune_under_torchrun_with_dmp_equals_one_process(tmp_path):
    args = _finetune_files(tmp_path) + ["--torchrec"]
    one = subprocess.run([sys.executable, "-m", "fpd_convert", *args, "-o", str(tmp_path / "one.safetensors")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fpd_convert",
                          *args, "-o", str(tmp_path / "two.safetensors")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # one report, rank 0's
    a, b = _tensors(tmp_path / "one.safetensors"), _tensors(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # float32 sums split over two processes: rounding only
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def _train_steps(model, configs, opt, steps: int = 5):
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        dense, labels = torch.rand(64, 13, generator=g), (torch.rand(64, generator=g) < 0.3).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, _kjt(configs, 64, step, False))
                                                                    .squeeze(1), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_torchrec_keyed_optimizer_state_gives_importance_without_data(tmp_path):
    # TorchRec code trains the model with a KeyedOptimizer; its state_dict, saved apart, pairs with the
    # tables by name and gives compress the optimizer's importance (as a dlrm checkpoint's own state does)
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from fpd_convert.checkpoints import CheckpointError
    from fpd_convert.checkpoints.source import read_optimizer_state, read_source
    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f_{i}"])
               for i, n in enumerate(ROWS)]  # one feature a table: the layout compress reads
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(configs), dense_in_features=13,
                 dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    opt = KeyedOptimizerWrapper(dict(model.named_parameters()), lambda p: torch.optim.Adagrad(p, lr=0.05))
    _train_steps(model, configs, opt)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    src = read_source(tmp_path / "model.pt")
    acc = read_optimizer_state(tmp_path / "opt.pt", src)
    key = "sparse_arch.embedding_bag_collection.embedding_bags.t_0.weight"
    want = opt.state_dict()["state"][key]["sum"]
    assert key in acc and torch.equal(acc[key], want)
    s = fpd_convert.compress(tmp_path / "model.pt", tmp_path / "c.safetensors", ratio=10, num_largest=2,
                             optimizer_state=tmp_path / "opt.pt", progress=False)
    assert {t.importance for t in s.tables} == {"optimizer"}
    s = fpd_convert.compress(tmp_path / "model.pt", tmp_path / "n.safetensors", ratio=10, num_largest=2,
                             progress=False)
    assert {t.importance for t in s.tables} == {"norm"}  # without it: the weights alone
    torch.save({"state": {"some.other.weight": {"sum": torch.ones(3, 3)}}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="holds no squared-gradient accumulator"):
        read_optimizer_state(tmp_path / "other.pt", src)
    with pytest.raises(CheckpointError, match="not an optimizer state_dict"):
        read_optimizer_state(tmp_path / "model.pt", src)


def test_a_fused_collections_optimizer_state_gives_importance_without_data(tmp_path):
    # TorchRec's fused EmbeddingBagCollection (FBGEMM's table-batched kernel on the CPU) updates its tables in
    # the backward with row-wise Adagrad: one accumulator value a row, under the collection's own names
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
    from torchrec.optim import RowWiseAdagrad
    from fpd_convert.checkpoints import CheckpointError
    from fpd_convert.checkpoints.source import read_optimizer_state, read_source
    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f_{i}"])
               for i, n in enumerate(ROWS)]
    ebc = FusedEmbeddingBagCollection(tables=configs, optimizer_type=RowWiseAdagrad, optimizer_kwargs={"lr": 0.05},
                                      device=torch.device("cpu"))
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[16, 8],
                 over_arch_layer_sizes=[16, 1])
    _train_steps(model, configs, torch.optim.SGD([p for n, p in model.named_parameters()
                                                  if "embedding_bags" not in n], lr=0.1))  # the tables: in backward
    state = ebc.fused_optimizer().state_dict()
    assert set(state["state"]) == {f"t_{i}.weight" for i in range(len(ROWS))}
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(state, tmp_path / "opt.pt")
    src = read_source(tmp_path / "model.pt")
    acc = read_optimizer_state(tmp_path / "opt.pt", src)
    key = "sparse_arch.embedding_bag_collection.embedding_bags.t_0.weight"
    mean_sq = state["state"]["t_0.weight"]["t_0.weight.momentum_1"]
    assert mean_sq.shape == (ROWS[0],) and float(mean_sq.sum()) > 0
    torch.testing.assert_close(acc[key], mean_sq.reshape(-1, 1) * 8)  # the row's sum of squares
    s = fpd_convert.compress(tmp_path / "model.pt", tmp_path / "c.safetensors", ratio=10, num_largest=2,
                             optimizer_state=tmp_path / "opt.pt", progress=False)
    assert {t.importance for t in s.tables} == {"optimizer"}
    momentum = {"state": {"t_0.weight": {"t_0.weight.momentum_1": -mean_sq}}}  # not a sum of squares
    torch.save(momentum, tmp_path / "momentum.pt")
    with pytest.raises(CheckpointError, match="holds no squared-gradient accumulator"):
        read_optimizer_state(tmp_path / "momentum.pt", src)


def test_a_dcp_checkpoint_of_a_dmp_sharded_model_compresses_as_its_state_dict(tmp_path, monkeypatch):
    """The folder TorchRec users save a sharded model to (torch.distributed.checkpoint), read whole in one
    process: the same tensors, the same compressed file as from a .pt of the state_dict."""
    import os
    import pickle
    import shutil
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from fpd_convert.checkpoints import CheckpointError, read_source
    from fpd_convert.cli import main
    ckpt = tmp_path / "ckpt"
    script = Path(__file__).parent / "torchrec_dcp_save.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(ckpt), str(Path(__file__).parent)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # two ranks
    want = torchrec_state(seed=0)
    src = read_source(ckpt)
    assert (src.layout, src.container, src.prefix) == ("torchrec", "dcp", "model.")
    assert src.dropped == ["epoch (not a tensor)"] and set(src.state) == set(want)
    for k, v in want.items():  # the shards put together, exactly
        assert torch.equal(src.state[k], v), k
    torch.save({"model." + k: v for k, v in want.items()}, tmp_path / "same.pt")
    args = ["--rank", "4", "--tables", "t_cat_0,t_cat_2", "--threads", "1"]
    r = CliRunner().invoke(main, ["compress", str(ckpt), *args])
    assert r.exit_code == 0, r.output
    assert "not carried over: epoch (not a tensor)" in r.output
    assert CliRunner().invoke(main, ["compress", str(tmp_path / "same.pt"), *args]).exit_code == 0
    a, b = load_file(tmp_path / "ckpt.tt.safetensors"), load_file(tmp_path / "same.tt.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the big tensors (here: all) read one at a time into file mappings of their own, not into memory
    from fpd_convert.checkpoints import dcp_folder
    from fpd_convert.checkpoints.lazy_tables import file_mapping_of
    monkeypatch.setattr(dcp_folder, "SPILL_AT_LEAST", 1)
    on_disk = dcp_folder._filesystem(tmp_path) not in dcp_folder._RAM_FILESYSTEMS  # else: nowhere to spill
    spilled = read_source(ckpt)
    assert all(("fpd-dcp-" in (file_mapping_of(v) or "")) == on_disk for v in spilled.state.values())
    assert all(torch.equal(spilled.state[k], v) for k, v in want.items())
    r = CliRunner().invoke(main, ["compress", str(ckpt), *args, "-o", str(tmp_path / "spilled.tt.safetensors")])
    assert r.exit_code == 0, r.output
    assert not on_disk or f"read {len(want)}/{len(want)} " in r.output  # a line per tensor read, as it goes
    c = load_file(tmp_path / "spilled.tt.safetensors")
    assert c.keys() == b.keys() and all(torch.equal(c[k], b[k]) for k in c)
    if on_disk and dcp_folder._filesystem(Path("/dev/shm")) == "tmpfs":  # RAM-backed: not a disk
        assert dcp_folder.spill_dir(["/dev/shm", tmp_path], 1 << 20) == tmp_path
    assert dcp_folder.spill_dir([tmp_path], 1 << 60) is None  # no room: read into memory
    monkeypatch.undo()
    r = CliRunner().invoke(main, ["report", str(ckpt), str(tmp_path / "ckpt.tt.safetensors"), "--json"])
    assert r.exit_code == 0, r.output  # paired by the folder's digest
    assert json.loads(r.stdout)["models"]["original"]["on_disk"] == sum(p.stat().st_size for p in ckpt.iterdir())
    r = CliRunner().invoke(main, ["report", str(tmp_path / "same.pt"), str(tmp_path / "ckpt.tt.safetensors")])
    assert r.exit_code == 1 and "was made from ckpt" in r.output
    r = CliRunner().invoke(main, ["decompress", str(tmp_path / "ckpt.tt.safetensors")])
    assert r.exit_code == 0 and "wrote" in r.output and "(state_dict," in r.output
    dense = torch.load(tmp_path / "ckpt.dense.pt", weights_only=True)
    assert set(dense) == {"model." + k for k in want}
    # a .metadata that asks for more than DCP's classes is refused by name; a missing shard file is said
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    (bad / ".metadata").write_bytes(pickle.dumps(os.getcwd))
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert r.exit_code == 1 and "needs posix.getcwd" in r.output and "--allow-unsafe-pickle" in r.output
    (bad / ".metadata").write_bytes((ckpt / ".metadata").read_bytes()[:100])  # truncated: not a refused global
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert r.exit_code == 1 and "not a readable torch.distributed.checkpoint folder (UnpicklingError" in r.output
    shutil.rmtree(bad)
    shutil.copytree(ckpt, bad)
    (bad / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="its tensors could not be read"):
        read_source(bad)
    info = fpd_convert.inspect(bad)  # shapes from the index: no tensor is read (nor copied to disk)
    assert info["container"] == "dcp" and info["total_bytes"] == sum(v.numel() * v.element_size() for v in want.values())
    with pytest.raises(CheckpointError, match="nor a torch.distributed.checkpoint folder: it has no .metadata"):
        read_source(tmp_path)
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "ckpt.rank0.pt"), "--rank", "4"])
    assert r.exit_code == 1 and "a state_dict saved under DistributedModelParallel (ShardedTensors" in r.output
    # saved with its fused Adagrad's state after a step on the first tenth of the rows: the rows are weighed by it
    trained = read_source(tmp_path / "ckpt.adagrad")
    acc = trained.optimizer_accumulators
    assert sorted(k.split(".")[-2] for k in acc) == ["t_cat_0", "t_cat_2"]  # the tables DMP's fused Adagrad trains
    for key, a in acc.items():
        seen = (a.sum(1) > 0).nonzero().reshape(-1)
        assert 0 < seen.numel() <= 8 and int(seen.max()) <= trained.state[key].shape[0] // 10
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "ckpt.adagrad"), "--ratio", "8", "--tables",
                                  "t_cat_0,t_cat_2", "--json", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert [t["importance"] for t in json.loads(r.stdout)["tables"]] == ["optimizer", "optimizer"]
