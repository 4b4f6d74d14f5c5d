"""Training bags from sorted entries with no host sync (kernels.triton_entries, FPD_TT_SYNC_FREE=on):
values and gradients against the reference path.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest), and the layer
takes the path when its kernel is set to "triton".
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpd_convert.layers.tt_embedding as tt_embedding_module
from conftest import cuda, needs_triton
from fpd_convert.kernels.reference import tt_rows
from fpd_convert.layers import TTEmbeddingBag, TTIndexError, tt_lookup
from test_kernels import SHAPES, cuda_training_step_matches_reference, make_cores

pytestmark = needs_triton


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bags(n, seed, count=40):
    """Ids with repeats, and offsets of 8 bags (an empty one included)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n, (count,), generator=g)
    cuts = torch.sort(torch.randint(0, count + 1, (6,), generator=g)).values
    return ids, torch.cat([torch.zeros(1, dtype=torch.int64), cuts, cuts[-1:]])


@pytest.mark.parametrize("row_factors,dim_factors,ranks", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("by_suffix", [False, True])
def test_entry_bags_equal_reference(row_factors, dim_factors, ranks, weighted, by_suffix):
    from fpd_convert.kernels.triton_entries import entry_bags, suffix_major_codes
    dev = _device()
    cores = [c.detach().to(dev).requires_grad_() for c in make_cores(row_factors, dim_factors, ranks)]
    n = row_factors[0] * row_factors[1] * row_factors[2]
    ids, offsets = (t.to(dev) for t in _bags(n, seed=sum(row_factors)))
    w = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)).to(dev) if weighted else None
    keys, pos = torch.sort(suffix_major_codes(ids, cores) if by_suffix else ids)
    bag_of = torch.searchsorted(offsets, torch.arange(ids.numel(), device=dev), right=True) - 1
    out = entry_bags(cores, keys, pos, offsets.numel(), bag_of=bag_of, weights=w, suffix_major=by_suffix)
    want = F.embedding_bag(ids, tt_rows(cores, torch.arange(n, device=dev)), offsets, mode="sum",
                           per_sample_weights=w)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)).to(dev)
    for a, b in zip(torch.autograd.grad(out, cores, g), torch.autograd.grad(want, cores, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # (B, L) bags, and entries left out (skip): sum over the kept ones only
    skip = -(1 << 62)
    codes = torch.where(keys == keys[5], torch.full_like(keys, skip), keys)
    out = entry_bags(cores, codes, pos, 8, bag_len=5, skip=skip, suffix_major=by_suffix)
    kept = torch.where(ids == ids[pos[5]], torch.zeros_like(ids), torch.ones_like(ids)).float()
    want = F.embedding_bag(ids.view(8, 5), tt_rows(cores, torch.arange(n, device=dev)), mode="sum",
                           per_sample_weights=kept.view(8, 5))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(3)).to(dev)
    for a, b in zip(torch.autograd.grad(out, cores, g), torch.autograd.grad(want, cores, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_entry_bags_bf16_cores():
    from fpd_convert.kernels.triton_entries import entry_bags
    dev = _device()
    cores = [c.detach().to(dev, torch.bfloat16).requires_grad_() for c in make_cores([4, 5, 6], [8, 4, 4], [1, 8, 8, 1])]
    ids, offsets = (t.to(dev) for t in _bags(120, seed=31))
    keys, pos = torch.sort(ids)
    bag_of = torch.searchsorted(offsets, torch.arange(ids.numel(), device=dev), right=True) - 1
    out = entry_bags(cores, keys, pos, offsets.numel(), bag_of=bag_of)
    ref_cores = [c.detach().float().requires_grad_() for c in cores]
    want = F.embedding_bag(ids, tt_rows(ref_cores, torch.arange(120, device=dev)), offsets, mode="sum")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(5)).to(dev)
    got = torch.autograd.grad(out, cores, g.to(torch.bfloat16))
    for a, b in zip(got, torch.autograd.grad(want, ref_cores, g)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


@pytest.fixture(params=["id", "suffix"])
def sync_free(monkeypatch, request):
    """FPD_TT_SYNC_FREE=on, with the kernel wrapped to count its calls (it still does the work);
    the entries sorted by id, and suffix-major (FPD_TT_ENTRY_ORDER: dS summed per digit pair)."""
    from fpd_convert.kernels import triton_entries
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "on")
    monkeypatch.setattr(triton_entries, "ENTRY_ORDER", request.param)
    calls = []
    real = tt_embedding_module.entry_bags

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(tt_embedding_module, "entry_bags", counted)
    return calls


def _pair(padding_idx=None, include_last_offset=False, mode="sum", mapped=False):
    """The same table twice: on the reference path, and on the Triton path."""
    torch.manual_seed(0)
    kw = dict(rank=5, row_factors=[4, 5, 6], dim_factors=[2, 4, 3], mode=mode, padding_idx=padding_idx,
              include_last_offset=include_last_offset)
    ref = TTEmbeddingBag(120, 24, **kw)
    ref.kernel = "reference"
    fast = TTEmbeddingBag(120, 24, _cores=[c.detach().clone() for c in ref.cores], device=_device(), **kw)
    fast.kernel = "triton"
    if mapped:
        exact = torch.randn(2, 24, generator=torch.Generator().manual_seed(3))
        for m in (ref, fast):
            m.set_row_map(torch.tensor([100, 3, 57, 11]))
            m.set_exact_rows(torch.tensor([57, 5]), exact)
    return ref, fast


def _same_training_step(ref, fast, ids, offsets, weights=None):
    dev = _device()
    outs, grads = [], []
    for m, d in ((ref, "cpu"), (fast, dev)):
        out = m(ids.to(d), None if offsets is None else offsets.to(d),
                per_sample_weights=None if weights is None else weights.to(d))
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(d)
        (out * g).sum().backward()
        outs.append(out.detach().cpu())
        grads.append([torch.zeros(p.shape) if p.grad is None else p.grad.cpu() for p in m.parameters()])
        m.zero_grad()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mapped", [False, True])
def test_layer_trains_from_sorted_entries_like_the_reference(mapped, sync_free):
    ref, fast = _pair(padding_idx=7, mapped=mapped)
    ids, offsets = _bags(120, seed=11)
    ids[[2, 9, 17, 20]] = torch.tensor([7, 57, 5, 100])  # padding, exact rows, a mapped row
    _same_training_step(ref, fast, ids, offsets)
    _same_training_step(ref, fast, ids.int(), offsets.int())
    _same_training_step(ref, fast, ids, offsets, torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)))
    _same_training_step(ref, fast, ids.view(8, 5), None)  # (B, L) bags
    _same_training_step(ref, fast, ids[:9], torch.arange(9))  # one-hot bags
    assert len(sync_free) == 5


def test_layer_trains_from_sorted_entries_with_last_offset(sync_free):
    ref, fast = _pair(include_last_offset=True)
    ids, offsets = _bags(120, seed=13)
    _same_training_step(ref, fast, ids, torch.cat([offsets.clamp(max=33), torch.tensor([33])]))
    assert len(sync_free) == 1


def test_sync_free_index_errors_surface_at_the_next_lookup(sync_free):
    _, fast = _pair()
    dev = _device()
    ids, offsets = (t.to(dev) for t in _bags(120, seed=17))
    bad = ids.clone()
    bad[3] = 120
    out = fast(bad, offsets)  # no sync: the ids were clamped, so every read stayed inside the cores
    assert torch.isfinite(out).all() and len(sync_free) == 1
    with pytest.raises(TTIndexError, match="index 120 is out of range.*earlier batch"):
        fast(ids, offsets)
    fast(ids, offsets).sum().backward()  # raised once, then the layer goes on
    bad[3] = -4
    fast(bad, offsets)
    twin = copy.deepcopy(fast)  # a copy leaves the pending check with the original
    twin.raise_deferred_errors()
    with pytest.raises(TTIndexError, match="index -4 is out of range"):
        fast.raise_deferred_errors()
    fast.raise_deferred_errors()  # nothing pending


def test_sync_free_serving_reads_nothing_and_defers_index_errors(sync_free, monkeypatch):
    pooled = []
    real = tt_embedding_module.pooled_bags
    monkeypatch.setattr(tt_embedding_module, "pooled_bags", lambda *a, **k: pooled.append(1) or real(*a, **k))
    monkeypatch.setattr(TTEmbeddingBag, "_pooled_head", None)  # the head the host would read: never built
    dev = _device()
    ref, fast = _pair(padding_idx=7, mapped=True, mode="mean")
    ids, offsets = _bags(120, seed=29)
    ids[[2, 9]] = torch.tensor([7, 57])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids.to(dev), offsets.to(dev)).cpu(), ref(ids, offsets), rtol=1e-5, atol=1e-5)
        bad = ids.clone()
        bad[0] = 10 ** 6
        late = offsets.clone()
        late[-1] = 10 ** 4  # offsets nobody checks: the kernel keeps its bags inside the input
        assert torch.isfinite(fast(bad.to(dev), late.to(dev))).all()
        with pytest.raises(TTIndexError, match="index 1000000 is out of range.*earlier batch"):
            fast(ids.to(dev), offsets.to(dev))
    assert len(pooled) == 2 and not sync_free


def test_sync_free_is_for_training_sum_bags_only(sync_free, monkeypatch):
    pooled = []
    real = tt_embedding_module.pooled_bags
    monkeypatch.setattr(tt_embedding_module, "pooled_bags", lambda *a, **k: pooled.append(1) or real(*a, **k))
    ref, fast = _pair(mode="mean")
    ids, offsets = _bags(120, seed=19)
    _same_training_step(ref, fast, ids, offsets)  # mean: the dedup path
    ref, fast = _pair()
    with torch.no_grad():  # serving: the one-pass pooled kernel, with its range check
        torch.testing.assert_close(fast(ids.to(_device()), offsets.to(_device())).cpu(), ref(ids, offsets),
                                   rtol=1e-5, atol=1e-5)
    w = torch.rand(ids.shape, requires_grad=True)
    out = fast(ids.to(_device()), offsets.to(_device()), per_sample_weights=w.to(_device()))
    out.sum().backward()  # weights that want a gradient: the general path gives it
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert not sync_free and len(pooled) == 1
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "maybe")
    with pytest.raises(ValueError, match="FPD_TT_SYNC_FREE should be"):
        fast(ids.to(_device()), offsets.to(_device()))


def test_grouped_lookups_train_sync_free(sync_free):
    from fpd_convert.layers.grouped import GroupedLookups
    dev = _device()
    (ref_a, fast_a), (ref_b, fast_b) = _pair(), _pair(padding_idx=3)
    ids, offsets = _bags(120, seed=23)
    dense = nn.EmbeddingBag(10, 24, mode="sum")
    calls = [(fast_a, ids[:9].to(dev), torch.arange(9, device=dev), None), (fast_b, ids.to(dev), offsets.to(dev), None),
             (dense.to(dev), (ids[:9] % 10).to(dev), torch.arange(9, device=dev), None)]
    grouped = GroupedLookups(calls)
    assert [s is not None and s.entries is not None and s.head is None for s in grouped._started] == [True, True, False]
    got = grouped.results()
    want = [ref_a(ids[:9], torch.arange(9)), ref_b(ids, offsets)]
    for a, b in zip(got[:2], want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
    sum(o.square().sum() for o in got[:2]).backward()
    sum(o.square().sum() for o in want).backward()
    for fast, ref in ((fast_a, ref_a), (fast_b, ref_b)):
        for a, b in zip(fast.cores, ref.cores):
            torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-5)
    assert len(sync_free) == 2


@cuda
def test_cuda_auto_path_trains_sync_free(sync_free):
    cuda_training_step_matches_reference()
    assert len(sync_free) == 1


def test_entries_of_ids_out_of_range_are_left_out(sync_free):
    """Without a host sync a bad id cannot stop its batch: its entry is left out (no row, no
    gradient, as a zero weight would), also past int32 where the sort keys are int32, and the
    next lookup raises."""
    ref, fast = _pair()
    dev = _device()
    ids, offsets = _bags(120, seed=31)
    bad = ids.clone()
    bad[[1, 5, 9]] = torch.tensor([500, -3, 2 ** 32 + 5])
    w = torch.ones(ids.shape)
    w[[1, 5, 9]] = 0
    want = ref(torch.where(w > 0, bad, 0), offsets, per_sample_weights=w)
    out = fast(bad.to(dev), offsets.to(dev))
    torch.testing.assert_close(out.detach().cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(6))
    (out * g.to(dev)).sum().backward()
    (want * g).sum().backward()
    for a, b in zip(fast.cores, ref.cores):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(TTIndexError, match="out of range.*earlier batch"):
        fast(ids.to(dev), offsets.to(dev))
    with torch.no_grad():  # serving, one pass: the same
        torch.testing.assert_close(fast(bad.to(dev), offsets.to(dev)).cpu(), want.detach(), rtol=1e-5, atol=1e-5)
        with pytest.raises(TTIndexError, match="out of range.*earlier batch"):
            fast(ids.to(dev), offsets.to(dev))
