"""TT tables of one shape trained as one stacked table (layers.table_batched, FPD_TT_SYNC_FREE=on):
values and gradients against each table looked up alone on the reference path.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest).
"""
import pytest
import torch
from torch import nn

import fpd_convert.layers.table_batched as table_batched_module
from conftest import needs_triton
from fpd_convert.kernels.reference import tt_rows
from fpd_convert.kernels.triton_entries import entry_bags
from fpd_convert.layers import TTEmbeddingBag, TTIndexError, tt_lookup
from fpd_convert.layers.grouped import GroupedLookups
from test_kernels import make_cores

pytestmark = needs_triton
KW = dict(rank=5, row_factors=[4, 5, 6], dim_factors=[2, 4, 3], mode="sum")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["id", "suffix"])
def stacked(monkeypatch, request):
    """FPD_TT_SYNC_FREE=on; counts the stacked lookups (they still do the work); entries sorted
    by id, and suffix-major (FPD_TT_ENTRY_ORDER)."""
    from fpd_convert.kernels import triton_entries
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "on")
    monkeypatch.setattr(triton_entries, "ENTRY_ORDER", request.param)
    calls = []
    real = table_batched_module.stacked_lookups

    def counted(group):
        calls.append(len(group))
        return real(group)
    monkeypatch.setattr(table_batched_module, "stacked_lookups", counted)
    import fpd_convert.layers.grouped as grouped_module
    monkeypatch.setattr(grouped_module, "stacked_lookups", counted)
    return calls


def _tables(count, seed=0, **kw):
    """``count`` tables of one shape, each twice: on the reference path (CPU), and on the Triton path."""
    pairs = []
    for t in range(count):
        torch.manual_seed(seed + t)
        ref = TTEmbeddingBag(120, 24, **{**KW, **kw})
        ref.kernel = "reference"
        fast = TTEmbeddingBag(120, 24, _cores=[c.detach().clone() for c in ref.cores], device=_device(), **{**KW, **kw})
        fast.kernel = "triton"
        pairs.append((ref, fast))
    return pairs


def _multi_hot(seed, count=40, bags=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (count,), generator=g)
    cuts = torch.sort(torch.randint(0, count + 1, (bags - 2,), generator=g)).values
    return ids, torch.cat([torch.zeros(1, dtype=torch.int64), cuts, cuts[-1:]])  # an empty bag too


def _check(pairs, inputs, weights=None):
    """Trains the fast tables as one group and the reference tables one by one: same bags, same gradients."""
    dev = _device()
    calls = [(fast, i.to(dev), None if o is None else o.to(dev), None if w is None else w.to(dev))
             for (_, fast), (i, o), w in zip(pairs, inputs, weights or [None] * len(pairs))]
    got = GroupedLookups(calls).results()
    want = [ref(i, o, per_sample_weights=w) for (ref, _), (i, o), w in zip(pairs, inputs, weights or [None] * len(pairs))]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
    g = [torch.randn(b.shape, generator=torch.Generator().manual_seed(7 + k)) for k, b in enumerate(want)]
    sum((a * gk.to(a.device)).sum() for a, gk in zip(got, g)).backward()
    sum((b * gk).sum() for b, gk in zip(want, g)).backward()
    for ref, fast in pairs:
        for a, b in zip(fast.cores, ref.cores):
            torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-5)


def test_stacked_entry_bags_equal_each_table_alone():
    dev = _device()
    tables = [[c.detach().to(dev).requires_grad_() for c in make_cores([4, 5, 6], [2, 4, 3], [1, 5, 6, 1], seed=s)]
              for s in range(3)]
    ids = [torch.randint(0, 120, (30,), generator=torch.Generator().manual_seed(s)).to(dev) for s in range(3)]
    stacked = [torch.stack(parts) for parts in zip(*tables)]
    codes = torch.cat([i + t * 120 for t, i in enumerate(ids)])
    keys, pos = torch.sort(codes)
    bag_of = torch.arange(90, device=dev) // 3  # bags of 3 entries, numbered across the tables
    out = entry_bags(stacked, keys, pos, 30, bag_of=bag_of)
    want = torch.cat([tt_rows(cores, i).reshape(10, 3, -1).sum(1) for cores, i in zip(tables, ids)])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(dev)
    got = torch.autograd.grad(out, [c for cores in tables for c in cores], g)
    for a, b in zip(got, torch.autograd.grad(want, [c for cores in tables for c in cores], g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exact rows are for one table"):
        entry_bags(stacked, keys, pos, 30, bag_of=bag_of, exact_rows=torch.zeros(1, 24, device=dev))


def test_one_hot_tables_of_one_shape_train_as_one(stacked):
    pairs = _tables(4)
    inputs = [(torch.randint(0, 120, (16,), generator=torch.Generator().manual_seed(s)), torch.arange(16))
              for s in range(4)]
    _check(pairs, inputs)
    assert stacked == [4]


@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("sizes", [(40, 25, 33), (30, 30, 30)])  # apart, and one shape (batched bag ops)
def test_multi_hot_bags(stacked, include_last_offset, sizes):
    pairs = _tables(3, seed=5, include_last_offset=include_last_offset)
    inputs = []
    for s, count in enumerate(sizes):
        ids, offsets = _multi_hot(11 + s, count)
        if include_last_offset:  # the last offset ends the last bag; entries after it are in no bag
            offsets = torch.cat([offsets[:-1], torch.tensor([count - 3])])
        inputs.append((ids, offsets))
    _check(pairs, inputs, weights=None)
    assert stacked == [3]


def test_fixed_length_bags_weights_and_other_tables(stacked):
    """(B, L) inputs and per-sample weights; a table of another shape and a dense table are looked up as before."""
    pairs = _tables(2, seed=9)
    other = _tables(1, seed=3, rank=3)
    inputs = [(torch.randint(0, 120, (6, 4), generator=torch.Generator().manual_seed(s)), None) for s in range(3)]
    weights = [torch.rand(6, 4, generator=torch.Generator().manual_seed(20 + s)) for s in range(3)]
    _check(pairs + other, inputs, weights)
    assert stacked == [2]
    dense = nn.EmbeddingBag(10, 24, mode="sum").to(_device())
    ids = torch.arange(8, device=_device())
    got = GroupedLookups([(pairs[0][1], ids, ids, None), (dense, ids, ids, None), (pairs[1][1], ids, ids, None)]).results()
    torch.testing.assert_close(got[1], dense(ids, ids))
    torch.testing.assert_close(got[2].detach().cpu(), pairs[1][0](ids.cpu(), ids.cpu()), rtol=1e-5, atol=1e-5)
    assert stacked == [2, 2]


def test_ids_out_of_range_raise_at_the_next_lookup(stacked):
    pairs = _tables(2)
    dev = _device()
    ids = torch.randint(0, 120, (8,)).to(dev)
    bad = ids.clone()
    bad[3] = 500
    calls = [(pairs[0][1], ids, torch.arange(8, device=dev), None), (pairs[1][1], bad, torch.arange(8, device=dev), None)]
    out = GroupedLookups(calls).results()  # no sync: the bad entry is left out, the check deferred
    torch.testing.assert_close(out[0].detach().cpu(), pairs[0][0](ids.cpu(), torch.arange(8)), rtol=1e-5, atol=1e-5)
    w = torch.ones(8)
    w[3] = 0
    want = pairs[1][0](torch.where(w > 0, bad.cpu(), 0), torch.arange(8), per_sample_weights=w)
    torch.testing.assert_close(out[1].detach().cpu(), want, rtol=1e-5, atol=1e-5)
    out[1].square().sum().backward()
    want.square().sum().backward()
    for a, b in zip(pairs[1][1].cores, pairs[1][0].cores):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(TTIndexError, match="index 500 is out of range.*earlier batch"):
        GroupedLookups(calls[:1] * 2).results()
    GroupedLookups([calls[0], (pairs[1][1], ids, torch.arange(8, device=dev), None)]).results()  # raised once


def test_switches_and_what_is_not_stacked(stacked, monkeypatch):
    pairs = _tables(2)
    dev = _device()
    ids = torch.arange(8, device=dev)
    calls = [(fast, ids, ids, None) for _, fast in pairs]
    assert table_batched_module.stack_groups(calls) == [[0, 1]]
    with torch.no_grad():  # serving: the one-pass pooled kernel, table by table
        assert table_batched_module.stack_groups(calls) == []
    monkeypatch.setattr(tt_lookup, "TABLE_BATCHED", "off")
    assert table_batched_module.stack_groups(calls) == []
    monkeypatch.setattr(tt_lookup, "TABLE_BATCHED", "sometimes")
    with pytest.raises(ValueError, match="FPD_TT_TABLE_BATCHED should be"):
        table_batched_module.stack_groups(calls)
    monkeypatch.setattr(tt_lookup, "TABLE_BATCHED", "auto")
    padded = _tables(2, padding_idx=3)
    assert table_batched_module.stack_groups([(fast, ids, ids, None) for _, fast in padded]) == []
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "off")
    assert table_batched_module.stack_groups(calls) == []


def test_dlrm_training_step_with_stacked_tables_equals_one_by_one(monkeypatch):
    """A DLRM step whose four largest tables are TT of one shape (rows capped): the same loss and
    gradients through the dedup path, sync-free one by one, and sync-free stacked."""
    from fpd_convert.bench.dlrm_step import _largest, terabyte_architecture
    from fpd_convert.models import build_model
    dev = _device()
    arch = terabyte_architecture(3000, 16, bottom=(32,), top=(32, 16))
    torch.manual_seed(0)
    with torch.device(dev):
        model = build_model(arch, _largest(arch, 4, 4))
    tt = [m for m in model.modules() if isinstance(m, TTEmbeddingBag)]
    assert len(tt) == 4 and len({tuple(c.shape for c in m.cores) for m in tt}) == 1
    for m in tt:
        m.kernel = "triton"
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(64, 13, generator=g).to(dev)
    sparse = torch.stack([torch.randint(0, t["rows"], (64,), generator=g) for t in arch["tables"]], 1).to(dev)
    stacked = []
    real = table_batched_module.stacked_lookups
    import fpd_convert.layers.grouped as grouped_module
    monkeypatch.setattr(grouped_module, "stacked_lookups", lambda group: stacked.append(len(group)) or real(group))
    results = []
    for sync_free, batched in (("off", "auto"), ("on", "off"), ("on", "auto")):
        monkeypatch.setattr(tt_lookup, "SYNC_FREE", sync_free)
        monkeypatch.setattr(tt_lookup, "TABLE_BATCHED", batched)
        model.zero_grad()
        loss = model.logits(dense, sparse).square().mean()
        loss.backward()
        results.append((loss.item(), [p.grad.detach().clone() for m in tt for p in m.parameters()]))
    assert stacked == [4]
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_stacked_bf16_cores():
    """bf16 cores (as fine-tuning under autocast may keep them): bags and gradients in bf16, near fp32."""
    dev = _device()
    exact = [make_cores([4, 5, 6], [2, 4, 3], [1, 5, 6, 1], seed=s) for s in range(2)]
    half = [[c.detach().to(dev, torch.bfloat16).requires_grad_() for c in cores] for cores in exact]
    ids = [torch.randint(0, 120, (20,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    keys, pos = torch.sort(torch.cat([i + t * 120 for t, i in enumerate(ids)]).to(dev))
    out = entry_bags([torch.stack(p) for p in zip(*half)], keys, pos, 40, bag_of=torch.arange(40, device=dev))
    assert out.dtype == torch.bfloat16
    ref = [[c.detach().to(torch.bfloat16).double().requires_grad_() for c in cores] for cores in exact]
    want = torch.cat([tt_rows(cores, i) for cores, i in zip(ref, ids)])
    torch.testing.assert_close(out.double().cpu(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad(out, [c for cores in half for c in cores], g.to(dev, torch.bfloat16))
    for a, b in zip(got, torch.autograd.grad(want, [c for cores in ref for c in cores], g)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double().cpu(), b, rtol=3e-2, atol=3e-2 * b.abs().max().item())
