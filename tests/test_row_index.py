"""The merged row-map / exact-row index: one lookup per batch, equal to searching each feature."""
import numpy as np
import pytest
import torch

from conftest import cuda
from fpd_convert.kernels import cpu_suffix
from fpd_convert.layers import TTEmbeddingBag
from fpd_convert.layers import row_index
from fpd_convert.layers.row_index import BitRank, build_row_index, row_codes
from fpd_convert.tt.importance import tt_positions


@pytest.mark.parametrize("num_rows", [1, 64, 65, 1000, 100_003])
def test_bit_rank_finds_what_searchsorted_finds(num_rows):
    g = np.random.default_rng(num_rows)
    ids = np.unique(np.concatenate([g.integers(0, num_rows, size=max(1, num_rows // 7)), [0, num_rows - 1]]))
    query = np.concatenate([g.integers(0, num_rows, size=500), [0, num_rows - 1, min(63, num_rows - 1)]])
    found, at = BitRank(ids, num_rows).find(query)
    ref_at = np.searchsorted(ids, query)
    ref_found = ids[np.minimum(ref_at, ids.size - 1)] == query
    assert (found == ref_found).all()
    assert (at[found] == ref_at[found]).all()


def test_popcount_without_numpy_2_counts_the_same():
    words = np.random.default_rng(0).integers(0, 2 ** 63, size=200, dtype=np.int64).view(np.uint64)
    words[:3] = [0, np.iinfo(np.uint64).max, 1]
    fallback = np.unpackbits(words.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
    assert (row_index._popcount(words) == fallback).all()


def test_exact_rows_win_over_the_map_and_codes_match_each_feature():
    hot = np.array([900, 3, 57])  # moves 900, 3, 57 to 0..2, and rows 0, 1, 2 away
    from_, to = (torch.from_numpy(a) for a in _moves(hot))
    exact = torch.tensor([1, 57, 500])  # 1 is displaced by the map, 57 is hot: exact wins both
    ids, codes = build_row_index(from_, to, exact)
    assert ids.tolist() == sorted(set(from_.tolist()) | set(exact.tolist()))
    query = torch.arange(1000)
    expect = torch.from_numpy(tt_positions(query.numpy(), hot))
    for k, e in enumerate(exact.tolist()):
        expect[e] = -1 - k
    rank = BitRank(ids.numpy(), 1000)
    for b in (rank, None):
        assert row_codes(ids, codes, query, b).tolist() == expect.tolist()


def _moves(hot):
    from fpd_convert.tt.importance import row_map_moves
    rows, pos = row_map_moves(hot)
    order = rows.argsort()
    return rows[order], pos[order]


def _layer(device="cpu"):
    torch.manual_seed(0)
    bag = TTEmbeddingBag(210, 6, rank=3, row_factors=[5, 7, 6], dim_factors=[1, 2, 3], mode="sum", device=device)
    bag.set_row_map(torch.tensor([100, 3, 57, 1]))
    bag.set_exact_rows(torch.tensor([0, 200, 57]), torch.randn(3, 6))  # 0 is displaced, 57 is hot
    return bag


def test_layer_with_overlapping_map_and_exact_rows_equals_its_dense_view():
    bag = _layer()
    dense = bag.to_dense()
    torch.testing.assert_close(dense[[0, 57, 200]], bag.exact_rows.detach())  # kept sorted by id
    ids = torch.tensor([57, 0, 100, 4, 3, 209, 200, 57])
    offsets = torch.tensor([0, 3, 5])
    for kernel in ("reference", "cpu"):
        bag.kernel = kernel
        with torch.no_grad():  # the cached end table
            out = bag(ids, offsets)
        ref = torch.nn.functional.embedding_bag(ids, dense, offsets, mode="sum")
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(bag(ids, offsets), ref)  # the differentiable path
    bag.to(torch.float64).to(torch.float32)  # device/dtype moves keep the index usable
    torch.testing.assert_close(bag(ids, offsets), ref)


def test_cpu_serving_with_map_and_exact_rows_equals_the_dense_view(monkeypatch):
    bag = _layer()
    bag.requires_grad_(False)
    dense = bag.to_dense()
    served = []
    real = TTEmbeddingBag.serves_from_end_table
    monkeypatch.setattr(TTEmbeddingBag, "serves_from_end_table",
                        lambda self, *a: served.append(real(self, *a)) or served[-1])
    for ids in (torch.tensor([57, 0, 100, 4, 3, 209, 200, 57]),  # exact rows (0, 57, 200) and mapped ones
                torch.tensor([100, 3, 4, 209, 3])):  # mapped, none exact
        want = torch.nn.functional.embedding(ids, dense)
        torch.testing.assert_close(bag(ids, torch.arange(ids.numel())), want)
        torch.testing.assert_close(bag(ids.view(-1, 1)), want)
        assert served[-1]
    assert bag.exact_rows.grad is None


@pytest.mark.parametrize("suffix_table", [True, False])
def test_cpu_training_paths_with_map_and_exact_rows_give_the_reference_gradients(suffix_table, monkeypatch):
    # the CPU path's two ways to differentiable rows (a suffix table per call, or shared prefixes)
    monkeypatch.setattr(cpu_suffix, "worthwhile", lambda cores, n: suffix_table)
    ids = torch.tensor([57, 0, 100, 4, 3, 209, 200, 57, 150])
    offsets = torch.tensor([0, 3, 5])
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    grads = []
    for kernel in ("reference", "cpu"):
        bag = _layer()
        bag.kernel = kernel
        (bag(ids, offsets) * g).sum().backward()
        grads.append([p.grad for p in (*bag.cores, bag.exact_rows)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@cuda
def test_cuda_layer_with_map_and_exact_rows_equals_cpu():
    cpu = _layer()
    gpu = _layer("cuda")
    with torch.no_grad():
        for c, g in zip(cpu.cores, gpu.cores):
            g.copy_(c)
        gpu.exact_rows.copy_(cpu.exact_rows)
    ids = torch.tensor([57, 0, 100, 4, 3, 209, 200, 57])
    offsets = torch.tensor([0, 3, 5])
    torch.testing.assert_close(gpu(ids.cuda(), offsets.cuda()).cpu(), cpu(ids, offsets), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_rows, k, clustered", [(60_000, 1_200, False), (60_000, 1_200, True), (50, 49, False),
                                                    (1_000, 1, False)])
def test_the_bucketed_search_of_traced_lookups_finds_what_searchsorted_finds(num_rows, k, clustered):
    # ONNX has no searchsorted (and inductor calls it out of its loops): traced lookups search a query's bucket
    from fpd_convert.layers import traced
    from fpd_convert.layers.row_index import index_buckets
    g = torch.Generator().manual_seed(k)
    if clustered:  # the hot rows of a row map can sit together
        ids = torch.unique(torch.cat([torch.arange(100, 100 + k // 2), torch.randint(0, num_rows, (k // 2,), generator=g)]))
    else:
        ids = torch.randperm(num_rows, generator=g)[:k].sort().values
    query = torch.cat([ids, torch.randint(0, num_rows, (5_000,), generator=g), torch.tensor([0, num_rows - 1])])
    starts, shift, depth = index_buckets(ids, num_rows)
    assert starts.numel() == (num_rows >> shift) + 2 and depth <= max(1, ids.numel()).bit_length()
    want_at = torch.searchsorted(ids, query).clamp(max=ids.numel() - 1)
    want_found = ids[want_at] == query
    found, at = traced._find_sorted(ids, query, (starts, shift, depth))
    assert torch.equal(found, want_found)
    assert torch.equal(at[found], want_at[found])
