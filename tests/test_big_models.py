"""Big models: files written one tensor at a time, the same bytes for the same run, decompress in bounded
memory, the dense original loaded without a second copy."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fpd_convert
from fpd_convert.checkpoints.writers import Planned, write_safetensors, write_torch

TENSORS = {"a": torch.randn(3, 4), "b": torch.arange(5), "h": torch.randn(2, 2).to(torch.bfloat16),
           "f16": torch.randn(7).half(), "empty": torch.empty(0, 3), "scalar": torch.tensor(3.0),
           "mask": torch.tensor([True, False, True]), "i8": torch.tensor([-3, 4], dtype=torch.int8)}


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_write_safetensors_is_read_by_safetensors_and_sorted(tmp_path):
    made = []

    def planned(k, v):
        return Planned(k, v.dtype, tuple(v.shape), lambda: made.append(k) or v)
    write_safetensors(tmp_path / "w.safetensors", [planned(k, v) for k, v in TENSORS.items()], {"z": "1", "a": "2"})
    back = load_file(str(tmp_path / "w.safetensors"))
    assert set(back) == set(TENSORS) and all(torch.equal(back[k], v) for k, v in TENSORS.items())
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"z": "1", "a": "2"}
    assert sorted(made) == sorted(TENSORS)  # each tensor made once, when written
    # the same tensors in another order and metadata in another order: the same bytes
    write_safetensors(tmp_path / "v.safetensors", [Planned.of(k, TENSORS[k]) for k in reversed(list(TENSORS))],
                      {"a": "2", "z": "1"})
    assert _sha(tmp_path / "w.safetensors") == _sha(tmp_path / "v.safetensors")


def test_write_safetensors_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="planned as"):
        write_safetensors(tmp_path / "x", [Planned("t", torch.float32, (2, 2), lambda: torch.zeros(3))])
    with pytest.raises(ValueError, match="two tensors with one name"):
        write_safetensors(tmp_path / "x", [Planned.of("t", torch.zeros(1)), Planned.of("t", torch.zeros(1))])
    with pytest.raises(ValueError, match="no dtype"):
        write_safetensors(tmp_path / "x", [Planned.of("c", torch.zeros(2, dtype=torch.complex64))])


@pytest.mark.parametrize("mmap", [False, True])
def test_write_torch_is_what_torch_load_reads(tmp_path, mmap):
    state = {k: Planned(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in TENSORS.items()}
    view = torch.arange(10.0)[3:7]  # a view: only its own elements are written
    write_torch(tmp_path / "w.pt", {"state_dict": state, "epoch": 3, "test_acc": 0.5, "names": ["x", 1.5],
                                    "view": view})
    back = torch.load(tmp_path / "w.pt", weights_only=True, mmap=mmap)
    assert back["epoch"] == 3 and back["test_acc"] == 0.5 and back["names"] == ["x", 1.5]
    assert all(torch.equal(back["state_dict"][k], v) and back["state_dict"][k].dtype == v.dtype
               for k, v in TENSORS.items())
    assert torch.equal(back["view"], view) and back["view"].untyped_storage().nbytes() == 16


def _model(tmp_path, tables=4, rows=100_000, dim=32):
    g = torch.Generator().manual_seed(0)
    state = {f"emb.{i}.weight": torch.randn(rows, dim, generator=g) for i in range(tables)}
    state["mlp.weight"] = torch.randn(8, dim, generator=g)
    return state


_COMPRESS = "import sys, fpd_convert; fpd_convert.compress(sys.argv[1], sys.argv[2], ratio=20, seed=3, num_largest=4, workers=int(sys.argv[3]), progress=False)"


def test_the_same_run_writes_the_same_bytes_in_every_process(tmp_path):
    save_file(_model(tmp_path, rows=20_000), str(tmp_path / "m.safetensors"))
    shas = set()
    for i, workers in enumerate((1, 1, 2)):
        out = tmp_path / f"c{i}.safetensors"
        r = subprocess.run([sys.executable, "-c", _COMPRESS, str(tmp_path / "m.safetensors"), str(out), str(workers)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        shas.add(_sha(out))
    assert len(shas) == 1


_CAPPED = textwrap.dedent('''
    import resource, sys, torch, fpd_convert, fpd_convert.convert
    def vm_data():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    cap = vm_data() + int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    fpd_convert.decompress(sys.argv[1], sys.argv[2])
''')
_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA semantics are Linux's")
@pytest.mark.parametrize("container", ["safetensors", "pt"])
def test_decompress_needs_one_table_of_memory_not_all(tmp_path, container):
    rows, dim, tables = 400_000, 64, 4  # 102 MB a table, 410 MB in all
    state = _model(tmp_path, tables, rows, dim)
    src = tmp_path / f"m.{container}"
    (save_file(state, str(src)) if container == "safetensors" else torch.save(state, src))
    fpd_convert.compress(src, tmp_path / "c.safetensors", rank=4, num_largest=tables, progress=False)
    cap = 260 << 20  # well under the tables (410 MB), 2.5 tables
    out = tmp_path / f"back.{container}"
    r = subprocess.run([sys.executable, "-c", _CAPPED, str(tmp_path / "c.safetensors"), str(out), str(cap)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **_MALLOC})
    assert r.returncode == 0, r.stderr[-2000:]
    back = load_file(str(out)) if container == "safetensors" else torch.load(out, weights_only=True)
    model = fpd_convert.load(tmp_path / "c.safetensors")
    assert list(back) == list(state)  # the source's order
    for k in state:
        want = model.table(k).to_dense() if k.startswith("emb.") else state[k]
        torch.testing.assert_close(back[k], want, rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_to_dense_builds_in_the_dtype_asked(tmp_path):
    layer = fpd_convert.TTEmbeddingBag.from_dense(torch.randn(5000, 16), rank=4)
    full = layer.to_dense()
    half = layer.to_dense(dtype=torch.float16, chunk_rows=777)
    assert half.dtype == torch.float16 and torch.equal(half, full.half())


def test_the_dense_original_is_loaded_without_a_copy(tmp_path):
    """The source model's tables are the file's mapping (a .pt) or one copy (a .safetensors)."""
    from fpd_convert.checkpoints.lazy_tables import file_mapping_of
    from fpd_convert.bench.serve import demo_models
    dense, _ = demo_models(tmp_path)
    model = fpd_convert.load(tmp_path / "baseline.pt")
    big = model.emb_l[0].weight
    assert file_mapping_of(big) is not None  # the checkpoint's pages, not a copy
    assert big.requires_grad and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                       dense.state_dict().values()))
    with torch.no_grad():
        big.add_(1.0)  # a private mapping: writing to the model leaves the file as it was
    again = torch.load(tmp_path / "baseline.pt", weights_only=False)["state_dict"]["emb_l.0.weight"]
    assert torch.equal(again, dense.emb_l[0].weight)
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "b.safetensors"))
    st = fpd_convert.load(tmp_path / "b.safetensors")
    assert np.allclose(st.emb_l[0].weight.detach().numpy(), dense.emb_l[0].weight.detach().numpy())
    with torch.no_grad():
        st.emb_l[0].weight.add_(1.0)  # a copy of a read-only mapping: writable


def test_bench_memory_reports_compress_against_its_plan_and_decompress(tmp_path):
    # the benchmark of a multi-table dlrm checkpoint on disk: both steps run in their own process, and
    # what they report is what the targets are stated in
    out = subprocess.run([sys.executable, "-m", "fpd_convert", "bench", "--memory", "--rows", "3000", "--dim", "8",
                          "--folder", str(tmp_path), "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["tables"] == 26 and r["model_bytes"] > r["rows"] * 8 * 4
    assert r["compress"]["tables_compressed"] == 5 and r["compress"]["planned_peak_bytes"] > 0
    assert r["compress"]["peak_rss_bytes"] > r["process_baseline_rss_bytes"]
    assert r["decompress"]["peak_rss_bytes"] > 0 and r["decompress"]["limit_bytes"] > 2 * r["largest_table_bytes"]
    dcp = r["compress_dcp"]  # the same model as a DCP folder, the same tables and plan
    assert dcp["tables_compressed"] == 5 and dcp["planned_peak_bytes"] == r["compress"]["planned_peak_bytes"]
    assert dcp["added_over_plan"] > 0
    assert list(tmp_path.iterdir()) == []  # the files are removed
