"""Every fast TT path against the plain PyTorch reference: values and core gradients."""
import numpy as np
import pytest
import torch

from conftest import cuda, needs_triton
from fpd_convert.kernels import cpu_pool, cpu_suffix, cpu_tt, triton_suffix, triton_tt
from fpd_convert.kernels.reference import tt_rows
from fpd_convert.layers import TTEmbeddingBag, TTEmbedding, choose_kernel

# (rows, row factors, dim factors, ranks): even, odd and non-power-of-two sizes
SHAPES = [
    ([5, 7, 6], [2, 3, 2], [1, 3, 4, 1]),
    ([4, 4, 5], [4, 4, 4], [1, 8, 8, 1]),
    ([3, 9, 2], [1, 5, 2], [1, 3, 6, 1]),
    ([60, 4, 3], [4, 4, 4], [1, 8, 8, 1]),  # a long first core over few suffixes (factor_rows' suffix_rows)
]


def make_cores(row_factors, dim_factors, ranks, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(ranks[j], n, d, ranks[j + 1], generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for j, (n, d) in enumerate(zip(row_factors, dim_factors))]


def grads(rows_fn, cores, idx, seed=1):
    out = rows_fn(cores, idx)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    return out.detach(), torch.autograd.grad(out, cores, g)


def sample_indices(n, count, seed=2, unique=True):
    idx = torch.randint(0, n, (count,), generator=torch.Generator().manual_seed(seed))
    return torch.unique(idx) if unique else idx


@pytest.mark.parametrize("row_factors,dim_factors,ranks", SHAPES)
def test_cpu_shared_prefix_path_equals_reference(row_factors, dim_factors, ranks):
    cores = make_cores(row_factors, dim_factors, ranks)
    n = row_factors[0] * row_factors[1] * row_factors[2]
    idx = sample_indices(n, 3 * n)  # dense sampling: many shared prefixes
    ref, ref_g = grads(tt_rows, cores, idx)
    out, out_g = grads(cpu_tt.tt_rows_shared, cores, idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("count", [3, 40, 2000])  # few prefixes (one GEMM each) to many (grouped by digit)
def test_cpu_shared_path_grouped_and_per_prefix_levels_agree(count, monkeypatch):
    cores = make_cores([6, 50, 7], [2, 3, 2], [1, 4, 5, 1])
    idx = sample_indices(6 * 50 * 7, count)
    ref, ref_g = grads(tt_rows, cores, idx)
    for padding in (cpu_tt.GROUPED_MAX_PADDING, 0, 10 ** 9):  # as shipped, never grouped, always grouped
        monkeypatch.setattr(cpu_tt, "GROUPED_MAX_PADDING", padding)
        out, out_g = grads(cpu_tt.tt_rows_shared, cores, idx)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(out_g, ref_g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_cpu_path_two_and_four_cores():
    for rf, df, rk in (([20, 30], [4, 2], [1, 5, 1]), ([3, 4, 5, 6], [2, 2, 1, 2], [1, 3, 4, 2, 1]),
                       ([2, 9, 8, 3], [2, 1, 2, 2], [1, 2, 3, 2, 1])):
        cores = make_cores(rf, df, rk)
        idx = sample_indices(int(torch.tensor(rf).prod()), 200)
        ref, ref_g = grads(tt_rows, cores, idx)
        out, out_g = grads(cpu_tt.tt_rows_shared, cores, idx)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(out_g, ref_g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("row_factors,dim_factors,ranks", SHAPES + [
    ([20, 30], [4, 2], [1, 5, 1]), ([3, 4, 5, 6], [2, 2, 1, 2], [1, 3, 4, 2, 1]),
    ([2, 9, 8, 3], [2, 1, 2, 2], [1, 2, 3, 2, 1]), ([7, 3, 5], [2, 2, 8], [1, 3, 5, 1])])
def test_cpu_suffix_path_equals_reference_for_any_order(row_factors, dim_factors, ranks):
    # 2, 3 and 4 cores; runs of 1 to 16 values moved by the table's swaps (8 and 16 bytes go wide)
    cores = make_cores(row_factors, dim_factors, ranks)
    n = int(torch.tensor(row_factors).prod())
    idx = sample_indices(n, 2 * n, unique=False)  # unsorted, with repeats: their gradients add up
    ref, ref_g = grads(tt_rows, cores, idx)
    out, out_g = grads(cpu_suffix.tt_rows_suffix, cores, idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("start", [0, 1, 2, 4])  # storage offsets of 0, 4, 8 and 16 bytes
@pytest.mark.parametrize("run", [1, 2, 3, 4, 8])  # values moved together: 4 to 32 bytes
def test_cpu_suffix_layout_swap_for_any_run_and_offset(start, run):
    base = torch.randn(start + 2 * 3 * 5 * run)
    x = base[start:]
    want = x.reshape(2, 3, 5, run).transpose(1, 2).contiguous()
    assert torch.equal(cpu_suffix._swap_middle(x, 2, 3, 5, run), want)


def test_cpu_suffix_table_in_bf16_is_close_to_the_fp32_reference():
    cores = make_cores([5, 7, 6], [2, 4, 8], [1, 3, 4, 1], dtype=torch.bfloat16)  # 8 bf16: one 16-byte run
    idx = sample_indices(210, 80)
    out = cpu_suffix.tt_rows_suffix(cores, idx)
    assert out.dtype == torch.bfloat16
    ref = tt_rows([c.float() for c in cores], idx).detach()
    torch.testing.assert_close(out.detach().float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_cpu_suffix_path_is_chosen_by_multiply_adds(monkeypatch):
    # the default layout of a 1M x 64 rank-16 table (1,024 suffixes) against the balanced one
    long_first = [torch.empty(1, 977, 4, 16), torch.empty(16, 32, 4, 16), torch.empty(16, 32, 4, 1)]
    balanced = [torch.empty(1, 100, 4, 16), torch.empty(16, 100, 4, 16), torch.empty(16, 100, 4, 1)]
    assert cpu_suffix.suffix_cost(long_first, 3300) == 16 * 32 * 4 * 16 * 32 * 4 + 3300 * 16 * 64
    assert cpu_suffix.shared_cost(long_first, 3300) == 3300 * 4 * 16 * 4 * 16 + 3300 * 16 * 16 * 4
    assert cpu_suffix.worthwhile(long_first, 3300)  # a batch of 8,192 Zipf ids
    assert not cpu_suffix.worthwhile(long_first, 100)  # few ids: the table would cost more than they do
    assert not cpu_suffix.worthwhile(balanced, 3300)  # 10,000 suffixes
    assert not cpu_suffix.worthwhile(long_first[:1], 3300)
    assert cpu_suffix.table_bytes(long_first) == 1024 * 16 * 16 * 4
    monkeypatch.setattr(cpu_suffix, "MAX_BYTES", 1024 * 16 * 16 * 4 - 1)  # a table too big: never
    assert not cpu_suffix.worthwhile(long_first, 3300)


@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("pad", [None, 2])
@pytest.mark.parametrize("shape", ["offsets", "2d"])
def test_cpu_pooling_by_row_equals_embedding_bag(mode, weighted, pad, shape):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 3, generator=g, dtype=torch.float64)
    if shape == "2d":
        inverse, offsets = torch.tensor([[0, 2, 2], [4, 1, 2], [3, 3, 3]]), None
    else:  # an empty bag, a bag of padding only, repeats
        inverse, offsets = torch.tensor([0, 2, 2, 4, 1, 2, 3, 3, 2]), torch.tensor([0, 3, 3, 8])
    weights = torch.rand(inverse.shape, generator=g, dtype=torch.float64) if weighted else None
    up = torch.randn(inverse.shape[0] if shape == "2d" else 4, 3, generator=g, dtype=torch.float64)
    got_rows, want_rows = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    got = cpu_pool.pool_rows(got_rows, inverse, offsets, mode, weights, pad)
    want = torch.nn.functional.embedding_bag(inverse, want_rows, offsets, mode=mode, per_sample_weights=weights,
                                             padding_idx=pad)
    torch.testing.assert_close(got, want)
    got.backward(up)
    want.backward(up)
    torch.testing.assert_close(got_rows.grad, want_rows.grad)
    if pad is not None:
        assert got_rows.grad[pad].abs().sum() == 0  # padding entries learn nothing


def test_layer_pools_by_row_on_the_cpu_only_where_it_may(monkeypatch):
    calls = []
    real = cpu_pool.pool_rows
    monkeypatch.setattr("fpd_convert.layers.tt_embedding.pool_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    bag = TTEmbeddingBag(210, 12, rank=4, row_factors=[5, 7, 6], dim_factors=[2, 3, 2], mode="mean",
                         include_last_offset=True)
    ids, offsets = torch.tensor([3, 3, 209, 0, 17, 3, 150]), torch.tensor([0, 2, 5, 7])
    ref = bag.to_dense().detach()
    want = torch.nn.functional.embedding_bag(ids, ref, offsets, mode="mean", include_last_offset=True)
    torch.testing.assert_close(bag(ids, offsets), want)
    assert calls == [1]  # trained, last offset at the end: pooled by row
    with torch.no_grad():
        bag(ids, offsets)
    bag(ids[:2], torch.tensor([0, 1, 2]))  # one bag an id: a gather
    bag.mode = "max"
    bag(ids, offsets)
    assert calls == [1]  # no gradient, one-hot or max: not by row


# (row factors, dim factors, ranks, the end with the fewer bag entries a row): 2, 3 and 4 cores
END_TABLE_SHAPES = [
    ([5, 7, 6], [2, 3, 2], [1, 3, 4, 1], "first"),
    ([6, 5, 4], [8, 4, 4], [1, 5, 6, 1], "last"),
    ([7, 9], [3, 5], [1, 4, 1], "first"),
    ([3, 4, 5, 2], [2, 2, 3, 2], [1, 3, 4, 2, 1], "last"),
    ([40, 3, 2], [2, 2, 4], [1, 4, 6, 1], "first"),
    ([5, 4, 2], [2, 3, 2], [1, 3, 4, 1], "first"),  # 8 suffixes: the id split is a shift and a mask
]


class _ForcedEnd(cpu_tt.EndTable):
    """An end table that leaves out the given end, whatever the rule would pick."""

    def __init__(self, first: bool, **kwargs):
        super().__init__(**kwargs)
        self.forced_first = first

    def _first_is_end(self, cores):
        return self.forced_first


def test_end_table_takes_the_end_that_fits():
    # a long first core (factor_rows' suffix_rows): the first end has more bag entries a row
    # (d_1 r_1 = 32 against 16), but only its table, over the 6 suffixes, fits the budget
    cores = make_cores([300, 3, 2], [8, 2, 2], [1, 4, 4, 1])
    table = cpu_tt.EndTable(max_bytes=4096)
    assert table.fits(cores) and table._first_is_end(cores)
    reversed_cores = make_cores([2, 3, 300], [8, 2, 2], [1, 4, 4, 1])  # only the last end's table fits
    assert not cpu_tt.EndTable(max_bytes=4096)._first_is_end(reversed_cores)
    # both fit: off the CPU the end with the fewer entries (shapes only: meta tensors)
    meta = [c.detach().to("meta") for c in cores]
    assert not cpu_tt.EndTable(max_bytes=1 << 30)._first_is_end(meta)


def test_end_table_prefers_the_end_whose_table_stays_in_the_caches():
    # both fit the budget; the first end has more bag entries a row (32 against 16) but a table of
    # 6 suffixes (1.5 KB) against 300 x 3 prefixes (58 KB): on the CPU the cached one is read faster
    cores = make_cores([300, 3, 2], [8, 2, 2], [1, 4, 4, 1])
    sizes = [cpu_tt.EndTable._end_bytes(cores, end) for end in (0, 2)]
    table = cpu_tt.EndTable(max_bytes=1 << 30, cache_bytes=sizes[0])
    assert sizes[0] < sizes[1] and table._first_is_end(cores)
    # both cached (or neither): the first end, whose rows need no transpose, despite its more entries
    assert cpu_tt.EndTable(max_bytes=1 << 30, cache_bytes=sizes[1])._first_is_end(cores)
    assert cpu_tt.EndTable(max_bytes=1 << 30, cache_bytes=1)._first_is_end(cores)
    idx = sample_indices(1800, 200, unique=False)
    torch.testing.assert_close(table.rows(cores, idx), tt_rows(cores, idx).detach(), rtol=1e-5, atol=1e-5)
    idx = sample_indices(1800, 200, unique=False)
    torch.testing.assert_close(table.rows(cores, idx), tt_rows(cores, idx).detach(), rtol=1e-5, atol=1e-5)
    assert table._first
    # only the last end's table cached (a long last core): the last end, fewer entries or not
    reversed_cores = make_cores([2, 3, 300], [8, 2, 2], [1, 4, 4, 1])
    small = cpu_tt.EndTable._end_bytes(reversed_cores, 2)
    assert not cpu_tt.EndTable(max_bytes=1 << 30, cache_bytes=small)._first_is_end(reversed_cores)


@pytest.mark.parametrize("row_factors,dim_factors,ranks,fewer", END_TABLE_SHAPES)
@pytest.mark.parametrize("end", ["first", "last"])
def test_end_table_equals_reference_for_any_order_and_follows_core_updates(row_factors, dim_factors, ranks, fewer,
                                                                           end):
    cores = make_cores(row_factors, dim_factors, ranks)
    n = 1
    for f in row_factors:
        n *= f
    idx = sample_indices(n, 150, unique=False)  # unsorted, with repeats
    assert cpu_tt.EndTable()._first_is_end(cores)  # on the CPU, everything fitting the caches: the first end
    meta = [c.detach().to("meta") for c in cores]
    assert cpu_tt.EndTable()._first_is_end(meta) == (fewer == "first")  # elsewhere: the fewer entries
    table = _ForcedEnd(end == "first")
    assert table.fits(cores)
    out = table.rows(cores, idx)
    assert table._first == (end == "first")
    assert table._table.numel() * 4 == table._end_bytes(cores, 0 if end == "first" else len(cores) - 1)
    torch.testing.assert_close(out, tt_rows(cores, idx).detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        cores[1].mul_(2.0)  # an optimizer step is an in-place update: the cache must notice
    torch.testing.assert_close(table.rows(cores, idx), tt_rows(cores, idx).detach(), rtol=1e-5, atol=1e-5)
    assert not cpu_tt.EndTable(max_bytes=100).fits(cores)


@cuda
@pytest.mark.parametrize("row_factors,dim_factors,ranks,end", END_TABLE_SHAPES)
def test_cuda_end_table_equals_reference(row_factors, dim_factors, ranks, end):
    cores = [c.detach().cuda() for c in make_cores(row_factors, dim_factors, ranks)]
    n = 1
    for f in row_factors:
        n *= f
    idx = sample_indices(n, 150, unique=False).cuda()
    torch.testing.assert_close(cpu_tt.EndTable().rows(cores, idx), tt_rows(cores, idx), rtol=1e-4, atol=1e-5)


def test_end_table_in_bf16_is_close_to_the_fp32_reference():
    cores = make_cores([5, 7, 6], [2, 3, 2], [1, 3, 4, 1], dtype=torch.bfloat16)
    idx = sample_indices(210, 80)
    out = cpu_tt.EndTable().rows(cores, idx)
    assert out.dtype == torch.bfloat16
    ref = tt_rows([c.float() for c in cores], idx).detach()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def assert_triton_matches_reference(cores, idx):
    """Rows and core gradients of the Triton kernels equal the reference's."""
    ref, ref_g = grads(tt_rows, cores, idx)
    out, out_g = grads(triton_tt.tt3_rows, cores, idx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@needs_triton
@pytest.mark.parametrize("row_factors,dim_factors,ranks", SHAPES)
def test_triton_kernels_equal_reference(row_factors, dim_factors, ranks):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (conftest)
    cores = [c.detach().to(device).requires_grad_() for c in make_cores(row_factors, dim_factors, ranks)]
    n = row_factors[0] * row_factors[1] * row_factors[2]
    idx = sample_indices(n, 80).to(device)
    assert_triton_matches_reference(cores, idx)


@needs_triton
def test_triton_duplicates_and_unsorted_indices_add_up():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cores = [c.detach().to(device).requires_grad_() for c in make_cores([4, 4, 5], [4, 4, 4], [1, 8, 8, 1])]
    idx = sample_indices(80, 60, unique=False).to(device)
    assert_triton_matches_reference(cores, idx)


@needs_triton
def test_triton_bf16_cores():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cores32 = make_cores([4, 4, 5], [4, 4, 4], [1, 8, 8, 1])
    cores = [c.detach().to(device, torch.bfloat16).requires_grad_() for c in cores32]
    idx = sample_indices(80, 40).to(device)
    ref, ref_g = grads(tt_rows, [c.detach().float().requires_grad_() for c in cores], idx)
    out, out_g = grads(triton_tt.tt3_rows, cores, idx)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in out_g)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (conftest)


@needs_triton
@pytest.mark.parametrize("row_factors,dim_factors,ranks", SHAPES + [([4, 5, 6], [8, 4, 4], [1, 8, 8, 1])])
@pytest.mark.parametrize("ids", ["sorted", "duplicates", "unsorted"])
def test_triton_suffix_path_equals_reference(row_factors, dim_factors, ranks, ids):
    cores = [c.detach().to(_device()).requires_grad_() for c in make_cores(row_factors, dim_factors, ranks)]
    n = row_factors[0] * row_factors[1] * row_factors[2]
    idx = sample_indices(n, 80, unique=ids == "sorted")
    idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(5))] if ids == "unsorted" \
        else torch.sort(idx).values
    idx = idx.to(_device())
    ref, ref_g = grads(tt_rows, cores, idx)
    out, out_g = grads(triton_suffix.suffix_rows, cores, idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_triton
def test_triton_suffix_path_frozen_cores_and_bf16():
    cores = [c.detach().to(_device()) for c in make_cores([4, 5, 6], [8, 4, 4], [1, 8, 8, 1])]
    idx = sample_indices(120, 50).to(_device())
    for frozen in range(3):  # gradients for the other two cores only
        cs = [c.clone().requires_grad_(j != frozen) for j, c in enumerate(cores)]
        out = triton_suffix.suffix_rows(cs, idx)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(frozen)).to(out.device)
        got = torch.autograd.grad(out, [c for c in cs if c.requires_grad], g)
        ref = [c.detach().clone().requires_grad_(j != frozen) for j, c in enumerate(cores)]
        want = torch.autograd.grad(tt_rows(ref, idx), [c for c in ref if c.requires_grad], g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    bf = [c.to(torch.bfloat16).requires_grad_() for c in cores]
    out, out_g = grads(triton_suffix.suffix_rows, bf, idx)
    ref, ref_g = grads(tt_rows, [c.detach().float().requires_grad_() for c in bf], idx)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in out_g)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


@needs_triton
def test_suffix_cache_serves_without_gradients_and_follows_core_updates():
    cores = [c.detach().to(_device()) for c in make_cores([4, 5, 6], [8, 4, 4], [1, 8, 8, 1])]
    idx = sample_indices(120, 50).to(_device())
    cache = triton_suffix.SuffixCache()
    with torch.no_grad():
        torch.testing.assert_close(triton_suffix.suffix_rows(cores, idx, cache), tt_rows(cores, idx))
        table = cache.table(cores)
        assert cache.table(cores) is table  # kept between calls
        cores[2].mul_(-0.5)  # an in-place update (an optimizer step) is seen
        torch.testing.assert_close(triton_suffix.suffix_rows(cores, idx, cache), tt_rows(cores, idx))
        assert cache.table(cores) is not table
    assert triton_suffix.suffix_bytes(cores) == 4 * 8 * 5 * 4 * 6 * 4
    assert not triton_suffix.SuffixCache(max_bytes=100).fits(cores)


def test_suffix_path_is_chosen_by_distinct_ids_per_digit_pair(monkeypatch):
    cores = make_cores([4, 5, 6], [8, 4, 4], [1, 8, 8, 1])  # 30 digit pairs x d3 4 vs FACTOR x ids x r2 8
    if not triton_tt.available():
        assert not triton_suffix.worthwhile(cores, 10 ** 6)
        return
    monkeypatch.setattr(triton_suffix, "FACTOR", 1.0)
    assert triton_suffix.worthwhile(cores, 15) and not triton_suffix.worthwhile(cores, 14)
    monkeypatch.setattr(triton_suffix, "MAX_BYTES", 1000)  # too big a table: never
    assert not triton_suffix.worthwhile(cores, 10 ** 6)
    assert not triton_suffix.worthwhile(cores[:2], 10 ** 6)


def test_dispatch_choices():
    cpu_cores = make_cores([5, 7, 6], [2, 3, 2], [1, 3, 4, 1])
    assert choose_kernel("auto", cpu_cores) == "cpu"
    assert choose_kernel("reference", cpu_cores) == "reference"
    with pytest.raises(ValueError, match="kernel should be one of"):
        choose_kernel("cuda", cpu_cores)


@pytest.mark.parametrize("kernel", ["reference", "cpu", "cpu-suffix"]
                         + (["triton", "triton-suffix"] if triton_tt.available() else []))
def test_layer_paths_agree_through_pooling_and_training(kernel, monkeypatch):
    # the Triton kernels run on CUDA where there is a GPU, in the interpreter on the CPU otherwise
    device = "cuda" if kernel.startswith("triton") and torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(triton_suffix, "FACTOR", 1e9 if kernel == "triton-suffix" else 0.0)
    chosen = []  # the CPU path's choice between the suffix table and the shared prefixes
    monkeypatch.setattr(cpu_suffix, "worthwhile", lambda cores, n: chosen.append(n) or kernel == "cpu-suffix")
    kernel = kernel.split("-")[0]
    torch.manual_seed(0)
    ref = TTEmbeddingBag(210, 12, rank=4, row_factors=[5, 7, 6], dim_factors=[2, 3, 2], mode="mean")
    ref.kernel = "reference"
    fast = TTEmbeddingBag(210, 12, rank=4, row_factors=[5, 7, 6], dim_factors=[2, 3, 2], mode="mean",
                          _cores=[c.detach().clone() for c in ref.cores], device=device)
    fast.kernel = kernel
    ids = torch.tensor([3, 3, 209, 0, 17, 3, 150])
    offsets = torch.tensor([0, 2, 5])
    w = torch.randn(3, 12)
    (ref(ids, offsets) * w).sum().backward()
    (fast(ids.to(device), offsets.to(device)) * w.to(device)).sum().backward()
    torch.testing.assert_close(fast(ids.to(device), offsets.to(device)).cpu(), ref(ids, offsets), rtol=1e-4,
                               atol=1e-5)
    for a, b in zip(fast.cores, ref.cores):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-5)
    assert bool(chosen) == kernel.startswith("cpu")  # (asked with the batch's 5 distinct ids)
    with torch.no_grad():  # inference: the CPU path serves from its prefix table
        torch.testing.assert_close(fast(ids.to(device), offsets.to(device)).cpu(), ref(ids, offsets), rtol=1e-4,
                                   atol=1e-5)


def test_embedding_auto_path_matches_dense_reconstruction():
    emb = TTEmbedding(1000, 16, rank=4)
    dense = emb.to_dense()
    ids = torch.tensor([[0, 999], [512, 0]])
    with torch.no_grad():
        torch.testing.assert_close(emb(ids), dense[ids], rtol=1e-5, atol=1e-6)


def cuda_training_step_matches_reference():
    """A training step of a 100k x 64 bag on CUDA's auto path against the reference path."""
    bag = TTEmbeddingBag(100_000, 64, rank=16, mode="sum", device="cuda")
    assert choose_kernel("auto", list(bag.cores)) == "triton"
    ids = torch.randint(0, 100_000, (4096,), device="cuda")
    offsets = torch.arange(0, 4096, 2, device="cuda")
    out = bag(ids, offsets)
    out.square().sum().backward()
    fast_grads = [c.grad.clone() for c in bag.cores]
    bag.zero_grad()
    bag.kernel = "reference"
    ref = bag(ids, offsets)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, c in zip(fast_grads, bag.cores):
        torch.testing.assert_close(a, c.grad, rtol=1e-3, atol=1e-4)


@cuda
@pytest.mark.parametrize("suffix", [False, True])
def test_cuda_auto_path_is_triton_and_matches_reference(variant, suffix, monkeypatch):
    monkeypatch.setattr(triton_suffix, "FACTOR", 1e9 if suffix else 0.0)
    cuda_training_step_matches_reference()


def test_distinct_ids_without_a_sort():
    from fpd_convert.kernels import cpu_dedup
    rng = np.random.default_rng(0)
    for n, limit, dtype in [(5000, 300, np.int64), (64, 1 << 20, np.int32), (1, 7, np.int64), (70000, 90000, np.int64)]:
        ids = rng.integers(0, limit, n).astype(dtype)
        distinct, inverse = cpu_dedup.distinct_ids(ids, limit)
        assert np.array_equal(np.sort(distinct), np.unique(ids))  # each id once, in some order
        assert inverse.dtype == np.int32 and np.array_equal(distinct[inverse], ids)
    empty = cpu_dedup.distinct_ids(np.zeros(0, np.int64), 10)
    assert empty[0].size == 0 and empty[1].size == 0
    for bad in ([3, -1, 2], [3, 10, 2], [-7]):  # a negative id must not be counted from the end
        with pytest.raises(IndexError):
            cpu_dedup.distinct_ids(np.array(bad), 10)
    assert cpu_dedup.distinct_ids(np.array([1, 2]), cpu_dedup.MAX_ROWS + 1) is None  # left to the sort


def test_distinct_ids_in_threads_each_use_their_own_map():
    import threading
    from fpd_convert.kernels import cpu_dedup
    failures = []

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(200):
            ids = rng.integers(0, 5000, 3000)
            distinct, inverse = cpu_dedup.distinct_ids(ids, 5000)
            if not (np.array_equal(distinct[inverse], ids) and distinct.size == np.unique(ids).size):
                failures.append(seed)
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
