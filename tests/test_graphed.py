"""Stacked TT training lookups replayed from CUDA graphs (layers.graphed, FPD_TT_CUDA_GRAPHS=on).

On the CPU (Triton's interpreter): what a capture needs of the stacked lookup — no host sync,
no data-dependent shape, the range check handed to the caller — and the switch.  On a GPU: a
DLRM trained with graphs equals the same model trained op by op, index errors still surface at
the next lookup, and a forward whose backward is pending is not replayed over.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import cuda, needs_triton
from fpd_convert.layers import TTEmbeddingBag, TTIndexError, tt_lookup
from fpd_convert.layers.graphed import GraphedStack, graphed_lookups, layout_key
from fpd_convert.layers.grouped import GroupedLookups
from fpd_convert.layers.table_batched import stacked_lookups

pytestmark = needs_triton
KW = dict(rank=5, row_factors=[4, 5, 6], dim_factors=[2, 4, 3], mode="sum")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tables(count, seed=0):
    tables = []
    for t in range(count):
        torch.manual_seed(seed + t)
        table = TTEmbeddingBag(120, 24, device=_device(), **KW)
        table.kernel = "triton"
        tables.append(table)
    return tables


def _calls(tables, seed=0, bad=None):
    g = torch.Generator().manual_seed(seed)
    dev = _device()
    offsets = torch.arange(16, device=dev)
    calls = []
    for k, table in enumerate(tables):
        ids = torch.randint(0, 120, (16,), generator=g)
        if bad is not None and k == len(tables) - 1:
            ids[5] = bad
        calls.append((table, ids.to(dev), offsets, None))
    return calls


class _Ops(TorchDispatchMode):
    """The aten ops a region dispatches."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


#: ops that read a device value on the host or give an output whose shape depends on the data:
#: a CUDA graph cannot capture them
NOT_CAPTURABLE = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "unique_dim", "_unique", "_unique2",
                  "unique_consecutive", "unique_dim_consecutive", "masked_select", "equal", "is_nonzero",
                  "_assert_async", "bincount"}


@pytest.mark.parametrize("sizes", [(16, 16, 16), (16, 11, 20)])
def test_stacked_training_lookup_has_nothing_a_capture_refuses(monkeypatch, sizes):
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "on")
    tables = _tables(3)
    dev = _device()
    g = torch.Generator().manual_seed(3)
    calls = []
    for table, n in zip(tables, sizes):
        ids = torch.randint(0, 120, (n,), generator=g).to(dev)
        calls.append((table, ids, torch.arange(n, device=dev), None))
    stash = []
    with _Ops() as ops, tt_lookup.stashing_range_checks(stash):
        outs = stacked_lookups(calls)
        sum(o.square().sum() for o in outs).backward()
    assert ops.names, "the dispatch mode saw no op"
    assert {"sort", "mul", "add"} & ops.names  # it saw the lookup's own ops
    assert not ops.names & NOT_CAPTURABLE, sorted(ops.names & NOT_CAPTURABLE)
    assert len(stash) == 1 and stash[0][0] is tables[0]
    assert all(t.grad is not None for table in tables for t in table.cores)


def test_stashed_range_check_is_deferred_by_the_caller(monkeypatch):
    """Under the stash the lookup neither copies its range nor waits: the caller defers the head it
    got (as a replay does), and the table's next lookup raises."""
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "on")
    tables = _tables(2)
    calls = _calls(tables, bad=500)
    want = [o.detach().clone() for o in stacked_lookups(_calls(tables, bad=119))]
    tables[0].raise_deferred_errors()  # that lookup's check (in range)
    stash = []
    with tt_lookup.stashing_range_checks(stash):
        outs = stacked_lookups(calls)
    assert getattr(tables[0], "_deferred", None) is None
    (table, head, captured), = stash
    assert table is tables[0] and not captured
    assert head.tolist() == [int(torch.cat([c[1] for c in calls]).min()), 500]
    torch.testing.assert_close(outs[0].detach(), want[0])  # the bad entry of table 1 is left out ...
    assert not torch.equal(outs[1][5].detach(), want[1][5])
    assert torch.count_nonzero(outs[1][5]) == 0  # ... as padding is: a zero bag
    table.defer_range_head(head)
    with pytest.raises(TTIndexError, match="index 500 is out of range.*earlier batch"):
        GroupedLookups(_calls(tables)).results()
    GroupedLookups(_calls(tables)).results()  # raised once
    assert tt_lookup.range_check_stash() is None


def test_switch_and_where_graphs_do_not_apply(monkeypatch):
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "on")
    tables = _tables(2)
    calls = _calls(tables)
    assert graphed_lookups(calls) is None  # off by default
    monkeypatch.setattr(tt_lookup, "CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="FPD_TT_CUDA_GRAPHS should be"):
        graphed_lookups(calls)
    monkeypatch.setattr(tt_lookup, "CUDA_GRAPHS", "on")
    if not torch.cuda.is_available():
        assert graphed_lookups(calls) is None  # CPU tensors: op by op
    with torch.no_grad():
        assert graphed_lookups(calls) is None
    key = layout_key(calls)
    assert layout_key(_calls(tables, seed=1)) == key  # other ids, same layout: the same graph
    assert layout_key(_calls(tables)[:1]) != key
    longer = [(t, torch.cat([i, i]), torch.arange(32, device=i.device), w) for t, i, _, w in calls]
    assert layout_key(longer) != key
    moved = _tables(2)
    assert layout_key([(m,) + c[1:] for m, c in zip(moved, calls)]) != key


def _model(seed=0):
    from fpd_convert.bench.dlrm_step import _largest, terabyte_architecture
    from fpd_convert.models import build_model
    arch = terabyte_architecture(3000, 16, bottom=(32,), top=(32, 16))
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = build_model(arch, _largest(arch, 4, 4))
    for m in model.modules():
        if isinstance(m, TTEmbeddingBag):
            m.kernel = "triton"
    return arch, model


def _batch(arch, seed, bad=None):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(64, 13, generator=g).cuda()
    sparse = torch.stack([torch.randint(0, t["rows"], (64,), generator=g) for t in arch["tables"]], 1)
    if bad is not None:
        sparse[7, 0] = bad  # table 0 is the largest: a TT table
    return dense, sparse.cuda()


def _train(monkeypatch, graphs, steps=5, bad_at=None, bf16=True):
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "on")
    monkeypatch.setattr(tt_lookup, "CUDA_GRAPHS", "on" if graphs else "off")
    arch, model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for s in range(steps):
        dense, sparse = _batch(arch, s, bad=3000 if s == bad_at else None)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model.logits(dense, sparse).float().square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


@cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_training_replayed_from_graphs_equals_op_by_op(monkeypatch, bf16):
    """Five SGD steps on five batches (the first runs op by op, the second captures, the rest
    replay): the same losses and weights as without graphs (bf16 autocast, as the bench trains:
    the losses, within bf16's rounding of the atomics' order)."""
    eager, eager_losses = _train(monkeypatch, graphs=False, bf16=bf16)
    graphed, losses = _train(monkeypatch, graphs=True, bf16=bf16)
    tt = [m for m in graphed.modules() if isinstance(m, TTEmbeddingBag)]
    kept = [v for m in tt for v in m.__dict__.get("_cuda_graphs", {}).values()]
    assert any(isinstance(v, GraphedStack) for v in kept), "no graph was captured"
    assert losses == pytest.approx(eager_losses, rel=1e-2 if bf16 else 1e-4)
    assert losses[-1] != pytest.approx(losses[0], rel=1e-3)  # it trained
    if not bf16:
        for (name, a), (_, b) in zip(graphed.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@cuda
def test_ids_out_of_range_raise_at_the_next_replayed_step(monkeypatch):
    with pytest.raises(TTIndexError, match="index 3000 is out of range.*earlier batch"):
        _train(monkeypatch, graphs=True, steps=5, bad_at=3)


@cuda
def test_a_forward_whose_backward_is_pending_runs_op_by_op(monkeypatch):
    """Two forwards, then both backwards (gradient accumulation over two batches): the second
    forward must not replay over what the first one's backward needs."""
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "on")
    results = []
    for graphs in ("off", "on"):
        monkeypatch.setattr(tt_lookup, "CUDA_GRAPHS", graphs)
        arch, model = _model()
        for s in range(2):  # seen twice: captured
            model.zero_grad(set_to_none=True)
            model.logits(*_batch(arch, s)).square().mean().backward()
        model.zero_grad(set_to_none=True)
        first = model.logits(*_batch(arch, 10)).square().mean()
        second = model.logits(*_batch(arch, 11)).square().mean()
        (first + second).backward()
        results.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_a_table_alone_is_a_stack_of_one(monkeypatch):
    """What CUDA graphs take for a table whose shape no other table shares: the stacked lookup of
    one table gives its own lookup's bags and gradients."""
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "on")
    table, = _tables(1)
    twin = TTEmbeddingBag(120, 24, device=_device(), _cores=[c.detach().clone() for c in table.cores], **KW)
    twin.kernel = "triton"
    (call,) = _calls([table], seed=4)
    ids, offsets = call[1], call[2]
    out, = stacked_lookups([call])
    want = twin(ids, offsets)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(want.device)
    (out * g).sum().backward()
    (want * g).sum().backward()
    for a, b in zip(table.cores, twin.cores):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    from fpd_convert.layers.table_batched import stack_groups
    other = TTEmbeddingBag(120, 24, device=_device(), **{**KW, "rank": 3})
    other.kernel = "triton"
    calls = [call, (other,) + call[1:]]
    assert stack_groups(calls) == []
    assert stack_groups(calls, min_size=1) == [[0], [1]]


@cuda
def test_a_lone_layer_trained_from_graphs(monkeypatch):
    """``layer(ids, offsets)`` on its own (as `bench` times it): replayed from the third call on,
    with the bags and gradients of the layer without graphs."""
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "on")
    table, = _tables(1)
    twin = TTEmbeddingBag(120, 24, device="cuda", _cores=[c.detach().clone() for c in table.cores], **KW)
    twin.kernel = "triton"
    for step in range(4):
        (_, ids, offsets, _), = _calls([table], seed=step)
        monkeypatch.setattr(tt_lookup, "CUDA_GRAPHS", "on")
        out = table(ids, offsets)
        monkeypatch.setattr(tt_lookup, "CUDA_GRAPHS", "off")
        want = twin(ids, offsets)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        g = torch.randn(want.shape, generator=torch.Generator().manual_seed(step)).cuda()
        (out * g).sum().backward()
        (want * g).sum().backward()
        for a, b in zip(table.cores, twin.cores):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
            a.grad = b.grad = None
    assert any(isinstance(v, GraphedStack) for v in table.__dict__["_cuda_graphs"].values())


@cuda
def test_graphs_follow_the_cores(monkeypatch):
    """Cores replaced (``.to(dtype)`` and back, a new optimizer's copy): the old graphs are dropped,
    and the layer trains from new ones on its new cores."""
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "on")
    monkeypatch.setattr(tt_lookup, "CUDA_GRAPHS", "on")
    table, = _tables(1)
    (_, ids, offsets, _), = _calls([table])
    for _ in range(3):
        table.zero_grad()
        table(ids, offsets).sum().backward()
    graphs = table.__dict__["_cuda_graphs"]
    assert len(graphs) == 1 and isinstance(next(iter(graphs.values())), GraphedStack)
    table.zero_grad()
    table.double().float()
    want = table.finish_lookup(table.start_lookup(ids, offsets))  # op by op, on the new cores
    for _ in range(3):
        out = table(ids, offsets)
        out.sum().backward()
        table.zero_grad()
    assert len(graphs) == 1 and isinstance(next(iter(graphs.values())), GraphedStack)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@cuda
def test_gradients_accumulated_over_replays_are_not_doubled(monkeypatch):
    """``zero_grad(set_to_none=False)`` and two batches a step: the same gradients as without graphs
    (a replay's gradient tensor kept as ``.grad`` would otherwise be added to itself)."""
    monkeypatch.setattr(tt_lookup, "SYNC_FREE", "on")
    results = []
    for graphs in ("off", "on"):
        monkeypatch.setattr(tt_lookup, "CUDA_GRAPHS", graphs)
        arch, model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for s in range(4):
            opt.zero_grad(set_to_none=(s < 2))  # None for the first two steps: captured and replayed
            for half in range(2):
                model.logits(*_batch(arch, 2 * s + half)).square().mean().backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_entry_order_switch_is_part_of_a_graph_layout(monkeypatch):
    from fpd_convert.kernels import triton_entries
    calls = _calls(_tables(2))
    key = layout_key(calls)
    monkeypatch.setattr(triton_entries, "ENTRY_ORDER", "suffix")
    assert layout_key(calls) != key  # a graph captured in one order is not replayed in the other
