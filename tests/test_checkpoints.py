import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fpd_convert
from conftest import needs_triton
from fpd_convert.convert.importance import FidelityOptions
from fpd_convert.checkpoints import CheckpointError, read_compressed_meta, read_source
from fpd_convert.outputs import OutputError
from fpd_convert.cli import main
from fpd_convert.models import build_model
from layouts import (ROWS, NotATensor, batch, dlrm_checkpoint, dlrm_state, ref_dlrm_forward, ref_torchrec_forward,
                     torchrec_state)

FULL = 100_000  # a rank above every unfolding: clamped to full rank, exact reconstruction


# ---------- detection, architecture, forward equal to the reference ----------

@pytest.mark.parametrize("interaction,itself,weighted,ddp", [("dot", False, False, False), ("dot", True, False, False),
                                                              ("cat", False, False, False), ("dot", False, True, True)])
def test_dlrm_layout_and_forward(tmp_path, interaction, itself, weighted, ddp):
    s = dlrm_state(interaction=interaction, itself=itself, weighted=weighted, ddp=ddp)
    path = tmp_path / "model.pt"
    torch.save(dlrm_checkpoint(s), path)
    src = read_source(path)
    a = src.architecture
    assert (src.layout, src.container, a["variant"], a["interaction_itself"], a["weighted_pooling"]) == \
        ("dlrm", "dlrm_checkpoint", interaction, itself, weighted)
    assert [t["rows"] for t in a["tables"]] == ROWS and a["bottom"] == [13, 16, 8]
    assert src.extras["test_acc"] == pytest.approx(0.7891) and src.extras["iter"] == 1024
    model = fpd_convert.load(path)
    dense, ids = batch()
    expected = ref_dlrm_forward(s, dense, ids, interaction, itself, weighted, ddp)
    torch.testing.assert_close(model(dense, ids), expected, atol=1e-5, rtol=1e-5)
    assert not model.training


@pytest.mark.parametrize("variant", ["dot", "dcn", "projection"])
@pytest.mark.parametrize("prefix", ["", "model."])
def test_torchrec_layout_and_forward(tmp_path, variant, prefix):
    s = torchrec_state(variant=variant, prefix=prefix)
    path = tmp_path / "model.pt"
    torch.save(s, path)
    src = read_source(path)
    assert (src.layout, src.prefix, src.architecture["variant"]) == ("torchrec", prefix, variant)
    assert [t["name"] for t in src.architecture["tables"]] == [f"t_cat_{i}" for i in range(5)]
    model = fpd_convert.load(path)
    dense, ids = batch()
    plain = {k[len(prefix):]: v for k, v in s.items()}
    torch.testing.assert_close(model(dense, ids), ref_torchrec_forward(plain, dense, ids, variant), atol=1e-5, rtol=1e-5)


PLAIN = FidelityOptions("none")  # plain TT-SVD, natural row order


def test_multi_hot_bags_match_per_feature_sum(tmp_path):
    s = dlrm_state()
    torch.save(dlrm_checkpoint(s), tmp_path / "m.pt")
    model = fpd_convert.load(tmp_path / "m.pt")
    dense, ids = batch(b=4)
    bags = [(ids[:, f], torch.arange(4)) for f in range(5)]
    torch.testing.assert_close(model(dense, bags), model(dense, ids))


def test_qr_and_md_tables_are_read_and_kept(tmp_path):
    s = dlrm_state(rows=[3000, 50, 1200])
    s["emb_l.1.weight_q"] = torch.randn(10, 8)
    s["emb_l.1.weight_r"] = torch.randn(5, 8)
    del s["emb_l.1.weight"]
    s["emb_l.2.embs.weight"] = torch.randn(1200, 4)
    s["emb_l.2.proj.weight"] = torch.randn(8, 4)
    del s["emb_l.2.weight"]
    torch.save(dlrm_checkpoint(s), tmp_path / "m.pt")
    kinds = [t["kind"] for t in read_source(tmp_path / "m.pt").architecture["tables"]]
    assert kinds == ["dense", "qr", "md"]
    summary = fpd_convert.compress(tmp_path / "m.pt", tmp_path / "c.safetensors", rank=4, progress=False)
    assert [t.name for t in summary.tables] == ["0"]
    assert any("qr" in k for k in summary.kept_as_is) and any("md" in k for k in summary.kept_as_is)
    tensors = load_file(tmp_path / "c.safetensors")
    torch.testing.assert_close(tensors["emb_l.1.weight_q"], s["emb_l.1.weight_q"])
    model = fpd_convert.load(tmp_path / "c.safetensors")
    dense, ids = batch(rows=[3000, 50, 1200])
    assert torch.isfinite(model(dense, ids)).all()
    # the QR table computes weight_q[i // 5] * weight_r[i % 5]
    i = torch.tensor([37])
    row = model.emb_l[1](i, torch.tensor([0]))
    torch.testing.assert_close(row[0], s["emb_l.1.weight_q"][7] * s["emb_l.1.weight_r"][2])


# ---------- compress -> load -> forward; decompress round trip; metadata ----------

def test_compress_load_forward_close_at_full_rank(tmp_path):
    s = dlrm_state()
    torch.save(dlrm_checkpoint(s), tmp_path / "m.pt")
    summary = fpd_convert.compress(tmp_path / "m.pt", tmp_path / "c.safetensors", rank=FULL, num_largest=2,
                                   progress=False, keep_larger=True)
    assert {t.key for t in summary.tables} == {"emb_l.0.weight", "emb_l.2.weight"}
    model = fpd_convert.load(tmp_path / "c.safetensors")
    assert type(model.emb_l[0]).__name__ == "TTEmbeddingBag" and type(model.emb_l[1]).__name__ == "EmbeddingBag"
    dense, ids = batch()
    torch.testing.assert_close(model(dense, ids), ref_dlrm_forward(s, dense, ids), atol=1e-4, rtol=1e-4)


def test_low_rank_compression_is_smaller_and_reports_error(tmp_path):
    s = dlrm_state(rows=[20_000, 50, 8_000], m=16)
    torch.save(dlrm_checkpoint(s), tmp_path / "m.pt")
    summary = fpd_convert.compress(tmp_path / "m.pt", tmp_path / "c.safetensors", rank=8, progress=False)
    big = summary.tables[0]
    assert big.rows == 20_000 and big.ratio > 10 and 0 < big.relative_error < 1.0
    assert summary.model_bytes_after < summary.model_bytes_before / 5
    assert all(t.bytes_after < t.bytes_before for t in summary.tables)
    assert os.path.getsize(tmp_path / "c.safetensors") < os.path.getsize(tmp_path / "m.pt") / 5


def test_compress_with_chosen_dim_factors(tmp_path):
    s = dlrm_state(rows=[20_000, 50, 8_000], m=16)
    torch.save(dlrm_checkpoint(s), tmp_path / "m.pt")
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "c.safetensors"),
                                  "--rank", "4", "--num-largest", "2", "--dim-factors", "2,2,4", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # after the plan, which goes to stderr
    assert [t["dim_factors"] for t in summary["tables"]] == [[2, 2, 4], [2, 2, 4]]
    model = fpd_convert.load(tmp_path / "c.safetensors")
    assert model.emb_l[0].tt_shape.dim_factors == [2, 2, 4]
    dense, ids = batch()
    assert torch.isfinite(model(dense, ids)).all()
    two = fpd_convert.compress(tmp_path / "m.pt", tmp_path / "c2.safetensors", rank=4, num_largest=1,
                               dim_factors=[4, 4], progress=False)  # two factors: two cores
    assert two.tables[0].dim_factors == [4, 4] and len(two.tables[0].row_factors) == 2
    for bad in ("3,3,3", "2,x"):  # not a factorization of 16; not integers: nothing written
        r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "bad.safetensors"),
                                      "--dim-factors", bad])
        assert r.exit_code != 0 and "dim" in r.output.lower(), r.output
        assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("svd_path", ["memory", "stream"])
def test_compress_with_a_fixed_suffix(tmp_path, svd_path):
    # --suffix-rows: the trailing row factors multiply to it, the first takes the rest (both TT-SVD paths)
    s = dlrm_state(rows=[20_000, 50, 8_000], m=16)
    torch.save(dlrm_checkpoint(s), tmp_path / "m.pt")
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "c.safetensors"),
                                  "--rank", "4", "--num-largest", "2", "--suffix-rows", "40", "--svd-path", svd_path,
                                  "--importance", "none", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert [t["row_factors"] for t in summary["tables"]] == [[500, 8, 5], [200, 8, 5]]
    assert all(0 < t["relative_error"] < 1 for t in summary["tables"])
    model = fpd_convert.load(tmp_path / "c.safetensors")
    assert model.emb_l[0].tt_shape.row_factors == [500, 8, 5]
    dense, ids = batch()
    with torch.no_grad():  # the CPU end table spans the 40 suffixes; its rows equal the plain contraction's
        from fpd_convert.kernels.reference import tt_rows
        table = model.emb_l[0]
        some = torch.arange(0, 20_000, 7)
        assert table.row_map is None and table._row_cache.fits(list(table.cores))
        assert torch.allclose(table.rows(some), tt_rows(list(table.cores), some), atol=1e-6)
        assert torch.isfinite(model(dense, ids)).all()
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "bad.safetensors"),
                                  "--suffix-rows", "5000"])  # more than half of the 8,000-row table
    assert r.exit_code != 0 and "suffix rows should be between 2 and" in r.output, r.output
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("layout", ["dlrm", "torchrec"])
def test_full_rank_decompress_round_trip(tmp_path, layout):
    if layout == "dlrm":
        s = dlrm_state()
        torch.save(dlrm_checkpoint(s), tmp_path / "m.pt")
    else:
        s = torchrec_state(prefix="model.")
        torch.save(s, tmp_path / "m.pt")
    fpd_convert.compress(tmp_path / "m.pt", tmp_path / "c.safetensors", rank=FULL, progress=False,
                         keep_larger=True)
    fpd_convert.decompress(tmp_path / "c.safetensors", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    state = back["state_dict"] if layout == "dlrm" else back
    assert list(state) == list(s)  # same keys, same order, same prefix
    for k in s:
        torch.testing.assert_close(state[k], s[k], atol=1e-4, rtol=1e-4)
    if layout == "dlrm":
        assert back["test_auc"] == pytest.approx(0.7654) and back["iter"] == 1024
        assert back["opt_state_dict"]["param_groups"][0]["lr"] == 0.1
        # loadable by the source model code as before: a plain nn.Module with those names
        fresh = build_model(read_source(tmp_path / "m.pt").architecture)
        fresh.load_state_dict(state, strict=True)


def test_metadata(tmp_path):
    s = dlrm_state()
    torch.save(dlrm_checkpoint(s), tmp_path / "m.pt")
    fpd_convert.compress(tmp_path / "m.pt", tmp_path / "c.safetensors", rank=4, tables=["0", "2"], progress=False,
                         fidelity=PLAIN)
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        raw = f.metadata()
        keys = set(f.keys())
    assert raw["format"] == "fpd-convert" and raw["format_version"] == "1" and raw["source_layout"] == "dlrm"
    import hashlib
    assert raw["source_sha256"] == hashlib.sha256((tmp_path / "m.pt").read_bytes()).hexdigest()
    tables = json.loads(raw["tt_tables"])
    e = tables["emb_l.0.weight"]
    assert e["num_rows"] == 3000 and e["dim"] == 8 and e["ranks"] == [1, 4, 4, 1] and e["features"] == []
    assert e["padding"] == np.prod(e["row_factors"]) - 3000
    assert {"emb_l.0.weight.tt_core.0", "emb_l.0.weight.tt_core.2", "emb_l.1.weight", "bot_l.0.weight"} <= keys
    assert "emb_l.0.weight" not in keys
    assert json.loads(raw["architecture"])["family"] == "dlrm"


def test_generic_state_dict_and_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"encoder.item_emb.weight": torch.randn(5000, 16, generator=g), "encoder.proj.weight": torch.randn(16, 16),
             "head.bias": torch.randn(3)}
    save_file(state, str(tmp_path / "m.safetensors"))
    assert read_source(tmp_path / "m.safetensors").layout == "generic"
    fpd_convert.compress(tmp_path / "m.safetensors", tmp_path / "c.safetensors", rank=FULL, num_largest=1,
                         progress=False, keep_larger=True)
    model = fpd_convert.load(tmp_path / "c.safetensors")
    torch.testing.assert_close(model.dense_state_dict()["encoder.item_emb.weight"], state["encoder.item_emb.weight"],
                               atol=1e-4, rtol=1e-4)
    fpd_convert.decompress(tmp_path / "c.safetensors", tmp_path / "back.safetensors")
    back = load_file(tmp_path / "back.safetensors")
    assert set(back) == set(state) and torch.equal(back["head.bias"], state["head.bias"])


# ---------- the CLI ----------

def test_cli_compress_inspect_decompress(tmp_path):
    torch.save(dlrm_checkpoint(dlrm_state()), tmp_path / "m.pt")
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "c.safetensors"),
                                  "--rank", "4", "--tables", "0,2"])
    assert r.exit_code == 0, r.output
    assert "total" in r.output and "rel. err" in r.output and "on disk" in r.output
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "c.safetensors"), "--json"])
    info = json.loads(r.stdout)
    assert info["compressed"] and info["layout"] == "dlrm" and info["tables"][0]["kind"] in ("tt", "dense")
    assert {t["kind"] for t in info["tables"]} == {"tt", "dense"}
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "m.pt")])
    assert r.exit_code == 0 and "dlrm dot, 5 tables of dim 8" in r.output
    r = CliRunner().invoke(main, ["decompress", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "d.pt")])
    assert r.exit_code == 0 and (tmp_path / "d.pt").exists()


def test_cli_budget_and_ratio(tmp_path):
    torch.save(dlrm_checkpoint(dlrm_state(rows=[20_000, 8_000], m=16)), tmp_path / "m.pt")
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "b.safetensors"),
                                  "--budget", "40KB", "--importance", "none", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["tables_bytes_after"] <= 40_000
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "r.safetensors"),
                                  "--ratio", "20", "--importance", "none", "--json"])
    assert all(t["ratio"] >= 20 for t in json.loads(r.stdout)["tables"])


def test_generic_default_takes_the_tensors_named_as_tables_not_an_mlp_weight(tmp_path):
    from fpd_convert.checkpoints.source import named_as_table
    assert all(map(named_as_table, ["emb_l.0.weight", "user_emb.weight", "model.item_embeddings.weight",
                                    "sparse.ebc.embedding_bags.t0.weight", "tables.3", "ItemEmbedding.weight"]))
    assert not any(map(named_as_table, ["mlp.0.weight", "member.weight", "top_l.2.weight", "stable.weight"]))
    torch.manual_seed(0)
    save_file({"user_emb.weight": torch.randn(3000, 8), "mlp.0.weight": torch.randn(400, 96)}, str(tmp_path / "m.safetensors"))
    args = ["compress", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "c.safetensors"), "--rank", "2"]
    r = CliRunner().invoke(main, args)  # the prompt names what it would take and what it leaves
    assert r.exit_code != 0 and "user_emb.weight (not mlp.0.weight)" in r.output, r.output
    r = CliRunner().invoke(main, args + ["--yes", "--json"])
    assert r.exit_code == 0, r.output
    assert [t["key"] for t in json.loads(r.stdout)["tables"]] == ["user_emb.weight"]
    save_file({"a": torch.randn(3000, 8), "b": torch.randn(400, 96)}, str(tmp_path / "plain.safetensors"))
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "plain.safetensors"), "-o", str(tmp_path / "p.safetensors"),
                                  "--rank", "2", "--yes", "--json"])  # no key names a table: the largest 2D tensors
    assert r.exit_code == 0 and {t["key"] for t in json.loads(r.stdout)["tables"]} == {"a", "b"}, r.output


def test_cli_generic_asks_for_confirmation(tmp_path):
    save_file({"emb.weight": torch.randn(3000, 8)}, str(tmp_path / "m.safetensors"))
    args = ["compress", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "c.safetensors"), "--rank", "2"]
    r = CliRunner().invoke(main, args, input="n\n")
    assert r.exit_code != 0 and not (tmp_path / "c.safetensors").exists()
    r = CliRunner().invoke(main, args + ["--yes"])
    assert r.exit_code == 0, r.output


# ---------- bad input: clear message, non-zero exit, nothing written ----------

def _compress_cli(tmp_path, src, *extra):
    out = tmp_path / "out.safetensors"
    r = CliRunner().invoke(main, ["compress", str(src), "-o", str(out), "--rank", "4", *extra])
    return r, out


def test_truncated_and_random_bytes(tmp_path):
    torch.save(dlrm_checkpoint(dlrm_state()), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "rand.pt").write_bytes(os.urandom(4096))
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("trunc.pt", "rand.pt", "empty.pt", "missing.pt"):
        r, out = _compress_cli(tmp_path, tmp_path / name)
        assert r.exit_code == 1 and "Error:" in r.output and "Traceback" not in r.output, (name, r.output)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp file left
    (tmp_path / "rand.safetensors").write_bytes(os.urandom(4096))
    r, _ = _compress_cli(tmp_path, tmp_path / "rand.safetensors")
    assert r.exit_code == 1 and "safetensors" in r.output


def test_a_checkpoint_given_where_a_compressed_file_goes_is_named_for_what_it_is(tmp_path):
    torch.save(dlrm_checkpoint(dlrm_state()), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"looks like a zip archive \(a PyTorch checkpoint or a numpy .npz\), "
                                              r"not a compressed .safetensors file"):
        read_compressed_meta(tmp_path / "m.pt")
    (tmp_path / "a.npy").write_bytes(b"\x93NUMPY" + os.urandom(100))
    with pytest.raises(CheckpointError, match="looks like a numpy .npy array"):
        read_compressed_meta(tmp_path / "a.npy")
    (tmp_path / "rand.safetensors").write_bytes(b"\x07" + os.urandom(4095))  # no known first bytes
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as caught:
        read_compressed_meta(tmp_path / "rand.safetensors")
    assert "looks like" not in str(caught.value)  # nothing to guess from


def test_inputs_that_are_not_regular_files_say_what_they_are(tmp_path):
    from fpd_convert.data import load_arrays
    for suffix in (".pt", ".npz"):
        os.mkfifo(tmp_path / f"pipe{suffix}")
        (tmp_path / f"dir{suffix}").mkdir()
    cases = (("pipe", "not a regular file"), ("missing", "no such file"), ("dir", "a directory, not a file"))
    for name, reason in cases:
        with pytest.raises(CheckpointError, match=reason):
            read_source(tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=reason):
            read_compressed_meta(tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=reason):  # data: DataError
            load_arrays(tmp_path / f"{name}.npz")


def test_unsafe_pickle_needs_opt_in(tmp_path):
    obj = dlrm_checkpoint(dlrm_state())
    obj["extra"] = NotATensor()  # an arbitrary class: unpickling it could run code
    torch.save(obj, tmp_path / "m.pt")
    r, out = _compress_cli(tmp_path, tmp_path / "m.pt")
    assert r.exit_code == 1 and "--allow-unsafe-pickle" in r.output and not out.exists()
    r, out = _compress_cli(tmp_path, tmp_path / "m.pt", "--allow-unsafe-pickle")
    assert r.exit_code == 0, r.output


def test_numpy_scalars_load_by_default_and_nothing_broader(tmp_path):
    torch.save(dlrm_checkpoint(dlrm_state()), tmp_path / "m.pt")
    src = read_source(tmp_path / "m.pt")  # numpy.float64 / float32 scalars: allowed
    assert isinstance(src.extras["train_loss"], float)
    torch.save({"state_dict": dlrm_state(), "arr": np.zeros(3)}, tmp_path / "arr.pt")  # a numpy array: refused
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        read_source(tmp_path / "arr.pt")


def test_wrong_layout_missing_keys_unknown_tables(tmp_path):
    s = dlrm_state()
    torch.save(s, tmp_path / "m.pt")
    r, _ = _compress_cli(tmp_path, tmp_path / "m.pt", "--layout", "torchrec")
    assert r.exit_code == 1 and "look like dlrm" in r.output
    broken = dict(s)
    del broken["top_l.0.weight"]
    broken["top_l.0.weight"] = torch.randn(32, 99)  # a width no interaction gives
    torch.save(broken, tmp_path / "b.pt")
    r, _ = _compress_cli(tmp_path, tmp_path / "b.pt")
    assert r.exit_code == 1 and "cannot infer the interaction" in r.output
    tr = torchrec_state()
    del tr["over_arch.model.1.weight"]
    torch.save(tr, tmp_path / "t.pt")
    r, _ = _compress_cli(tmp_path, tmp_path / "t.pt")
    assert r.exit_code == 1 and "missing keys" in r.output
    r, _ = _compress_cli(tmp_path, tmp_path / "m.pt", "--tables", "user_id")
    assert r.exit_code == 1 and "no table named 'user_id'" in r.output


def test_rank_too_large_and_output_rules(tmp_path):
    torch.save(dlrm_checkpoint(dlrm_state(rows=[300, 200])), tmp_path / "m.pt")
    r, out = _compress_cli(tmp_path, tmp_path / "m.pt", "--rank", "10000")
    assert r.exit_code == 1 and "no table got smaller" in r.output and not out.exists()
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "m.pt"), "--rank", "2"])
    assert r.exit_code == 1 and "same file as the input" in r.output
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "exists.safetensors"),
                                  "--rank", "2"])
    assert r.exit_code == 1 and "--force" in r.output
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"
    with pytest.raises(OutputError):
        fpd_convert.decompress(tmp_path / "exists.safetensors", tmp_path / "m.pt")


def test_reader_refuses_unknown_versions_and_features(tmp_path):
    torch.save(dlrm_checkpoint(dlrm_state()), tmp_path / "m.pt")
    fpd_convert.compress(tmp_path / "m.pt", tmp_path / "c.safetensors", rank=4, progress=False, fidelity=PLAIN)
    tensors = load_file(tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata={**meta, "format_version": "9"})
    with pytest.raises(CheckpointError, match="format version 9 is not supported"):
        fpd_convert.load(tmp_path / "v9.safetensors")
    tables = json.loads(meta["tt_tables"])
    next(iter(tables.values()))["features"] = ["hash_rows"]  # a feature of some later version
    save_file(tensors, str(tmp_path / "feat.safetensors"), metadata={**meta, "tt_tables": json.dumps(tables)})
    with pytest.raises(CheckpointError, match="hash_rows"):
        read_compressed_meta(tmp_path / "feat.safetensors")
    next(iter(tables.values()))["features"] = ["row_map"]  # known, but its tensor is missing
    save_file(tensors, str(tmp_path / "nomap.safetensors"), metadata={**meta, "tt_tables": json.dumps(tables)})
    with pytest.raises(CheckpointError, match="lacks its tensor .*row_map"):
        fpd_convert.load(tmp_path / "nomap.safetensors")
    bad = dict(tensors)
    bad["emb_l.0.weight.tt_core.1"] = torch.zeros(2, 2, 2, 2)
    save_file(bad, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="has shape"):
        fpd_convert.load(tmp_path / "shape.safetensors")


def test_bench_command_runs_and_reports_ratios():
    r = CliRunner().invoke(main, ["bench", "--rows", "20000", "--dim", "16", "--rank", "4", "--batch", "256",
                                  "--reps", "2", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)["lookups"]
    assert d["tt_forward_lookups_s"] > 0 and d["forward_ratio"] > 0 and 0 < d["unique_ids"] <= 256
    assert d["kernel"] in ("cpu", "triton") and d["tt_reference_fwd_bwd_lookups_s"] > 0 and d["speedup_forward_vs_reference"] > 0
    if d["device"] == "cpu":  # the quantized alternatives: int8 keeps d bytes plus an fp32 scale and bias a row
        assert d["int8_forward_ratio"] > 0 and d["int4_forward_ratio"] > 0
        assert d["bytes"]["int8"] == 20000 * (16 + 8) and d["bytes"]["int4"] < d["bytes"]["int8"] < d["bytes"]["dense"]
    assert d["bytes"]["tt"] < d["bytes"]["dense"] == 20000 * 16 * 4
    r = CliRunner().invoke(main, ["bench", "--rows", "20000", "--dim", "16", "--rank", "4", "--batch", "256",
                                  "--reps", "3", "--batches", "4"])
    assert r.exit_code == 0, r.output
    assert "4 batches in turn" in r.output and "ratio" in r.output
    r = CliRunner().invoke(main, ["bench", "--rows", "2000", "--batches", "0"])
    assert r.exit_code != 0 and "--batches" in r.output
    r = CliRunner().invoke(main, ["bench", "--rows", "20000", "--dim", "16", "--rank", "4", "--batch", "64",
                                  "--reps", "1", "--dim-factors", "2,2,4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["lookups"]["dim_factors"] == [2, 2, 4]
    for bad in ("2,x", "3,3,3"):  # not integers; not a factorization of 16
        r = CliRunner().invoke(main, ["bench", "--rows", "2000", "--dim", "16", "--dim-factors", bad])
        assert r.exit_code != 0 and ("--dim-factors" in r.output or "multiply" in r.output), r.output
    r = CliRunner().invoke(main, ["bench", "--rows", "20000", "--dim", "16", "--rank", "4", "--batch", "64",
                                  "--reps", "1", "--suffix-rows", "50", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["lookups"]["row_factors"] == [400, 10, 5]


def test_interleaved_medians_time_every_function_in_turn():
    from fpd_convert.bench.timing import interleaved_medians
    calls = []
    out = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              torch.device("cpu"), reps=7, warmup=1, block=3, settle=1)
    assert set(out) == {"a", "b"} and all(v >= 0 for v in out.values())
    # warm-up, then rounds of (1 settle + up to 3 timed) per function, in turn, until 7 timed each
    assert calls[:2] == ["a", "b"] and calls[2:6] == ["a"] * 4 and calls[6:10] == ["b"] * 4
    assert calls.count("a") == calls.count("b") == 1 + 3 + 7


def test_ratios_taken_within_rounds_ignore_a_slow_spell():
    from fpd_convert.bench.timing import interleaved_rounds, paired_ratio
    rounds = interleaved_rounds({"a": lambda: None, "b": lambda: None}, torch.device("cpu"), reps=7, warmup=0,
                                block=3, settle=0)
    assert [len(r["a"]) for r in rounds] == [3, 3, 1] and all(set(r) == {"a", "b"} for r in rounds)
    # the machine 10x slower for a round, a noisy round: the rounds' ratios are 2, 2 and 2.2, their median 2
    spell = [{"a": [2.0, 2.0], "b": [1.0, 1.0]}, {"a": [20.0, 20.0], "b": [10.0, 10.0]}, {"a": [2.2], "b": [1.0]}]
    assert paired_ratio(spell, "a", "b") == 2.0


@needs_triton
def test_bench_reports_which_triton_kernels_a_batch_takes():
    from fpd_convert.bench.lookups import bench_lookups, format_lookups
    from fpd_convert.kernels import triton_suffix
    from fpd_convert.layers import TTEmbeddingBag
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU: Triton's interpreter
    r = bench_lookups(rows=512, dim=8, rank=2, batch=64, kernel="triton", device=device, reps=1, reference=False,
                      quantized=False)
    cores = list(TTEmbeddingBag(512, 8, rank=2).cores)
    want = "suffix" if triton_suffix.worthwhile(cores, r["unique_ids"]) else "per-index"
    assert r["triton_rows"] == want and f"TT path: triton ({want} kernels)" in format_lookups(r)
    assert r["forward_ratio"] > 0 and r["fwd_bwd_ratio"] > 0


def test_bench_dlrm_step_default_model_and_compressed_file(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--rows", "2000", "--dim", "16", "--rank", "4", "--batch", "64",
                                  "--reps", "1", "--step", "--rows-cap", "3000", "--json"])
    assert r.exit_code == 0, r.output
    step = json.loads(r.stdout)["dlrm_step"]
    assert step["tt_tables"] == 5 and step["ratio"] > 0 and step["inference_ratio"] > 0
    assert step["tt_embedding_bytes"] < step["dense_embedding_bytes"]
    torch.save(dlrm_checkpoint(dlrm_state()), tmp_path / "m.pt")
    fpd_convert.compress(tmp_path / "m.pt", tmp_path / "c.safetensors", rank=4, num_largest=2, progress=False)
    r = CliRunner().invoke(main, ["bench", "--rows", "2000", "--dim", "16", "--rank", "4", "--batch", "32",
                                  "--reps", "1", "--model", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 0, r.output
    assert "2 TT tables from the file" in r.output and "ratio TT / dense" in r.output


@pytest.mark.parametrize("layout", ["dlrm", "torchrec"])
def test_compressed_models_read_all_tt_dedups_at_once(tmp_path, monkeypatch, layout):
    # the GPU's grouped lookups (all TT dedups launched, their counts read in one copy), on CPU tensors
    from fpd_convert.layers import TTEmbeddingBag, dedup
    if layout == "dlrm":
        s = dlrm_state(weighted=True)
        torch.save(dlrm_checkpoint(s), tmp_path / "m.pt")
    else:
        s = torchrec_state()
        torch.save(s, tmp_path / "m.pt")
    fpd_convert.compress(tmp_path / "m.pt", tmp_path / "c.safetensors", rank=FULL, num_largest=2,
                         progress=False, keep_larger=True)
    model = fpd_convert.load(tmp_path / "c.safetensors")
    dense, ids = batch()
    expected = model(dense, ids)
    monkeypatch.setattr(dedup, "device_dedup", lambda input: True)
    read = []
    finish = TTEmbeddingBag.finish_lookup
    monkeypatch.setattr(TTEmbeddingBag, "finish_lookup",
                        lambda self, started, values=None: read.append(values is not None) or finish(self, started, values))
    torch.testing.assert_close(model(dense, ids), expected)
    assert read == [True, True]  # both TT tables got their values from the one grouped read
    want = ref_dlrm_forward(s, dense, ids, weighted=True) if layout == "dlrm" else ref_torchrec_forward(s, dense, ids)
    torch.testing.assert_close(expected, want, atol=1e-4, rtol=1e-4)


def test_torchrec_tables_keep_their_order_in_a_safetensors_file(tmp_path):
    # safetensors sorts keys as strings (t_cat_0, t_cat_1, t_cat_10, t_cat_11, t_cat_2, ...): the tables must
    # still feed the features in the collection's order, as the .pt state_dict does
    rows = [60 + 7 * i for i in range(12)]
    s = torchrec_state(rows=rows)
    torch.save(s, tmp_path / "m.pt")
    save_file(s, str(tmp_path / "m.safetensors"))
    dense, ids = batch(rows=rows)
    want = ref_torchrec_forward(s, dense, ids)
    for name in ("m.pt", "m.safetensors"):
        got = fpd_convert.load(tmp_path / name).logits(dense, ids)
        assert torch.allclose(got, want, atol=1e-5), name
        fpd_convert.compress(tmp_path / name, tmp_path / f"{name}.tt.safetensors", rank=4, tables=["t_cat_10"],
                             progress=False)
    pt, st = (fpd_convert.load(tmp_path / f"m.{x}.tt.safetensors").logits(dense, ids) for x in ("pt", "safetensors"))
    assert torch.equal(pt, st)
