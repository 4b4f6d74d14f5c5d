"""Importance-aware compression: row maps, exact rows, low-precision cores, byte budgets, AUC."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fpd_convert
from fpd_convert.checkpoints import CheckpointError, read_compressed, read_compressed_meta, table_file_keys
from fpd_convert.checkpoints.compressed_format import file_tensor_bytes
from fpd_convert.cli import main
from fpd_convert.convert.candidates import Layout, LayoutReader
from fpd_convert.convert.importance import FidelityOptions
from fpd_convert.data import CriteoData
from fpd_convert.data.frequency import lookup_counts
from fpd_convert.data.synth import synth
from fpd_convert.kernels.reference import tt_rows
from fpd_convert.layers import TTEmbeddingBag
from fpd_convert.training.finetune import finetune
from fpd_convert.training.metrics import evaluate
from fpd_convert.training.train import train
from fpd_convert.tt.allocate import BudgetError, Candidate, allocate
from fpd_convert.tt.core_quant import decode, encode, stored_bytes
from fpd_convert.tt.importance import drift_scores, importance_from, row_map_moves, top_rows, tt_positions


# -- the pieces ---------------------------------------------------------------------------
def test_row_map_is_a_permutation_stored_as_hot_ids():
    hot = np.array([17, 2, 40, 0, 33])
    rows, pos = row_map_moves(hot)
    assert sorted(rows.tolist()) == sorted(pos.tolist())  # a permutation of the moved rows
    mapped = tt_positions(np.arange(50), hot)
    assert sorted(mapped.tolist()) == list(range(50))
    assert mapped[hot].tolist() == [0, 1, 2, 3, 4]  # hot rows lead, in importance order
    assert mapped[1] in (17, 33, 40) and mapped[10] == 10  # displaced rows take vacated places


def test_importance_methods():
    norms = np.array([1.0, 1.1, 0.9, 1.0, 5.0, 1.05, 3.0])
    assert top_rows(importance_from(norms, "norm"), 2).tolist() == [4, 6]
    d = drift_scores(norms)
    assert d[4] > d[6] > 0 and d[2] == 0
    counts = np.array([0, 9, 0, 0, 1, 0, 0])
    assert top_rows(importance_from(norms, "data", counts), 3).tolist() == [1, 4, 6]  # ties: by norm
    with pytest.raises(ValueError, match="needs per-row counts"):
        importance_from(norms, "data")
    assert top_rows(norms, 3, exclude=np.array([4])).tolist() == [6, 1, 5]


def test_core_quantization_round_trip_and_bytes():
    g = torch.Generator().manual_seed(0)
    core = torch.randn(4, 10, 2, 5, generator=g)
    for dtype, tol in (("float32", 0), ("bfloat16", 1e-2), ("float16", 1e-3), ("int8", 1e-2)):
        stored, scales = encode(core, dtype, axis=1)
        back = decode(stored, scales, axis=1)
        assert (back - core).abs().max() <= tol * core.abs().max() + 1e-7
        assert stored.numel() * stored.element_size() + (0 if scales is None else scales.numel() * 4) == \
            stored_bytes(core.shape, dtype, axis=1)
    stored, scales = encode(core, "int8", axis=1)
    assert stored.dtype == torch.int8 and scales.shape == (10,)  # one scale per slice of the digit


def test_allocation_spends_bytes_where_error_drops_most():
    cands = {"a": [Candidate({"r": 1}, 100, 1.0), Candidate({"r": 2}, 200, 0.2), Candidate({"r": 3}, 300, 0.15)],
             "b": [Candidate({"r": 1}, 100, 0.5), Candidate({"r": 2}, 200, 0.45)]}
    chosen = allocate(cands, 400)
    assert chosen["a"].config == {"r": 3} and chosen["b"].config == {"r": 1}
    assert sum(c.nbytes for c in chosen.values()) <= 400
    with pytest.raises(BudgetError, match="below the smallest"):
        allocate(cands, 150)


def test_layout_reader_applies_map_and_zeroes_exact_rows():
    w = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    layout = Layout(exact_ids=np.array([5]), hot_ids=np.array([30, 7]))
    r = LayoutReader(lambda a, b: w[a:b], 40, layout)
    seen = np.concatenate([r(0, 13), r(13, 40)])
    pos = tt_positions(np.arange(40), layout.hot_ids)
    expected = np.zeros_like(w)
    expected[pos] = w
    expected[pos[5]] = 0
    np.testing.assert_array_equal(seen, expected)
    assert w[0, 0] == 0 and w[30, 0] == 90  # the source was not written to


def test_layer_lookups_with_row_map_and_exact_rows_equal_the_dense_view():
    torch.manual_seed(0)
    bag = TTEmbeddingBag(210, 6, rank=3, row_factors=[5, 7, 6], dim_factors=[1, 2, 3], mode="sum")
    hot = torch.tensor([100, 3, 57])
    exact_ids = torch.tensor([200, 5])
    exact = torch.randn(2, 6)
    bag.set_row_map(hot)
    bag.set_exact_rows(exact_ids, exact)
    pos = torch.from_numpy(tt_positions(np.arange(210), hot.numpy()))
    expected = tt_rows(list(bag.cores), pos).detach()
    expected[200], expected[5] = exact[0], exact[1]
    dense = bag.to_dense()
    torch.testing.assert_close(dense, expected)
    ids = torch.tensor([100, 5, 0, 200, 3, 209])
    for kernel in ("reference", "cpu"):
        bag.kernel = kernel
        torch.testing.assert_close(bag(ids, torch.tensor([0, 2])), torch.stack([expected[[100, 5]].sum(0),
                                                                               expected[[0, 200, 3, 209]].sum(0)]))
    bag(ids, torch.tensor([0, 2])).sum().backward()  # exact rows and cores both learn
    assert bag.exact_rows.grad.abs().sum() > 0 and bag.cores[0].grad.abs().sum() > 0


@pytest.mark.parametrize("rf, df, n_eval", [([5, 7, 6], [1, 2, 3], 150), ([40, 6, 5], [2, 3, 1], 30),
                                             ([12, 20], [2, 3], 100)])
def test_a_candidates_error_from_its_cores_is_the_layers(rf, df, n_eval):
    # the search measures candidates straight from their cores (the whole TT table at once, or row by row
    # for a big table and few evaluation rows): the same weighted error as the layer gives
    from fpd_convert.checkpoints import TableTensors
    from fpd_convert.convert.importance import TableEval
    from fpd_convert.convert.measure import candidate_error_sq, layer_of, layout_eval, weighted_error_sq
    from fpd_convert.tt import TTShape
    rng = np.random.default_rng(0)
    n, d = int(np.prod(rf)) - 3, int(np.prod(df))
    ranks = [1] + [3] * (len(rf) - 1) + [1]
    cores = [rng.standard_normal((ranks[j], rf[j], df[j], ranks[j + 1])).astype(np.float32) for j in range(len(rf))]
    w = rng.standard_normal((n, d)).astype(np.float32)
    hot, exact_ids = np.array([100, 3, 57, 8]), np.array([5, 150])
    stored, scales = encode(torch.from_numpy(w[exact_ids] + 0.1), "int8", axis=0)  # not exact: an error of their own
    exact_rows = decode(stored, scales, axis=0)
    ids = np.sort(rng.choice(n, n_eval, replace=False))
    ids = np.union1d(ids, [5, 100, 3])
    ev = TableEval(ids, rng.random(ids.size) + 0.1, w[ids])
    table = TableTensors([torch.from_numpy(c) for c in cores], torch.from_numpy(hot), torch.from_numpy(exact_ids),
                         exact_rows)
    layer = layer_of(TTShape(n, d, rf, df, ranks), table)
    le = layout_eval(ev, hot, exact_ids, exact_rows.numpy())
    assert candidate_error_sq(cores, le) == pytest.approx(weighted_error_sq(layer, ev), rel=1e-5)


def test_the_memory_plan_counts_what_the_candidates_hold():
    # until the allocation, every table keeps its layouts' bases (in memory) or sketches (streamed): the
    # plan adds them, for all tables at once
    from fpd_convert.convert.candidates import EXACT_FRACTIONS
    from fpd_convert.convert.plan import STREAM_LAYOUTS, plan_table, planned_peak, with_importance
    assert STREAM_LAYOUTS == len(EXACT_FRACTIONS)  # a streamed table keeps a sketch's B per layout
    plans = [plan_table("a", "a", 200_000, 16, ratio=20, svd_path=path) for path in ("memory", "stream")]
    alone = [p.peak_bytes for p in plans]
    with_importance(plans)
    m = plans[1].row_factors[0] * plans[1].dim_factors[0]
    assert all(p.held_bytes > 0 for p in plans) and plans[1].held_bytes >= 4 * m * max(plans[1].ranks)
    assert planned_peak(plans, 1) == max(p.peak_bytes for p in plans) + sum(p.held_bytes for p in plans)
    assert all(p.peak_bytes > a for p, a in zip(plans, alone))


def test_the_search_measures_the_rungs_around_each_choice(trained):
    # every third rung first; the allocation's choice then gets its neighbours, and the chosen TT is the
    # decomposition it was compared by (the same weighted error on the candidates' evaluation rows)
    from fpd_convert.convert import search
    from fpd_convert.convert.compress import compress
    from fpd_convert.convert.measure import candidate_error_sq
    seen, same = {}, {}
    real_refine, real_result = search.MemorySearch.refine, search.MemorySearch.result

    def refine(self, chosen):
        added = real_refine(self, chosen)
        seen.setdefault(self.p.plan.key, []).append(added)
        return added

    def result(self, chosen):
        res = real_result(self, chosen)
        cores = [c.numpy() for c in res.table.cores]
        same[self.p.plan.key] = (candidate_error_sq(cores, self.states[chosen.config["layout"]].eval), chosen.error)
        return res
    search.MemorySearch.refine, search.MemorySearch.result = refine, result
    try:
        s = compress(trained / "base.pt", trained / "search.safetensors", ratio=20, num_largest=2, progress=False)
    finally:
        search.MemorySearch.refine, search.MemorySearch.result = real_refine, real_result
    assert set(seen) == set(same) == {t.key for t in s.tables}
    for t in s.tables:
        assert seen[t.key][0] > 0 and seen[t.key][-1] == 0  # the first choice gains neighbours; the last settled
        assert same[t.key][0] == pytest.approx(same[t.key][1], rel=1e-6)
        assert "candidates measured" in t.why


# -- on a trained model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("fidelity")
    synth(d / "train.npz", 60_000, seed=0)
    synth(d / "val.npz", 10_000, seed=1)
    synth(d / "test.npz", 20_000, seed=2)
    train(d / "train.npz", d / "base.pt", val_data=d / "val.npz", progress=False)
    return d


def _auc(path, test):
    model = fpd_convert.load(path)
    rows = [t["rows"] for t in model.architecture["tables"]]
    return evaluate(model, CriteoData(test, rows, batch_size=8192))["auc"]


def _weighted_error(base, compressed, counts):
    num = den = 0.0
    for i, c in counts.items():
        w = base.emb_l[i].weight.detach().double()
        w_hat = compressed.emb_l[i].to_dense().detach().double()
        c = torch.from_numpy(c).double()
        num += float(c @ ((w - w_hat) ** 2).sum(1))
        den += float(c @ (w ** 2).sum(1))
    return (num / den) ** 0.5


def test_importance_aware_beats_natural_order_at_equal_bytes(trained):
    d = trained
    budget = 300_000  # bytes for the five largest tables (1.52 MB dense): ~50x
    aware = fpd_convert.compress(d / "base.pt", d / "aware.safetensors", budget=budget, progress=False,
                                 fidelity=FidelityOptions("data"), data=d / "train.npz")
    aware_bytes = sum(t.bytes_after for t in aware.tables)
    assert aware_bytes <= budget
    for scale in (1.0, 1.1, 1.25, 1.5, 2.0):  # natural order gets at least the bytes the aware one used
        natural = fpd_convert.compress(d / "base.pt", d / "natural.safetensors", budget=int(budget * scale),
                                       progress=False, force=True, fidelity=FidelityOptions("none"))
        if sum(t.bytes_after for t in natural.tables) >= aware_bytes:
            break
    assert sum(t.bytes_after for t in natural.tables) >= aware_bytes
    meta = read_compressed_meta(d / "aware.safetensors")
    stored = file_tensor_bytes(d / "aware.safetensors")
    on_disk = sum(stored[k] for key, e in meta.tt_tables.items() for k in table_file_keys(key, e))
    assert on_disk == sum(t.bytes_after for t in aware.tables) <= budget  # every byte counted
    base = fpd_convert.load(d / "base.pt")
    rows = [t["rows"] for t in base.architecture["tables"]]
    all_counts = lookup_counts(d / "train.npz", rows)
    counts = {i: all_counts[i] for i in range(5)}
    err_nat = _weighted_error(base, fpd_convert.load(d / "natural.safetensors"), counts)
    err_aware = _weighted_error(base, fpd_convert.load(d / "aware.safetensors"), counts)
    assert err_aware < err_nat
    auc_base, auc_nat, auc_aware = (_auc(d / f, d / "test.npz")
                                    for f in ("base.pt", "natural.safetensors", "aware.safetensors"))
    assert auc_aware > auc_nat
    assert auc_aware > auc_base - 0.002


def test_row_map_exact_rows_and_int8_cores_round_trip(trained):
    d = trained
    r = CliRunner().invoke(main, ["compress", str(d / "base.pt"), "-o", str(d / "rt.safetensors"), "--rank", "4",
                                  "--importance", "norm", "--hot-rows", "0.02", "--exact-rows", "0.01",
                                  "--core-dtype", "int8", "--exact-dtype", "bfloat16", "--force"])
    assert r.exit_code == 0, r.output
    assert "hot/exact" in r.output and "int8" in r.output
    tensors, meta = read_compressed(d / "rt.safetensors")
    e = meta.tt_tables["emb_l.0.weight"]
    assert set(e["features"]) == {"row_map", "exact_rows", "core_dtype"}
    assert tensors["emb_l.0.weight.tt_core.0"].dtype == torch.int8
    assert tensors["emb_l.0.weight.exact_rows.values"].dtype == torch.bfloat16
    assert tensors["emb_l.0.weight.row_map"].numel() == e["row_map_rows"] == round(0.02 * e["num_rows"])
    model = fpd_convert.load(d / "rt.safetensors")
    layer = model.emb_l[0]
    base = fpd_convert.load(d / "base.pt").emb_l[0].weight.detach()
    exact_ids = tensors["emb_l.0.weight.exact_rows.ids"].long()
    # exact rows come back as stored (bf16 of the trained rows); lookups equal the dense view
    torch.testing.assert_close(layer.to_dense()[exact_ids], base[exact_ids].bfloat16().float())
    ids = torch.arange(0, e["num_rows"], 7)
    torch.testing.assert_close(layer(ids, torch.arange(ids.numel())), layer.to_dense()[ids])
    # fine-tuning writes them back in the same encoding
    finetune(d / "rt.safetensors", d / "train.npz", d / "rt_ft.safetensors", max_steps=3, progress=False)
    t2, m2 = read_compressed(d / "rt_ft.safetensors")
    assert t2["emb_l.0.weight.tt_core.0"].dtype == torch.int8
    assert torch.equal(t2["emb_l.0.weight.row_map"], tensors["emb_l.0.weight.row_map"])
    # and decompress rebuilds the table through the map and the exact rows
    fpd_convert.decompress(d / "rt.safetensors", d / "rt_dense.pt")
    dense = torch.load(d / "rt_dense.pt", weights_only=False)["state_dict"]["emb_l.0.weight"]
    torch.testing.assert_close(dense, layer.to_dense())


def test_ratio_counts_every_byte(trained):
    d = trained
    s = fpd_convert.compress(d / "base.pt", d / "r50.safetensors", ratio=50, progress=False,
                             fidelity=FidelityOptions("norm", core_dtype="bfloat16"))
    before = sum(t.bytes_before for t in s.tables)
    assert sum(t.bytes_after for t in s.tables) <= before / 50
    assert all(t.core_dtype == "bfloat16" and t.weighted_error is not None for t in s.tables)


def test_data_importance_needs_a_dlrm_layout(tmp_path):
    from safetensors.torch import save_file
    save_file({"t.weight": torch.randn(5000, 8)}, str(tmp_path / "g.safetensors"))
    synth(tmp_path / "d.npz", 100)
    with pytest.raises(CheckpointError, match="needs a DLRM layout"):
        fpd_convert.compress(tmp_path / "g.safetensors", tmp_path / "o.safetensors", rank=4, progress=False,
                             fidelity=FidelityOptions("data"), data=tmp_path / "d.npz")


def test_importance_aware_streaming_path_meets_the_budget(tmp_path):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40_000, 16, generator=g) * 0.01
    w[:800] += torch.randn(800, 2, generator=g) @ torch.randn(2, 16, generator=g)  # trained, popular rows
    save_file({"t.weight": w}, str(tmp_path / "m.safetensors"))
    budget = 40_000 * 16 * 4 // 40
    s = fpd_convert.compress(tmp_path / "m.safetensors", tmp_path / "o.safetensors", budget=budget,
                             svd_path="stream", progress=False, fidelity=FidelityOptions("drift"))
    t = s.tables[0]
    assert t.svd_path == "stream" and t.bytes_after <= budget and t.exact_rows + t.hot_rows > 0
    layer = fpd_convert.load(tmp_path / "o.safetensors").table("t.weight")
    torch.testing.assert_close(layer.to_dense()[layer.exact_ids], w[layer.exact_ids])


def test_importance_from_the_optimizer_state_without_data(trained):
    # our train saves Adagrad's state the way facebookresearch/dlrm does: auto takes its per-row sums of
    # squared gradients (rows never looked up have none) when no data is given
    from fpd_convert.checkpoints import read_source
    d = trained
    src = read_source(d / "base.pt")
    acc = src.optimizer_accumulators
    assert set(acc) == {t["key"] for t in src.tables()}
    assert all(tuple(acc[k].shape) == tuple(src.state[k].shape) for k in acc)
    summary = fpd_convert.compress(d / "base.pt", d / "opt.safetensors", ratio=20, progress=False, force=True)
    assert {t.importance for t in summary.tables} == {"optimizer"}
    rows = acc["emb_l.0.weight"].double().sum(dim=1)
    assert float((rows == 0).double().mean()) < 1  # some rows were seen ...
    _, meta = read_compressed(d / "opt.safetensors")
    assert meta.tt_tables["emb_l.0.weight"]["importance"] == "optimizer"
    # ... and a checkpoint without that state cannot be asked for it
    torch.save(src.state, d / "no_opt.pt")
    with pytest.raises(ValueError, match="needs the optimizer's state .* --optimizer-state FILE"):
        fpd_convert.compress(d / "no_opt.pt", d / "x.safetensors", ratio=20, progress=False, force=True,
                             fidelity=FidelityOptions("optimizer"), tables=["emb_l.0.weight"])


def test_optimizer_state_is_paired_with_tables_only_when_it_matches():
    from fpd_convert.checkpoints.source import optimizer_accumulators
    state = {"a": torch.zeros(4, 2), "b": torch.zeros(3)}
    good = {"param_groups": [{"params": [0, 1]}], "state": {0: {"sum": torch.ones(4, 2)}, 1: {"sum": torch.ones(3)}}}
    assert set(optimizer_accumulators(good, state, ["a"])) == {"a"}
    fewer = {"param_groups": [{"params": [0]}], "state": {0: {"sum": torch.ones(4, 2)}}}
    assert optimizer_accumulators(fewer, state, ["a"]) == {}  # a parameter count that differs: no pairing
    shape = {"param_groups": [{"params": [0, 1]}], "state": {0: {"sum": torch.ones(2, 4)}, 1: {}}}
    assert optimizer_accumulators(shape, state, ["a"]) == {}
    sgd = {"param_groups": [{"params": [0, 1]}], "state": {}}
    assert optimizer_accumulators(sgd, state, ["a"]) == {}


def test_the_fidelity_set_runs_and_its_figures_agree(tmp_path):
    # one small model of the set: every figure present, and the difference from the control is the
    # fine-tuned model's difference less the control's
    from fpd_convert.bench.fidelity import bench_fidelity, format_fidelity
    out = bench_fidelity(("adagrad",), (16,), epochs=2, train_rows=6000, folder=str(tmp_path), torchrec=False)
    m = out["models"][0]
    assert m["model"] == "adagrad-d16-e2" and m["r50"]["importance"] == "optimizer"
    assert 45 <= m["r50"]["tables_ratio"] <= 55
    r200 = m["r200"]
    assert r200["finetuned_vs_control"] == pytest.approx(r200["finetuned"] - r200["control"], abs=1e-9)
    assert {"compressed", "int8_rowwise"} <= set(m["r50"]) and "compressed" in m["r50_plain"]
    text = format_fidelity(out)
    assert "adagrad-d16-e2" in text and max(len(line) for line in text.splitlines()) <= 100
    assert list(tmp_path.iterdir()) == []  # its files lived in a temp folder
