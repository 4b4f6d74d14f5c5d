"""Streaming TT-SVD: accuracy against TensorLy, determinism, real files, memory caps."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import fpd_convert
from conftest import low_tt_rank_table
from fpd_convert.cli import main
from fpd_convert.tt import (clamp_ranks, decompose_table, factor_dims, factor_rows, relative_error,
                            streaming_tt_svd)


def stream(w, order=3, seed=0, chunk_bytes=1 << 20, **kw):
    n, d = w.shape
    rf, df = factor_rows(n, order), factor_dims(d, order)
    if "rank" in kw:
        kw["ranks"] = clamp_ranks(kw.pop("rank"), rf, df, warn=False)
    return streaming_tt_svd(lambda a, b: w[a:b], n, d, rf, df, seed=seed, chunk_bytes=chunk_bytes, **kw)


def trained_like(n, d, seed=0):
    """Rows drifted from a small init by popularity-dependent amounts, like a trained table."""
    g = np.random.default_rng(seed)
    w = g.normal(0, 0.01, (n, d))
    hot = g.choice(n, n // 20, replace=False)
    w[hot] += g.normal(0, 1.0, (len(hot), 4)) @ g.normal(0, 0.5, (4, d))
    return w.astype(np.float32)


@pytest.mark.parametrize("order,rank", [(2, 6), (3, 8), (4, 4)])
def test_streaming_error_within_2_percent_of_tensorly(order, rank):
    for w in (low_tt_rank_table(30_000, 32, rank, 0.3, order=order), trained_like(20_000, 16)):
        ref = decompose_table(w, rank=rank, order=order)
        st = stream(w, order=order, rank=rank)
        assert st.shape.ranks == ref.shape.ranks
        assert st.relative_error <= ref.relative_error * 1.02 + 1e-6
        # the error it reports is the real one
        assert st.relative_error == pytest.approx(relative_error(w, st.cores), rel=1e-3, abs=1e-4)


def test_a_streamed_ladder_is_one_set_of_passes_and_as_good_as_each_rank_alone():
    from fpd_convert.tt.streaming import streaming_tt_svd_ladder
    w = trained_like(20_000, 16)
    n, d = w.shape
    rf, df = factor_rows(n, 3), factor_dims(d, 3)
    lists = [clamp_ranks(r, rf, df, warn=False) for r in (2, 4, 8)]
    reads = []
    ladder = streaming_tt_svd_ladder(lambda a, b: w[a:b], n, d, rf, df, lists, seed=0, chunk_bytes=1 << 20,
                                     progress=reads.append)
    assert sum(reads) == 4 * n  # range, one power iteration (two passes), projection: for all three
    for ranks, dec in zip(lists, ladder):
        alone = stream(w, ranks=ranks)
        assert dec.shape.ranks == alone.shape.ranks
        assert dec.relative_error <= alone.relative_error + 5e-4  # a wider sketch: as good (TT-SVD is greedy)
        assert dec.relative_error == pytest.approx(relative_error(w, dec.cores), rel=1e-3, abs=1e-4)
    widest = stream(w, ranks=lists[-1])
    for x, y in zip(ladder[-1].cores, widest.cores):  # the largest rank list: the very same decomposition
        np.testing.assert_array_equal(x, y)


def test_streaming_tolerance_mode_meets_the_bound():
    w = low_tt_rank_table(20_000, 16, 6, 0.2)
    for eps in (0.3, 0.1):
        ref = decompose_table(w, tol=eps)
        st = stream(w, tol=eps)
        assert relative_error(w, st.cores) <= eps + 1e-4
        assert st.shape.param_count <= ref.shape.param_count * 1.1


def test_streaming_is_deterministic_by_seed():
    w = trained_like(20_000, 16, seed=3)
    a, b, c = stream(w, rank=8, seed=7), stream(w, rank=8, seed=7), stream(w, rank=8, seed=8)
    for x, y in zip(a.cores, b.cores):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a.cores, c.cores))


def test_chunking_does_not_change_the_result():
    w = low_tt_rank_table(20_000, 16, 4, 0.5)
    one = stream(w, rank=4, chunk_bytes=1 << 30)  # a single chunk
    many = stream(w, rank=4, chunk_bytes=1 << 16)  # one leading digit per chunk
    assert one.relative_error == pytest.approx(many.relative_error, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tables_stream_from_safetensors_and_pt(tmp_path, dtype):
    w = torch.from_numpy(low_tt_rank_table(40_000, 16, 6, 0.3)).to(dtype)
    save_file({"t.weight": w}, str(tmp_path / "m.safetensors"))
    torch.save({"t.weight": w}, tmp_path / "m.pt")
    errors = {}
    for src in ("m.safetensors", "m.pt"):
        for path in ("memory", "stream"):
            s = fpd_convert.compress(tmp_path / src, tmp_path / f"{src}.{path}.safetensors", rank=6, svd_path=path,
                                     progress=False)
            errors[src, path] = s.tables[0].relative_error
            assert s.tables[0].svd_path == path
    for src in ("m.safetensors", "m.pt"):
        assert errors[src, "stream"] <= errors[src, "memory"] * 1.02 + 1e-6
    out = load_file(str(tmp_path / "m.pt.stream.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in out.items() if ".tt_core." in k)


def test_compress_cli_stream_workers_and_memory_plan(tmp_path):
    save_file({f"t{i}.weight": torch.from_numpy(low_tt_rank_table(30_000, 16, 4, 0.3, seed=i)) for i in range(3)},
              str(tmp_path / "m.safetensors"))
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"c{workers}.safetensors"
        r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.safetensors"), "-o", str(out), "--yes",
                                      "--rank", "4", "--svd-path", "stream", "--workers", str(workers), "--json"])
        assert r.exit_code == 0, r.output
        assert "expected peak memory" in r.output and "3 streamed" in r.output
        results[workers] = load_file(str(out))
    # the same tables, choices and ids; values to float32 rounding: the streamed passes' matmuls sum in an order
    # that follows torch's threads (one worker gets the CPUs' threads, two share them; on a busy machine the
    # default's threads follow the load)
    assert results[1].keys() == results[2].keys()
    for k, v in results[1].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, results[2][k], rtol=1e-4, atol=1e-4 * float(v.abs().max()))
        else:
            assert torch.equal(v, results[2][k]), k


def test_the_input_file_is_untouched_by_streaming(tmp_path):
    w = torch.from_numpy(low_tt_rank_table(30_000, 16, 4, 0.3))
    save_file({"t.weight": w}, str(tmp_path / "m.safetensors"))
    before = (tmp_path / "m.safetensors").read_bytes()
    fpd_convert.compress(tmp_path / "m.safetensors", tmp_path / "c.safetensors", rank=4, svd_path="stream",
                         progress=False)
    assert (tmp_path / "m.safetensors").read_bytes() == before


def test_a_streamed_table_reports_each_pass_off_a_terminal(tmp_path, capsys):
    w = torch.from_numpy(low_tt_rank_table(30_000, 16, 4, 0.3))
    save_file({"t.weight": w}, str(tmp_path / "m.safetensors"))
    fpd_convert.compress(tmp_path / "m.safetensors", tmp_path / "c.safetensors", rank=4, svd_path="stream",
                         power_iters=1, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("TT-SVD t.weight: pass")]
    # one decomposition: the range pass, a power iteration's two passes and the projection pass
    assert [line.split(" over ")[0] for line in lines] == [f"TT-SVD t.weight: pass {k}/4" for k in range(1, 5)]
    assert "over 30,000 rows" in lines[0] and "ETA" in lines[-1]


_CAPPED = textwrap.dedent('''
    import resource, sys, torch, fpd_convert, fpd_convert.convert, tensorly, sklearn.metrics
    torch.randn(256, 256) @ torch.randn(256, 256)  # start the thread pool before the cap
    def vm_data():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    cap = vm_data() + int(sys.argv[3])  # what the compression may add to the process after its imports
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    s = fpd_convert.compress(sys.argv[1], sys.argv[1] + "." + sys.argv[2], rank=8, svd_path=sys.argv[2],
                             progress=False)
    print(s.tables[0].relative_error)
''')
# RLIMIT_DATA caps address space, which glibc's defaults inflate by chance: a 64 MB arena reserved per
# thread that first allocates, and a mmap threshold that rises after each large free (freed chunks then
# stay in the heap). One arena and a fixed 1 MB threshold make the cap count what the run holds: the
# streamed path's peak is then ~205 MB above the imports (2-core CPU, 2026-12-01), against ~290 MB with
# glibc's defaults, where the cap of 390 MB failed now and then on a busy machine.
_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA semantics are Linux's")
def test_a_table_larger_than_a_memory_cap_still_compresses(tmp_path):
    from fpd_convert.bench.svd import structured_rows, write_table_safetensors
    rows, dim = 1_600_000, 64  # 410 MB on disk
    src = tmp_path / "big.safetensors"
    write_table_safetensors(src, "t.weight", rows, dim, torch.float32, structured_rows(rows, dim))
    cap = 320 << 20  # less than the table, 1.5x the streamed path's peak, a seventh of the in-memory one's
    env = {**os.environ, **_MALLOC}
    runs = {}
    for path in ("stream", "memory"):
        runs[path] = subprocess.run([sys.executable, "-c", _CAPPED, str(src), path, str(cap)], capture_output=True,
                                    text=True, timeout=300, env=env)
    assert runs["stream"].returncode == 0, runs["stream"].stderr[-2000:]
    assert 0 < float(runs["stream"].stdout.strip().splitlines()[-1]) < 0.5
    assert runs["memory"].returncode != 0  # TensorLy on the whole table does not fit under the same cap


def test_bench_svd_runs_both_paths(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--svd", "--rows", "30000", "--dim", "16", "--rank", "8", "--folder",
                                  str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    by_path = {x["path"]: x for x in out["results"]}
    assert set(by_path) == {"memory", "stream"}
    for x in by_path.values():
        assert x["seconds"] > 0 and x["peak_rss_bytes"] > x["process_baseline_rss_bytes"] > 0
    assert by_path["stream"]["relative_error"] <= by_path["memory"]["relative_error"] * 1.02 + 1e-6
    assert list(tmp_path.iterdir()) == []  # the table and outputs are cleaned up


def test_bench_svd_refuses_a_folder_that_does_not_exist(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--svd", "--rows", "3000", "--folder", str(tmp_path / "missing")])
    assert r.exit_code != 0 and "does not exist" in r.output and not (tmp_path / "missing").exists()


def test_a_sketch_with_rows_added_is_the_sketch_of_the_table_with_them(rng):
    # a streamed layout with fewer exact rows: the base's sketch with the rows it zeroed put back, in its
    # subspace, equals Q^T of the table with those rows, and its errors are that table's, exactly
    from fpd_convert.tt import relative_error
    from fpd_convert.tt.streaming import stream_sketch
    n, d, rf, df = 3_000, 16, [15, 20, 10], [4, 2, 2]
    w = (rng.standard_normal((n, 6)) @ rng.standard_normal((6, d)) + 0.2 * rng.standard_normal((n, d))).astype(np.float32)
    pos = np.sort(rng.choice(n, 40, replace=False))
    zeroed = w.copy()
    zeroed[pos] = 0.0
    sk = stream_sketch(lambda a, b: zeroed[a:b], n, d, rf, df, width=24, chunk_bytes=1 << 16)
    back = sk.with_rows_added(pos, w[pos], chunk=16)
    first = w.reshape(15, 200, 4, 4).transpose(0, 2, 1, 3).reshape(60, -1)  # rows (i_1, p_1), columns (i_2.., p_2..)
    np.testing.assert_allclose(back.b.numpy(), sk.q.numpy().T @ first, atol=2e-4)
    assert back.norm_sq == pytest.approx(float(np.sum(w.astype(np.float64) ** 2)), rel=1e-6)
    for dec in back.decompositions([[1, 4, 4, 1], [1, 12, 8, 1]]):
        assert dec.relative_error == pytest.approx(relative_error(w, dec.cores), abs=1e-5)
    assert sk.decompositions([[1, 12, 8, 1]])[0].relative_error == pytest.approx(
        relative_error(zeroed, sk.decompositions([[1, 12, 8, 1]])[0].cores), abs=1e-5)
