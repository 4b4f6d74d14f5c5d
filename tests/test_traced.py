"""The compressed model leaves the package: torch.compile (inference and training), torch.export with
dynamic shapes, and programs (pt2, AOTInductor, ONNX) that run where fpd_convert is not installed."""
import json
import subprocess
import zipfile
import sys
import textwrap
import warnings

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import fpd_convert
from conftest import cuda
from fpd_convert.cli import main
from fpd_convert.convert.export import export, export_program
from fpd_convert.convert.importance import FidelityOptions
from fpd_convert.layers import TTEmbedding, TTEmbeddingBag, TTIndexError
from fpd_convert.layers.traced import portable_lookups
from layouts import batch, dlrm_checkpoint, dlrm_state, torchrec_state

warnings.filterwarnings("ignore", category=FutureWarning)
ATOL = 1e-5  # float32 sums in another order: the traced row contraction and pooling regroup them


def _bag(mode="sum", padding_idx=None, include_last_offset=False, fidelity=True, seed=0):
    torch.manual_seed(seed)
    bag = TTEmbeddingBag(3000, 24, rank=6, mode=mode, padding_idx=padding_idx,
                         include_last_offset=include_last_offset)
    if fidelity:  # a row map and exact rows, as an importance-aware file has them
        bag.set_row_map(torch.tensor([2999, 17, 400, 5]))
        bag.set_exact_rows(torch.tensor([9, 2999, 1234]), torch.randn(3, 24))
    return bag


def _bags(n=3000, bags=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (bags,), generator=g)
    ids = torch.randint(0, n, (int(lengths.sum()),), generator=g)
    ids[:6] = torch.tensor([9, 2999, 17, 3, 9, 1234])  # exact rows, mapped rows, repeats
    return ids, torch.cumsum(lengths, 0) - lengths


@pytest.fixture(params=["in-graph", "operator", "portable"])
def path(request, monkeypatch):
    """The three ways a traced lookup runs: standard operators around the cached product table (the CPU's
    default for small tables), the lookup operator (GPUs, big tables), and the portable lowering."""
    import fpd_convert.layers.traced as traced
    if request.param == "operator":
        monkeypatch.setattr(traced, "IN_GRAPH_MAX_BYTES", -1)
    if request.param == "portable":
        with portable_lookups():
            yield request.param
    else:
        yield request.param


def _compiled(module, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(module, fullgraph=True, backend=backend)


CALLS = {
    "one-hot (B, 1)": lambda ids, off: (ids[:32].reshape(-1, 1),),
    "one-hot offsets": lambda ids, off: (ids[:32], torch.arange(32)),
    "bags": lambda ids, off: (ids, off),
    "fixed bags (B, L)": lambda ids, off: (ids[:36].reshape(12, 3),),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_traced_bag_equals_eager(call, mode, path):
    bag = _bag(mode).eval()
    args = CALLS[call](*_bags())
    want = bag(*args)  # eager: the path only matters to a trace
    with torch.no_grad():
        got = _compiled(bag)(*args)
        program = torch.export.export(bag, args)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(program.module()(*args), want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("form", ["serving form", "product table"])
def test_compiled_inference_from_the_serving_form_or_the_product_table_equals_eager(form, monkeypatch):
    # under inductor, for inference: in eval mode each row entry a dot product with the serving form; without it
    # (train mode under no_grad) a bmm with the product table that the product operator keeps
    import fpd_convert.layers.serving_form as serving_form
    import fpd_convert.layers.traced as traced
    from fpd_convert.kernels.cpu_suffix import rows_from_suffixes
    used = []
    monkeypatch.setattr(traced, "rows_from_suffixes", lambda *a: used.append("product table") or rows_from_suffixes(*a))
    dot_rows = serving_form.rows
    monkeypatch.setattr(serving_form, "rows", lambda *a: used.append("serving form") or dot_rows(*a))
    bag = _bag("mean") if form == "product table" else _bag("mean").eval()
    assert ("_serving_products" in bag._buffers) == (form == "serving form")
    ids, off = _bags()
    want = bag(ids, off)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(bag, backend="inductor")(ids, off), want, atol=ATOL, rtol=ATOL)
    assert set(used) == {form}


def test_a_serving_form_follows_its_cores_or_the_compiled_lookup_says_it_is_stale():
    bag = _bag("sum").eval()
    ids, off = _bags()
    compiled = _compiled(bag, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, off), bag(ids, off), atol=ATOL, rtol=ATOL)
        other = _bag("sum", seed=5)
        bag.load_state_dict(other.state_dict())  # in eval mode: the form is rebuilt
        torch.testing.assert_close(compiled(ids, off), other.eval()(ids, off), atol=ATOL, rtol=ATOL)
        bag.cores[0].mul_(2)  # changed in place, unseen: the compiled lookup refuses
        with pytest.raises(RuntimeError, match="call model.eval\\(\\) again"):
            compiled(ids, off)
        bag.eval()
        torch.testing.assert_close(compiled(ids, off), bag(ids, off), atol=ATOL, rtol=ATOL)
    assert "_serving_products" not in bag.train()._buffers  # train mode: derived data goes
    assert not any("_serving" in k for k in bag.eval().state_dict())


def test_traced_options_padding_weights_last_offset_equal_eager(path):
    ids, off = _bags()
    ids[[7, 8, 20]] = 17  # padding entries (17 is also a mapped row)
    weights = torch.rand(ids.shape)
    cases = [(_bag("sum", padding_idx=17), (ids, off), {"per_sample_weights": weights}),
             (_bag("mean", padding_idx=17), (ids, off), {}),
             (_bag("max", padding_idx=17), (ids, off), {}),
             (_bag("mean", include_last_offset=True), (ids, torch.cat([off, off[-1:]])), {}),  # trailing entries
             (_bag("max", include_last_offset=True), (ids, torch.cat([off, torch.tensor([ids.numel()])])), {}),
             (_bag("sum", padding_idx=17), (ids[:36].reshape(12, 3),), {"per_sample_weights": weights[:36].reshape(12, 3)}),
             (_bag("mean", padding_idx=17), (ids[:36].reshape(12, 3),), {})]
    for bag, args, kw in cases:
        bag.eval()
        want = bag(*args, **kw)
        with torch.no_grad():
            got = _compiled(bag)(*args, **kw)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_traced_tt_embedding_equals_eager(path):
    torch.manual_seed(0)
    emb = TTEmbedding(500, 12, rank=4, padding_idx=3)
    emb.set_exact_rows(torch.tensor([7]), torch.randn(1, 12))
    ids = torch.randint(0, 500, (5, 7))
    ids[0, :3] = torch.tensor([3, 7, 3])
    want = emb(ids)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(emb)(ids), want, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(torch.export.export(emb, (ids,)).module()(ids), want, atol=ATOL, rtol=ATOL)


def test_portable_programs_hold_the_product_table_in_the_serving_form_or_for_onnx_as_it_is():
    import fpd_convert.layers.traced as traced
    bag = _bag("sum").eval()
    ids, off = _bags()
    for onnx, held in ((False, {"_portable_form"}), (True, {"_portable_products"})):
        with torch.no_grad(), portable_lookups(onnx=onnx), traced.portable_products(bag) as added:
            assert {n for n in bag._buffers if n.startswith("_portable")} == held
            assert added == sum(bag._buffers[n].numel() * 4 for n in held)
            program = torch.export.export(bag, (ids, off))
        assert not any(n.startswith("_portable") for n in bag._buffers)
        torch.testing.assert_close(program.module()(ids, off), bag(ids, off), atol=ATOL, rtol=ATOL)


def test_traced_lookup_refuses_or_poisons_ids_out_of_range():
    bag = _bag().eval()
    bad = torch.tensor([[5], [3000]])
    with pytest.raises(TTIndexError, match="index 3000 is out of range"):
        bag(bad)
    with torch.no_grad(), pytest.raises(RuntimeError, match="out of range for a table of 3000 rows"):
        _compiled(bag)(bad)  # a runtime assert in the graph (TTIndexError where the lookup operator runs)
    big = TTEmbeddingBag(3000, 24, rank=6, mode="sum").eval()
    big.kernel = "reference"  # not the CPU's in-graph path: the lookup operator
    with torch.no_grad(), pytest.raises(TTIndexError, match="index 3000 is out of range"):
        _compiled(big)(bad)
    with torch.no_grad(), portable_lookups():  # a graph has no exceptions: the row is NaN, never a silent row
        out = torch.export.export(bag, (torch.tensor([[5], [6], [7]]),)).module()(torch.tensor([[5], [-1], [3000]]))
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()


@pytest.mark.parametrize("row_factors", [(40_000, 40, 25), None])
def test_an_onnx_program_finds_the_rows_of_a_table_past_two_to_the_24(row_factors):
    # integer division exported as torch.div(..., "floor") goes through float32 in ONNX: id 16,777,471 // 256
    # gave 65,537; ids, buckets and TT digits of a 40M-row table must stay integers.  (40000, 40, 25): a small
    # product of the last cores, held by the program; the default layout's is too big: all cores contracted
    import onnxruntime as ort
    import fpd_convert.layers.traced as traced
    from fpd_convert.convert.export import _quiet
    torch.manual_seed(0)
    n = 40_000_000
    bag = TTEmbeddingBag(n, 8, rank=3, mode="sum", row_factors=row_factors, dim_factors=(2, 2, 2)).eval()
    edges = [16_777_215, 16_777_216, 16_777_217, 16_777_471, 33_554_431, 33_554_433, n - 1]
    bag.set_row_map(torch.tensor([n - 2, 16_777_217, 30_000_001]))
    bag.set_exact_rows(torch.tensor([16_777_216, 33_554_433]), torch.randn(2, 8))
    ids = torch.cat([torch.tensor(edges + [n - 2, 30_000_001, 0, 1]), torch.randint(0, n, (50,))]).reshape(-1, 1)
    want = bag(ids)
    with torch.no_grad(), portable_lookups(onnx=True), traced.portable_products(bag) as held, _quiet("torch.onnx"):
        assert (held > 0) == (row_factors is not None)
        program = torch.export.export(bag, (ids[:4],), dynamic_shapes=({0: torch.export.Dim("b", min=2)},))
        onnx_program = torch.onnx.export(program, (ids[:4],), dynamo=True, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("operator", [False, True])
def test_a_training_step_under_torch_compile_gives_eager_gradients(operator, monkeypatch):
    import fpd_convert.layers.traced as traced
    if operator:  # the lookup operator's autograd formula, instead of the product table built in the graph
        monkeypatch.setattr(traced, "IN_GRAPH_MAX_BYTES", -1)
    for backend in ("aot_eager", "inductor"):
        bag = _bag("sum")
        ids, off = _bags()
        weights = torch.rand(ids.shape, requires_grad=True)
        upstream = torch.randn(off.numel(), 24)
        (bag(ids, off, per_sample_weights=weights) * upstream).sum().backward()
        want = [p.grad.clone() for p in bag.parameters()] + [weights.grad.clone()]
        bag.zero_grad()
        weights.grad = None
        (_compiled(bag, backend)(ids, off, per_sample_weights=weights) * upstream).sum().backward()
        got = [p.grad for p in bag.parameters()] + [weights.grad]
        assert len(got) == 5  # three cores, the exact rows, the weights
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("batch", ["no exact row", "exact rows only"])
def test_parameters_a_batch_does_not_read_get_a_zero_gradient_in_eager_as_compiled(batch):
    # DistributedDataParallel stops at a parameter without a gradient; Adam moves one with a zero gradient
    bag = _bag("sum")
    ids = torch.tensor([[3], [40], [700]]) if batch == "no exact row" else torch.tensor([[9], [2999], [9]])
    steps = []
    for run in (bag, _compiled(bag)):
        bag.zero_grad(set_to_none=True)
        run(ids).pow(2).sum().backward()
        steps.append([p.grad for p in bag.parameters()])
    (eager, compiled) = steps
    unread = [bag.exact_rows] if batch == "no exact row" else bag._core_list()
    for p, a, b in zip(bag.parameters(), eager, compiled):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)
        assert (a == 0).all() == any(p is u for u in unread)


# --- whole models, as fpd_convert.load returns them

def _files(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    fid = FidelityOptions("norm", hot_fraction=0.05, exact_fraction=0.02)
    out = {}
    specs = {
        "dlrm-dot-weighted": (dlrm_checkpoint(dlrm_state(weighted=True)), dict(fidelity=fid)),
        "dlrm-cat-int8": (dlrm_checkpoint(dlrm_state(interaction="cat")),
                          dict(fidelity=FidelityOptions("norm", 0.05, 0.02, core_dtype="int8"))),
        "torchrec-dot": (torchrec_state(), dict(fidelity=fid)),
        "torchrec-dcn-bf16": (torchrec_state(variant="dcn"),
                              dict(fidelity=FidelityOptions("norm", 0.05, 0.02, core_dtype="bfloat16"))),
        "torchrec-projection": (torchrec_state(variant="projection"), dict(fidelity=fid)),
    }
    for name, (state, kw) in specs.items():
        torch.save(state, d / f"{name}.pt")
        fpd_convert.compress(d / f"{name}.pt", d / f"{name}.safetensors", rank=4, num_largest=2, progress=False, **kw)
        out[name] = d / f"{name}.safetensors"
    from safetensors.torch import save_file
    save_file({"user.weight": torch.randn(3000, 16), "item.weight": torch.randn(2000, 8), "bias": torch.randn(8)},
              str(d / "generic.safetensors"))
    fpd_convert.compress(d / "generic.safetensors", d / "generic.tt.safetensors", rank=4, num_largest=2,
                         progress=False, fidelity=fid)
    out["generic"] = d / "generic.tt.safetensors"
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory)


FAMILIES = ["dlrm-dot-weighted", "dlrm-cat-int8", "torchrec-dot", "torchrec-dcn-bf16", "torchrec-projection"]


def _model_inputs(model, b, pooled=False, seed=3):
    from fpd_convert.convert.export import _inputs
    return _inputs(model, b, pooled, seed)


@pytest.mark.parametrize("name", FAMILIES + ["generic"])
@pytest.mark.parametrize("pooled", [False, True])
def test_every_loaded_model_exports_with_a_dynamic_batch(files, name, pooled):
    if pooled and name == "generic":
        pytest.skip("a generic program takes id vectors")
    model = fpd_convert.load(files[name])
    args, _, dims = _model_inputs(model, 16, pooled)
    forms = {n: b for n, b in model.named_buffers() if n.endswith("_serving_products")}
    assert forms  # eval mode: the serving forms, which a program must not carry beside what it reads
    for lookup in ("fpd", "portable"):
        program = export_program(model, args, dims, lookup)
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any("fpd_convert" in o for o in ops) == (lookup == "fpd"), ops
        assert not [n for n in [*program.state_dict, *program.constants] if "_serving" in n]
        assert all(b is forms[n] for n, b in model.named_buffers() if n in forms)  # the same tensors back
        assert len([n for n, _ in model.named_buffers() if n.endswith("_serving_products")]) == len(forms)
        for b in (1, 7, 33):  # other batch sizes than the traced one
            other, _, _ = _model_inputs(model, b, pooled, seed=b)
            with torch.no_grad():
                want, got = model(*other), program.module()(*other)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("name", ["dlrm-dot-weighted", "torchrec-dcn-bf16", "generic"])
def test_compiled_models_equal_eager(files, name):
    model = fpd_convert.load(files[name])
    args, _, _ = _model_inputs(model, 24)
    with torch.no_grad():
        want = model(*args)
        got = _compiled(model, "inductor")(*args)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_a_dlrm_training_step_under_torch_compile_equals_eager(files):
    model = fpd_convert.load(files["dlrm-dot-weighted"]).train()
    dense, ids = batch(b=48)
    labels = (torch.rand(48, 1) < 0.3).float()
    loss = nn.BCEWithLogitsLoss()
    loss(model.logits(dense, ids), labels).backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, d, s):
            return self.m.logits(d, s)
    loss(_compiled(Logits(model), "inductor")(dense, ids), labels).backward()
    tt = [k for k in want if ".cores." in k or "exact_rows" in k]
    assert len(tt) >= 6
    for k, g in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g, atol=ATOL, rtol=1e-4, msg=k)


_FRESH = textwrap.dedent('''
    import importlib.abc, json, sys
    class NoFpdConvert(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "fpd_convert":
                raise ImportError("fpd_convert is not installed here")
    sys.meta_path.insert(0, NoFpdConvert())
    import torch
    fmt, path, inputs = sys.argv[1], sys.argv[2], torch.load(sys.argv[3])
    if fmt == "pt2":
        out = torch.export.load(path).module()(*inputs)
    elif fmt == "aoti":
        out = torch._inductor.aoti_load_package(path)(*inputs)
    else:
        import onnxruntime as ort
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        flat = [t for a in inputs for t in ([a] if isinstance(a, torch.Tensor) else [x for p in a for x in p])]
        outs = [torch.from_numpy(o) for o in s.run(None, {i.name: t.numpy() for i, t in zip(s.get_inputs(), flat)})]
        out = outs[0] if len(outs) == 1 else tuple(outs)
    assert not any(m.startswith("fpd_convert") for m in sys.modules)
    torch.save(out, sys.argv[4])
''')


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pt2", "aoti", "onnx"])
@pytest.mark.parametrize("name,pooled", [("dlrm-dot-weighted", False), ("torchrec-dcn-bf16", True),
                                         ("generic", False)])
def test_exported_files_run_in_a_process_without_fpd_convert(files, tmp_path, fmt, name, pooled):
    if fmt == "aoti" and name == "generic":
        pytest.skip("one AOTInductor compile per family keeps the suite short")
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt2'}"
    r = export(files[name], out, format=fmt, pooled=pooled)
    assert r["parity_max_abs_diff"] <= ATOL and r["bytes"] == out.stat().st_size
    model = fpd_convert.load(files[name])
    inputs, _, _ = _model_inputs(model, 9, pooled, seed=11)
    torch.save(inputs, tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", _FRESH, fmt, str(out), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        want = model(*inputs)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)  # a generic program gives one tensor a table


def test_export_command_prints_the_signature_and_refuses_bad_input(files, tmp_path):
    out = tmp_path / "m.pt2"
    r = CliRunner().invoke(main, ["export", str(files["torchrec-dot"]), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert [i["name"] for i in info["inputs"]] == ["dense", "sparse"]
    assert info["inputs"][1]["shape"] == ["batch", 5] and info["inputs"][1]["dtype"] == "int64"
    assert info["bytes"] == out.stat().st_size and info["parity_max_abs_diff"] <= ATOL
    assert {n.split("/")[0] for n in zipfile.ZipFile(out).namelist()} == {"archive"}  # not the temp file's name
    for command in (["inspect", str(out)], ["compress", str(out), "--rank", "4", "--yes"]):  # a program, said so
        r = CliRunner().invoke(main, command)
        assert r.exit_code == 1 and "a torch.export / AOTInductor program (a .pt2 archive), not a checkpoint" in r.output
    r = CliRunner().invoke(main, ["export", str(files["torchrec-dot"]), "-o", str(out)])
    assert r.exit_code == 1 and "exists" in r.output
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".again.pt2.{int(gone.stdout)}.x1y2.tmp"  # what an export killed by SIGKILL leaves
    killed.write_bytes(b"partial")
    r = CliRunner().invoke(main, ["export", str(files["generic"]), "-o", str(tmp_path / "again.pt2")])
    assert r.exit_code == 0 and not killed.exists() and f"removed {killed}" in r.output, r.output
    (tmp_path / "again.pt2").unlink()
    (tmp_path / "plain.pt").write_bytes((files["torchrec-dot"].parent / "torchrec-dot.pt").read_bytes())
    for args, message in [(["export", str(tmp_path / "plain.pt"), "-o", str(tmp_path / "x.pt2")], "not one"),
                          (["export", str(files["generic"]), "-o", str(tmp_path / "x.pt2"), "--format", "tflite"],
                           "Invalid value for '--format'"),
                          (["export", str(files["generic"]), "-o", str(tmp_path / "x.pt2"), "--format", "aoti",
                            "--lookup", "fpd"], "--lookup fpd")]:
        r = CliRunner().invoke(main, args)
        assert r.exit_code != 0 and message in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2", "plain.pt"]


@cuda
def test_compile_and_export_on_cuda_equal_eager():
    bag = _bag("sum").cuda().eval()
    ids, off = (t.cuda() for t in _bags())
    want = bag(ids, off)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(bag, "inductor")(ids, off), want, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(torch.export.export(bag, (ids, off)).module()(ids, off), want, atol=ATOL, rtol=ATOL)
    train = _bag("sum").cuda()
    (train(ids, off) * 2).sum().backward()
    want_grads = [p.grad.clone() for p in train.parameters()]
    train.zero_grad()
    (_compiled(train, "inductor")(ids, off) * 2).sum().backward()
    for a, b in zip([p.grad for p in train.parameters()], want_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bench_serve_times_every_runtime_beside_dense(files):
    from fpd_convert.bench.serve import bench_serve, format_serve
    r = bench_serve(str(files["torchrec-dot"]), batches=[3, 40], runtimes=("eager", "compile", "onnx"), reps=2)
    assert r["runtimes"] == ["eager", "compile", "onnx"]
    for b in ("3", "40"):
        assert set(r["seconds"][b]) == {f"{rt}/{m}" for rt in r["runtimes"] for m in ("tt", "dense")}
        assert all(v > 0 for v in r["seconds"][b].values())
        assert r["ratios"][b]["eager"]["vs_eager_tt"] == 1.0 and r["ratios"][b]["onnx"]["tt_vs_dense"] > 0
    assert "TT/eager TT" in format_serve(r)
