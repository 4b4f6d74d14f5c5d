import itertools

import numpy as np
import pytest
import torch
from torch import nn

import fpd_convert.layers.tt_table as tt_table_module
from fpd_convert.layers import dedup
from fpd_convert.layers import TTEmbedding, TTEmbeddingBag, TTIndexError, tt_rows
from conftest import cuda

N, D = 1000, 16


def make_bag(mode="sum", **kw):
    torch.manual_seed(0)
    bag = TTEmbeddingBag.from_dense(torch.randn(N, D), mode=mode, rank=6, **kw)
    ref = nn.EmbeddingBag.from_pretrained(bag.to_dense(), mode=mode, freeze=False, **kw)
    return bag, ref


def batch(int_dtype=torch.int64, empty_bags=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, N, (40,), generator=g).to(int_dtype)
    x[:5] = x[5]  # repeated ids: deduplication must not change results
    offsets = torch.tensor([0, 3, 3, 10, 25, 25, 39] if empty_bags else [0, 3, 10, 25, 39], dtype=int_dtype)
    return x, offsets


@pytest.mark.parametrize("mode,int_dtype,include_last_offset,padding_idx",
                         list(itertools.product(["sum", "mean", "max"], [torch.int32, torch.int64], [False, True],
                                                [None, 7])))
def test_bag_parity_1d_offsets(mode, int_dtype, include_last_offset, padding_idx):
    bag, ref = make_bag(mode, include_last_offset=include_last_offset, padding_idx=padding_idx)
    x, offsets = batch(int_dtype)
    x[10] = 7
    if include_last_offset:
        offsets = torch.cat([offsets, torch.tensor([len(x)], dtype=int_dtype)])
    torch.testing.assert_close(bag(x, offsets), ref(x, offsets), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,int_dtype,include_last_offset,padding_idx",
                         list(itertools.product(["sum", "mean", "max"], [torch.int32, torch.int64], [False, True],
                                                [None, 7])))
def test_bag_parity_without_gradients_from_ids_in_any_order(mode, int_dtype, include_last_offset, padding_idx,
                                                            monkeypatch):
    # without gradients the CPU rows come from the end table, which takes ids in any order: the dedup
    # has no sort (kernels/cpu_dedup.py); values must not change, with a row map and exact rows too
    bag, ref = make_bag(mode, include_last_offset=include_last_offset, padding_idx=padding_idx)
    x, offsets = batch(int_dtype)
    x[10] = 7
    if include_last_offset:
        offsets = torch.cat([offsets, torch.tensor([len(x)], dtype=int_dtype)])
    calls = []
    real = dedup.distinct_ids
    monkeypatch.setattr(dedup, "distinct_ids", lambda ids, limit: calls.append(limit) or real(ids, limit))
    weights = torch.rand(len(x)) if mode == "sum" else None
    with torch.no_grad():
        torch.testing.assert_close(bag(x, offsets, weights), ref(x, offsets, weights), atol=1e-5, rtol=1e-5)
        assert calls == [N]
        hot = torch.tensor([x[3].item(), 999, 7, x[20].item()])
        bag.set_row_map(hot[:2])
        bag.set_exact_rows(hot[2:], torch.randn(2, D))
        mapped = nn.EmbeddingBag.from_pretrained(bag.to_dense(), mode=mode, include_last_offset=include_last_offset,
                                                 padding_idx=padding_idx)
        torch.testing.assert_close(bag(x, offsets, weights), mapped(x, offsets, weights), atol=1e-5, rtol=1e-5)
        with pytest.raises(TTIndexError, match=f"index {N} is out of range"):
            bag(torch.cat([x[:-1], torch.tensor([N], dtype=int_dtype)]), offsets)
        emb = TTEmbedding.from_dense(torch.randn(N, D), rank=6, padding_idx=padding_idx)
        dense = nn.Embedding.from_pretrained(emb.to_dense(), padding_idx=padding_idx)
        torch.testing.assert_close(emb(x.view(8, 5)), dense(x.view(8, 5)), atol=1e-5, rtol=1e-5)
    assert len(calls) == 4


@pytest.mark.parametrize("mode,kernel,padding_idx",
                         list(itertools.product(["sum", "mean", "max"], ["reference", "cpu"], [None, 7])))
def test_entries_after_the_last_offset_belong_to_no_bag(mode, kernel, padding_idx):
    # include_last_offset with entries after the last offset: PyTorch 2.13's CPU embedding_bag
    # backward reads uninitialized memory for them (and its mean counts them); the layer leaves them
    # out of every bag, in values and gradients, as the same bags without those entries
    bag, _ = make_bag(mode, include_last_offset=True, padding_idx=padding_idx)
    bag.kernel = kernel
    x, offsets = batch()
    x[10] = 7
    offsets = torch.cat([offsets[:-1], torch.tensor([33, 33])])  # entries 33..39 trail
    trimmed, _ = make_bag(mode, padding_idx=padding_idx)
    want = trimmed(x[:33], offsets[:-1])
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    want_grads = torch.autograd.grad((want * g).sum(), list(trimmed.cores))
    for _ in range(3):  # the bug was not deterministic: look more than once
        out = bag(x, offsets)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        for a, b in zip(torch.autograd.grad((out * g).sum(), list(bag.cores)), want_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bag_parity_2d(mode):
    bag, ref = make_bag(mode)
    x = torch.randint(0, N, (8, 5))
    torch.testing.assert_close(bag(x), ref(x), atol=1e-5, rtol=1e-5)


def test_bag_parity_per_sample_weights():
    bag, ref = make_bag("sum")
    x, offsets = batch()
    w = torch.rand(len(x))
    torch.testing.assert_close(bag(x, offsets, w), ref(x, offsets, w), atol=1e-5, rtol=1e-5)
    x2 = torch.randint(0, N, (4, 3))
    w2 = torch.rand(4, 3)
    torch.testing.assert_close(bag(x2, None, w2), ref(x2, None, w2), atol=1e-5, rtol=1e-5)


def test_empty_input_and_empty_bags():
    bag, ref = make_bag("mean")
    x = torch.zeros(0, dtype=torch.long)
    offsets = torch.tensor([0, 0, 0])
    out = bag(x, offsets)
    assert out.shape == (3, D) and torch.equal(out, ref(x, offsets))


@pytest.mark.parametrize("bad", [N, N + 5, -1])
def test_out_of_range_names_index_and_size(bad):
    bag, _ = make_bag()
    with pytest.raises(IndexError, match=f"index {bad} is out of range for a table of {N} rows"):
        bag(torch.tensor([1, bad, 2]), torch.tensor([0]))
    assert issubclass(TTIndexError, RuntimeError)  # what nn.EmbeddingBag raises


def test_same_errors_as_torch_for_bad_calls():
    bag, ref = make_bag("mean")
    x, offsets = batch()
    cases = [
        lambda m: m(x.float(), offsets),                        # float indices
        lambda m: m(x.reshape(2, 20), offsets),                 # 2D input with offsets
        lambda m: m(x, None),                                   # 1D input without offsets
        lambda m: m(x, offsets, torch.rand(len(x))),            # per_sample_weights with mode mean
        lambda m: m(x, offsets + 1),                            # offsets[0] != 0
    ]
    for case in cases:
        with pytest.raises(Exception) as ours:
            case(bag)
        with pytest.raises(Exception) as theirs:
            case(ref)
        assert isinstance(ours.value, type(theirs.value)), (ours.value, theirs.value)


def test_embedding_parity_and_padding():
    torch.manual_seed(0)
    emb = TTEmbedding.from_dense(torch.randn(N, D), rank=6, padding_idx=3)
    ref = nn.Embedding.from_pretrained(emb.to_dense(), freeze=False, padding_idx=3)
    x = torch.tensor([[1, 3, 999], [3, 3, 0]])
    torch.testing.assert_close(emb(x), ref(x))
    assert emb(torch.tensor(5)).shape == (D,)
    emb(x).sum().backward()
    # gradient reaches the cores, but not through the padding row: rows 0,1,999 only.
    grad_rows = torch.autograd.functional.jacobian(lambda *c: tt_rows(list(c), torch.tensor([3])),
                                                   tuple(emb.cores))
    assert all(g.abs().sum() > 0 for g in grad_rows)
    emb2 = TTEmbedding.from_dense(emb.to_dense(), rank=6, padding_idx=3)
    emb2(torch.tensor([3, 3])).sum().backward()
    assert all(torch.count_nonzero(c.grad) == 0 for c in emb2.cores)
    with pytest.raises(IndexError, match="out of range"):
        emb(torch.tensor([N]))


def test_padding_idx_gets_no_gradient_in_bag():
    bag, _ = make_bag("sum", padding_idx=2)
    bag(torch.tensor([2, 2, 2]), torch.tensor([0])).sum().backward()
    assert all(torch.count_nonzero(c.grad) == 0 for c in bag.cores)


def test_core_gradients_match_dense_path():
    bag, _ = make_bag("sum")
    x, offsets = batch()
    bag(x, offsets).pow(2).sum().backward()
    ours = [c.grad.clone() for c in bag.cores]
    for c in bag.cores:
        c.grad = None
    dense = tt_rows(list(bag.cores), torch.arange(N))  # differentiable full table
    nn.functional.embedding_bag(x, dense, offsets, mode="sum").pow(2).sum().backward()
    for a, b in zip(ours, bag.cores):
        torch.testing.assert_close(a, b.grad, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64():
    torch.manual_seed(0)
    bag = TTEmbeddingBag(60, 6, rank=3, mode="mean", dtype=torch.float64)
    emb = TTEmbedding(60, 6, rank=[2, 3], dtype=torch.float64)
    x = torch.tensor([0, 5, 5, 59, 17, 33])
    offsets = torch.tensor([0, 2, 2, 4])

    def f_bag(*cores):
        return nn.functional.embedding_bag(x, tt_rows(list(cores), torch.arange(60)), offsets, mode="mean")

    assert torch.autograd.gradcheck(lambda *c: _with_cores(bag, c)(x, offsets), tuple(bag.cores))
    assert torch.autograd.gradcheck(lambda *c: _with_cores(emb, c)(x), tuple(emb.cores))
    assert torch.autograd.gradcheck(f_bag, tuple(bag.cores))


def test_tt_embedding_shapes_and_gradients_match_nn_embedding_on_its_rows():
    # a gather of the distinct ids' rows (not F.embedding) when there is no padding: same values,
    # shapes (0-d, empty, 2D) and gradients as nn.Embedding over the TT's full table
    torch.manual_seed(0)
    emb = TTEmbedding(60, 6, rank=3)
    for x in [torch.tensor(5), torch.zeros(0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long),
              torch.tensor([[1, 2, 2], [59, 0, 1]])]:
        cores = [c.detach().clone().requires_grad_() for c in emb.cores]
        ref = nn.functional.embedding(x, tt_rows(cores, torch.arange(60)))
        out = emb(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        if not x.numel():  # nothing looked up: no graph, as before
            continue
        up = torch.randn(out.shape)
        out.backward(up)
        ref.backward(up)
        for c, r in zip(emb.cores, cores):
            torch.testing.assert_close(c.grad if c.grad is not None else torch.zeros_like(c), r.grad, atol=1e-5, rtol=1e-4)
            c.grad = None


def _with_cores(module, cores):
    """The module with its parameters swapped for gradcheck's inputs."""
    return lambda *a: torch.func.functional_call(module, {f"cores.{j}": c for j, c in enumerate(cores)}, a)


def test_dedup_and_no_full_table():
    # 10^9 rows x 64: a dense table would need 256 GB; the TT lookup must not build it.
    bag = TTEmbeddingBag(10 ** 9, 64, rank=8, mode="sum")
    seen = []
    original = tt_table_module.lookup_rows
    tt_table_module.lookup_rows = lambda cores, idx, *a, **k: seen.append(idx.numel()) or original(cores, idx, *a, **k)
    try:
        out = bag(torch.tensor([5, 10 ** 9 - 1, 5, 5, 123]), torch.tensor([0, 2]))
    finally:
        tt_table_module.lookup_rows = original
    assert out.shape == (2, 64) and torch.isfinite(out).all()
    assert seen == [3]  # three unique ids, not five lookups
    assert bag.param_count() == sum(p.numel() for p in bag.parameters())


def test_row_cache_bytes_bounds_and_turns_off_the_inference_cache():
    bag, ref = make_bag("sum")
    x = torch.randint(0, N, (30,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cached = bag(x, torch.arange(30))
        assert bag._row_cache._table is not None and bag.row_cache_bytes == 256 << 20
        bag.row_cache_bytes = 0  # off: the shared-prefix path, same values
        assert bag._row_cache._table is None
        torch.testing.assert_close(bag(x, torch.arange(30)), cached, atol=1e-5, rtol=1e-5)
        assert bag._row_cache._table is None
    torch.testing.assert_close(cached, ref(x, torch.arange(30)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="row_cache_bytes"):
        bag.row_cache_bytes = -1


def test_exact_rows_are_not_looked_up_in_the_tt():
    bag = TTEmbeddingBag(1000, 8, rank=4, mode="sum")
    bag.set_exact_rows(torch.tensor([7, 500]), torch.ones(2, 8))
    seen = []
    original = tt_table_module.lookup_rows
    tt_table_module.lookup_rows = lambda cores, idx, *a, **k: seen.append(idx.tolist()) or original(cores, idx, *a, **k)
    try:
        only_exact = bag(torch.tensor([500, 7, 7]), torch.tensor([0, 1]))
        mixed = bag(torch.tensor([500, 3, 7, 999]), torch.tensor([0, 2]))
    finally:
        tt_table_module.lookup_rows = original
    assert seen == [[3, 999]]  # the first batch needed no TT row; the second only its two other ids
    torch.testing.assert_close(only_exact, torch.stack([torch.ones(8), 2 * torch.ones(8)]))
    dense = bag.to_dense()
    torch.testing.assert_close(mixed, torch.stack([dense[500] + dense[3], dense[7] + dense[999]]))


@pytest.mark.parametrize("int_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", [1, 2, 1000, 70_000])
def test_packed_unique_equals_numpy_unique(n, int_dtype):
    ids = torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(n)).to(int_dtype)
    uniq, inverse = dedup.unique_sorted(ids, 5000)
    ref_u, ref_inv = np.unique(ids.numpy(), return_inverse=True)
    assert uniq.tolist() == ref_u.tolist() and inverse.tolist() == ref_inv.reshape(-1).tolist()
    big = ids.long() * (10 ** 15)  # keys would overflow int64: falls back to np.unique
    uniq, inverse = dedup.unique_sorted(big, 5000 * 10 ** 15)
    torch.testing.assert_close(uniq[inverse], big)


@pytest.mark.parametrize("n", [1, 7, 3000])
def test_one_sync_device_dedup_equals_numpy_unique(n):
    # the GPU's dedup (sort, runs, one read of count/range/probe) is plain torch: checked here on CPU tensors
    ids = torch.randint(3, 900, (n,), generator=torch.Generator().manual_seed(n))
    uniq, inverse, lo, hi, probe = dedup.unique_device(ids, 1000, torch.tensor(n > 5))
    ref_u, ref_inv = np.unique(ids.numpy(), return_inverse=True)
    assert uniq.tolist() == ref_u.tolist() and inverse.tolist() == ref_inv.reshape(-1).tolist()
    assert uniq.dtype == ids.dtype and (lo, hi, probe) == (int(ids.min()), int(ids.max()), n > 5)
    assert dedup.unique_device(ids, 1000)[4] is None


@pytest.mark.parametrize("mode,include_last_offset", list(itertools.product(["sum", "mean", "max"], [False, True])))
def test_one_hot_bags_equal_embedding_bag(mode, include_last_offset):
    bag, ref = make_bag(mode, include_last_offset=include_last_offset)
    x = torch.randint(0, N, (50,), generator=torch.Generator().manual_seed(3))
    one_hot = torch.arange(51 if include_last_offset else 50)
    torch.testing.assert_close(bag(x, one_hot), ref(x, one_hot), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bag(x.view(50, 1)), ref(x.view(50, 1)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="offsets has to be None"):  # PyTorch's error, one-hot or not
        bag(x.view(50, 1), one_hot)
    # as many offsets as ids, but with an empty bag: not one-hot, pooled as usual
    not_one_hot = one_hot.clone()
    not_one_hot[5] = 4
    torch.testing.assert_close(bag(x, not_one_hot), ref(x, not_one_hot), atol=1e-5, rtol=1e-5)
    bag(x, one_hot).sum().backward()  # the gather path is differentiable
    assert bag.cores[1].grad.abs().sum() > 0


@pytest.mark.parametrize("mode,include_last_offset,int_dtype",
                         list(itertools.product(["sum", "max"], [False, True], [torch.int32, torch.int64])))
def test_cpu_serving_from_the_end_table_equals_the_general_path(mode, include_last_offset, int_dtype, monkeypatch):
    bag, ref = make_bag(mode, include_last_offset=include_last_offset)
    bag.requires_grad_(False)
    served = []  # whether each lookup was served from the end table
    real = TTEmbeddingBag.serves_from_end_table
    monkeypatch.setattr(TTEmbeddingBag, "serves_from_end_table",
                        lambda self, *a: served.append(real(self, *a)) or served[-1])
    x = torch.randint(0, N, (50,), generator=torch.Generator().manual_seed(3)).to(int_dtype)
    one_hot = torch.arange(51 if include_last_offset else 50, dtype=int_dtype)
    for args in ((x, one_hot), (x.view(50, 1),)):
        torch.testing.assert_close(bag(*args), ref(*args), atol=1e-5, rtol=1e-5)
        assert served[-1]  # no gradient, one id a bag, no weights or padding: served
    for bad in (1000, -2):  # the dedup finds them (no range pass of its own); the message is the layer's
        with pytest.raises(TTIndexError, match=f"index {bad} is out of range"):
            bag(torch.tensor([3, bad], dtype=int_dtype), one_hot[:3] if include_last_offset else one_hot[:2])
    from fpd_convert.kernels import cpu_dedup  # a table too long for the dedup's map: sorted instead
    monkeypatch.setattr(cpu_dedup, "MAX_ROWS", N - 1)
    torch.testing.assert_close(bag(x, one_hot), ref(x, one_hot), atol=1e-5, rtol=1e-5)
    with pytest.raises(TTIndexError, match="index -2 is out of range"):
        bag(torch.tensor([3, -2], dtype=int_dtype), one_hot[:3] if include_last_offset else one_hot[:2])
    assert served[-1]
    monkeypatch.undo()
    monkeypatch.setattr(TTEmbeddingBag, "serves_from_end_table",
                        lambda self, *a: served.append(real(self, *a)) or served[-1])
    with pytest.raises(RuntimeError, match="scalar types"):
        bag(x.float(), one_hot)
    # what it leaves to the general path: several ids a bag, weights, gradients, an empty batch
    not_one_hot = torch.tensor([0, 2, 10] + ([50] if include_last_offset else []), dtype=int_dtype)
    torch.testing.assert_close(bag(x, not_one_hot), ref(x, not_one_hot), atol=1e-5, rtol=1e-5)
    assert not served[-1]
    if mode == "sum":
        bag(x, one_hot, per_sample_weights=torch.rand(50))
        assert not served[-1]
    bag.requires_grad_(True)
    bag(x, one_hot).sum().backward()
    assert not served[-1] and bag.cores[0].grad is not None
    with torch.no_grad():
        assert bag(x[:0], one_hot[:1] if include_last_offset else one_hot[:0]).shape == (0, D)
        assert not served[-1]
        from fpd_convert.layers.grouped import GroupedLookups  # a model's grouped lookups serve it too
        asked = len(served)
        torch.testing.assert_close(GroupedLookups([(bag, x, one_hot, None)]).results()[0], ref(x, one_hot),
                                   atol=1e-5, rtol=1e-5)
        assert served[asked:] == [True]  # asked once, by the group, which then serves it


@cuda
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_cuda_one_hot_bags_gather_and_train_like_embedding_bag(mode):
    bag, ref = make_bag(mode)
    bag, ref = bag.cuda(), ref.cuda()
    x = torch.randint(0, N, (50,), generator=torch.Generator().manual_seed(3)).cuda()
    for offsets in (torch.arange(50, device="cuda"), torch.tensor([0, 0, 7, 9], device="cuda")):  # one-hot, not
        torch.testing.assert_close(bag(x, offsets), ref(x, offsets), atol=1e-5, rtol=1e-5)
        bag.zero_grad()
        bag(x, offsets).square().sum().backward()
        want = [g.clone() for g in torch.autograd.grad(_reference_loss(bag, x, offsets), list(bag.cores))]
        for c, w in zip(bag.cores, want):
            torch.testing.assert_close(c.grad, w, atol=1e-4, rtol=1e-3)
    with pytest.raises(IndexError, match="out of range"):  # the range check reads the one-hot probe too
        bag(torch.tensor([1, N], device="cuda"), torch.tensor([0, 1], device="cuda"))


def _reference_loss(bag, x, offsets):
    kernel, bag.kernel = bag.kernel, "reference"
    try:
        return bag(x, offsets).square().sum()
    finally:
        bag.kernel = kernel


def test_random_init_has_requested_scale():
    bag = TTEmbeddingBag(100_000, 32, rank=16, init_std=0.05)
    rows = tt_rows(list(bag.cores), torch.arange(0, 100_000, 7))
    assert 0.03 < rows.std().item() < 0.08


def test_from_embedding_keeps_options():
    src = nn.EmbeddingBag(500, 8, mode="max", include_last_offset=True, padding_idx=4)
    bag = TTEmbeddingBag.from_embedding(src, rank=4)
    assert (bag.mode, bag.include_last_offset, bag.padding_idx) == ("max", True, 4)
    assert "ranks=[1, 4, 4, 1]" in repr(bag) and "mode='max'" in repr(bag)
    with pytest.raises(ValueError, match="max_norm"):
        TTEmbeddingBag.from_embedding(nn.EmbeddingBag(50, 4, max_norm=1.0), rank=2)
    emb = TTEmbedding.from_embedding(nn.Embedding(500, 8, padding_idx=1), rank=4)
    assert emb.padding_idx == 1 and emb.reconstruction_error is not None
    frozen = TTEmbeddingBag.from_pretrained(torch.randn(50, 4), rank=2)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="mode"):
        TTEmbeddingBag(10, 4, mode="avg")
    with pytest.raises(ValueError, match="padding_idx"):
        TTEmbeddingBag(10, 4, padding_idx=10)
    with pytest.raises(ValueError, match=">= 1"):
        TTEmbedding(0, 4)


def test_cpu_autocast_bf16():
    bag, ref = make_bag("sum")
    x, offsets = batch()
    w = torch.rand(len(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bag(x, offsets, w)
    torch.testing.assert_close(out.float(), ref(x, offsets, w), atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert all(c.grad is not None and c.grad.dtype == torch.float32 for c in bag.cores)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_parity_and_autocast(dtype):
    bag, ref = make_bag("sum")
    bag, ref = bag.cuda(), ref.cuda()
    x, offsets = batch()
    x, offsets = x.cuda(), offsets.cuda()
    torch.testing.assert_close(bag(x, offsets), ref(x, offsets), atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=dtype):
        out = bag(x, offsets)
    torch.testing.assert_close(out.float(), ref(x, offsets), atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert all(c.grad is not None for c in bag.cores)
    with pytest.raises(IndexError, match="out of range"):
        bag(torch.tensor([N], device="cuda"), torch.tensor([0], device="cuda"))


def _grouped_calls(device):
    """Three TT bags (one-hot, pooled with weights, mean) and a dense bag, with their inputs."""
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(5)
    tables = [TTEmbeddingBag(N, D, rank=4, mode="sum"), TTEmbeddingBag(N, D, rank=4, mode="sum"),
              nn.EmbeddingBag(50, D, mode="sum"), TTEmbeddingBag(N, D, rank=4, mode="mean")]
    one_hot = torch.randint(0, N, (30,), generator=g)
    pooled, offsets = batch()
    calls = [(tables[0], one_hot, torch.arange(30), None),
             (tables[1], pooled, offsets, torch.rand(pooled.numel(), generator=g)),
             (tables[2], torch.randint(0, 50, (30,), generator=g), torch.arange(30), None),
             (tables[3], pooled, offsets, None)]
    return [tuple(t.to(device) if t is not None else None for t in c) for c in calls]


def _one_by_one(calls):
    return [m(x, o) if w is None else m(x, o, per_sample_weights=w) for m, x, o, w in calls]


@pytest.mark.parametrize("device_dedup", [False, True])
def test_grouped_lookups_equal_one_by_one(monkeypatch, device_dedup):
    from fpd_convert.layers.grouped import GroupedLookups
    # device_dedup: the GPU's split (launch all dedups, read all counts at once) on CPU tensors
    monkeypatch.setattr(dedup, "device_dedup", lambda input: device_dedup)
    calls = _grouped_calls("cpu")
    grouped = GroupedLookups(calls)
    started = [s for s in grouped._started if s is not None]
    assert all((s.launched is not None) == device_dedup for s in started)
    got, want = grouped.results(), _one_by_one(calls)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    sum(o.square().sum() for o in got).backward()  # gradients flow to every table
    assert all(c[0].weight.grad is not None if isinstance(c[0], nn.EmbeddingBag)
               else c[0].cores[0].grad.abs().sum() > 0 for c in calls)


@pytest.mark.parametrize("device_dedup", [False, True])
def test_grouped_lookups_raise_the_bad_tables_index_error(monkeypatch, device_dedup):
    from fpd_convert.layers.grouped import GroupedLookups
    monkeypatch.setattr(dedup, "device_dedup", lambda input: device_dedup)
    calls = _grouped_calls("cpu")
    bad = calls[3][1].clone()
    bad[2] = N + 3
    calls[3] = (calls[3][0], bad, calls[3][2], None)
    with pytest.raises(TTIndexError, match=f"index {N + 3} is out of range"):
        GroupedLookups(calls).results()


@cuda
def test_cuda_grouped_lookups_equal_one_by_one():
    from fpd_convert.layers.grouped import GroupedLookups
    calls = _grouped_calls("cuda")
    for a, b in zip(GroupedLookups(calls).results(), _one_by_one(calls)):
        torch.testing.assert_close(a, b)
    bad = calls[0][1].clone()
    bad[0] = -1
    calls[0] = (calls[0][0], bad, calls[0][2], None)
    with pytest.raises(TTIndexError, match="index -1 is out of range"):
        GroupedLookups(calls).results()

