"""Bags pooled in one pass for serving (kernels.triton_pooled) against nn.EmbeddingBag.

On a machine without a GPU the kernel runs in Triton's interpreter on CPU tensors (conftest),
and the layer takes the path when its kernel is set to "triton".
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpd_convert.layers.tt_embedding as tt_embedding_module
from conftest import cuda, needs_triton
from fpd_convert.kernels import triton_suffix
from fpd_convert.kernels.reference import tt_rows
from fpd_convert.layers import TTEmbeddingBag, TTIndexError, dedup
from test_kernels import SHAPES, make_cores

pytestmark = needs_triton


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _table(cores):
    n = cores[0].shape[1] * cores[1].shape[1] * cores[2].shape[1]
    with torch.no_grad():
        return tt_rows(cores, torch.arange(n, device=cores[0].device))


def _bags(n, seed, count=40):
    """Ids with repeats and bags of 0 to 9 entries (an empty one included), as offsets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n, (count,), generator=g)
    cuts = torch.sort(torch.randint(0, count + 1, (7,), generator=g)).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, cuts[-1:]])  # the last bag repeats: empty
    return ids, offsets


@pytest.mark.parametrize("row_factors,dim_factors,ranks", SHAPES)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_pooled_bags_equal_embedding_bag(row_factors, dim_factors, ranks, mode):
    from fpd_convert.kernels.triton_pooled import pooled_bags
    dev = _device()
    cores = [c.detach().to(dev) for c in make_cores(row_factors, dim_factors, ranks)]
    table = _table(cores)
    s = triton_suffix.suffix_table(cores[1], cores[2])
    ids, offsets = _bags(table.shape[0], seed=sum(row_factors))
    ids, offsets = ids.to(dev), offsets.to(dev)
    got = pooled_bags(cores, s, ids, mode, bounds=offsets)
    torch.testing.assert_close(got, F.embedding_bag(ids, table, offsets, mode=mode), rtol=1e-5, atol=1e-5)
    pad = int(ids[3])  # padding entries are left out of sums, means and maxima
    codes = torch.where(ids == pad, torch.full_like(ids, -(1 << 62)), ids)
    got = pooled_bags(cores, s, codes, mode, bounds=offsets, skip=-(1 << 62))
    torch.testing.assert_close(got, F.embedding_bag(ids, table, offsets, mode=mode, padding_idx=pad),
                               rtol=1e-5, atol=1e-5)
    if mode == "sum":
        w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3)).to(dev)
        got = pooled_bags(cores, s, ids, mode, bounds=offsets, weights=w)
        torch.testing.assert_close(got, F.embedding_bag(ids, table, offsets, mode=mode, per_sample_weights=w),
                                   rtol=1e-5, atol=1e-5)


def test_pooled_bags_fixed_length_last_offset_exact_rows_and_dtype():
    from fpd_convert.kernels.triton_pooled import pooled_bags
    dev = _device()
    cores = [c.detach().to(dev) for c in make_cores([4, 5, 6], [2, 4, 3], [1, 5, 6, 1])]
    table = _table(cores)
    s = triton_suffix.suffix_table(cores[1], cores[2])
    ids, offsets = (t.to(dev) for t in _bags(120, seed=7))
    for mode in ("sum", "max"):  # (B, L) input: fixed-length bags
        torch.testing.assert_close(pooled_bags(cores, s, ids, mode, bag_len=5),
                                   F.embedding_bag(ids.view(8, 5), table, mode=mode), rtol=1e-5, atol=1e-5)
    last = torch.cat([offsets.clamp(max=33), torch.tensor([33], device=dev)])  # include_last_offset: entries after 33 unused
    # the reference sees only the entries up to the last offset: PyTorch's own handling of the
    # others differs by device (CUDA pools them into the last bag, the CPU's mean counts them)
    torch.testing.assert_close(pooled_bags(cores, s, ids, "mean", bounds=last, include_last_offset=True),
                               F.embedding_bag(ids[:33], table, last, mode="mean", include_last_offset=True),
                               rtol=1e-5, atol=1e-5)
    exact = torch.randn(3, table.shape[1], device=dev)  # codes -1..-3 read exact rows 0..2
    codes = torch.where(ids % 4 == 0, -1 - ids % 3, ids)
    want = F.embedding_bag(torch.where(ids % 4 == 0, 120 + ids % 3, ids), torch.cat([table, exact]), offsets,
                           mode="sum")
    torch.testing.assert_close(pooled_bags(cores, s, codes, "sum", bounds=offsets, exact_rows=exact), want,
                               rtol=1e-5, atol=1e-5)
    half = pooled_bags(cores, s, ids, "sum", bounds=offsets, out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), F.embedding_bag(ids, table, offsets, mode="sum"), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="only supported for mode='sum'"):
        pooled_bags(cores, s, ids, "mean", bounds=offsets, weights=torch.ones(ids.shape, device=dev))
    with pytest.raises(ValueError, match="either bounds"):
        pooled_bags(cores, s, ids, "sum")


@pytest.fixture
def pooled_calls(monkeypatch):
    """The kernel wrapped to count its calls (it still does the work)."""
    calls = []
    real = tt_embedding_module.pooled_bags

    def counted(*args, **kwargs):
        calls.append(kwargs.get("mode", args[3] if len(args) > 3 else None))
        return real(*args, **kwargs)
    monkeypatch.setattr(tt_embedding_module, "pooled_bags", counted)
    return calls


def _served_bag(mode, padding_idx=None, include_last_offset=False, **kwargs):
    torch.manual_seed(0)
    bag = TTEmbeddingBag(120, 24, rank=5, row_factors=[4, 5, 6], dim_factors=[2, 4, 3], mode=mode,
                         padding_idx=padding_idx, include_last_offset=include_last_offset, device=_device(), **kwargs)
    bag.kernel = "triton"
    dense = nn.EmbeddingBag.from_pretrained(bag.to_dense(), mode=mode, padding_idx=padding_idx,
                                            include_last_offset=include_last_offset)
    return bag, dense


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 7])
def test_layer_serves_bags_in_one_pass_like_embedding_bag(mode, padding_idx, pooled_calls):
    dev = _device()
    bag, dense = _served_bag(mode, padding_idx)
    ids, offsets = (t.to(dev) for t in _bags(120, seed=11))
    ids[[2, 30]] = 7
    with torch.no_grad():
        cases = [(ids, offsets, None), (ids.int(), offsets.int(), None), (ids.view(8, 5), None, None),
                 (ids[:6], torch.arange(6, device=dev), None)]  # one-hot bags
        if mode == "sum":
            cases.append((ids, offsets, torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)).to(dev)))
        for x, o, w in cases:
            torch.testing.assert_close(bag(x, o, per_sample_weights=w), dense(x, o, per_sample_weights=w),
                                       rtol=1e-5, atol=1e-5)
    assert len(pooled_calls) == len(cases)


def test_layer_serves_with_last_offset_row_map_and_exact_rows(pooled_calls):
    dev = _device()
    bag, _ = _served_bag("mean", include_last_offset=True)
    bag.set_row_map(torch.tensor([100, 3, 57, 11]))
    exact = torch.randn(2, 24)
    bag.set_exact_rows(torch.tensor([57, 5]), exact)
    bag.requires_grad_(False)  # frozen: served in one pass even with gradients on
    dense = nn.EmbeddingBag.from_pretrained(bag.to_dense(), mode="mean", include_last_offset=True)
    torch.testing.assert_close(dense.weight[[57, 5]], exact.to(dev))
    ids, offsets = (t.to(dev) for t in _bags(120, seed=13))
    ids[[0, 9, 17]] = torch.tensor([57, 5, 100], device=dev)
    offsets = torch.cat([offsets, torch.tensor([ids.numel()], device=dev)])
    torch.testing.assert_close(bag(ids, offsets), dense(ids, offsets), rtol=1e-5, atol=1e-5)
    assert len(pooled_calls) == 1


def test_one_pass_is_skipped_for_training_and_for_bad_offsets(pooled_calls):
    dev = _device()
    bag, dense = _served_bag("sum")
    ids, offsets = (t.to(dev) for t in _bags(120, seed=17))
    out = bag(ids, offsets)  # training: the dedup path, whose backward sums per distinct id
    assert out.requires_grad and not pooled_calls
    with torch.no_grad():
        torch.testing.assert_close(bag(ids, offsets), out.detach())
        assert len(pooled_calls) == 1
        bad = ids.clone()
        bad[4] = 120
        with pytest.raises(TTIndexError, match="index 120 is out of range"):
            bag(bad, offsets)
        if dev == "cpu":  # offsets nn.EmbeddingBag refuses: its own error (checked on the CPU)
            late = offsets.clone()
            late[0] = 1
            with pytest.raises(RuntimeError) as want:
                dense(ids, late)
            with pytest.raises(RuntimeError) as got:
                bag(ids, late)
            assert str(got.value) == str(want.value)
        with pytest.raises(NotImplementedError, match="only supported for mode='sum'"):  # PyTorch's error
            _served_bag("mean")[0](ids, offsets, per_sample_weights=torch.ones(ids.shape, device=dev))
    assert len(pooled_calls) == 1


@pytest.mark.parametrize("device_dedup", [False, True])
def test_grouped_lookups_serve_in_one_pass(device_dedup, pooled_calls, monkeypatch):
    from fpd_convert.layers.grouped import GroupedLookups
    monkeypatch.setattr(dedup, "device_dedup", lambda input: device_dedup)
    dev = _device()
    bags = [_served_bag(m)[0] for m in ("sum", "mean")]
    ids, offsets = (t.to(dev) for t in _bags(120, seed=19))
    one_hot = ids[:9]
    calls = [(bags[0], one_hot, torch.arange(9, device=dev), None), (bags[1], ids, offsets, None),
             (nn.EmbeddingBag(10, 24, mode="sum").to(dev), one_hot % 10, torch.arange(9, device=dev), None)]
    with torch.no_grad():
        grouped = GroupedLookups(calls)
        assert [s is not None and s.pooled is not None for s in grouped._started] == [True, True, False]
        got = grouped.results()
        want = [m(x, o) for m, x, o, _ in calls]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        bad = ids.clone()
        bad[1] = -2
        with pytest.raises(TTIndexError, match="index -2 is out of range"):
            GroupedLookups([calls[0], (bags[1], bad, offsets, None)]).results()
    assert len(pooled_calls) == 2 + 2 + 1  # grouped, one by one, and the good table before the bad one


@cuda
def test_cuda_auto_path_serves_in_one_pass(pooled_calls):
    bag = TTEmbeddingBag(100_000, 64, rank=16, mode="sum", device="cuda")
    ids = torch.randint(0, 100_000, (4096,), device="cuda")
    offsets = torch.arange(0, 4096, 2, device="cuda")
    with torch.no_grad():
        out = bag(ids, offsets)
        assert len(pooled_calls) == 1
        bag.kernel = "reference"
        torch.testing.assert_close(out, bag(ids, offsets), rtol=1e-4, atol=1e-5)
