import math
import warnings

import numpy as np
import pytest
from tensorly.decomposition import tensor_train

from fpd_convert.tt import (decompose_table, factor_dims, factor_rows, max_tt_ranks, table_to_tt_tensor,
                            tt_param_count, tt_svd_tolerance, tt_to_table)
from conftest import low_tt_rank_table


@pytest.mark.parametrize("n,order", [(1, 3), (7, 3), (1000, 3), (26_000, 3), (1_000_000, 3), (1_000_003, 3),
                                     (10_000_000, 4), (39_884_406, 3), (12_345, 2)])
def test_row_factors_cover_with_little_padding(n, order):
    f = factor_rows(n, order)
    assert len(f) == order and math.prod(f) >= n
    assert math.prod(f) - n <= max(2, n * 0.002)  # a fraction of a percent of padding
    if n > 1000:
        root = n ** (1 / order)
        assert max(f) <= 1.5 * root and min(f) >= 0.6 * root


def test_row_factors_exact_cubes():
    assert factor_rows(1_000_000, 3) == [100, 100, 100]


@pytest.mark.parametrize("n,order,suffix", [(1_000_000, 3, 512), (1_000_000, 2, 512), (10_000_000, 4, 512),
                                            (39_884_406, 3, 1000), (60_000, 3, 100), (1000, 3, 7)])
def test_row_factors_with_fixed_suffix(n, order, suffix):
    f = factor_rows(n, order, suffix_rows=suffix)
    tail = math.prod(f[1:])
    assert len(f) == order and math.prod(f) >= n
    assert suffix <= tail <= suffix * 1.1  # the trailing factors cover the suffix rows with little padding
    assert f[0] == -(-n // tail)  # the first factor takes the rest, no more
    if order > 2:
        assert f[1:] == factor_rows(tail, order - 1)  # split evenly


def test_row_factors_refuse_a_suffix_that_leaves_no_first_factor():
    assert factor_rows(1_000_000, 3, suffix_rows=512) == [1954, 32, 16]
    for bad in (1, 0, 600_000):
        with pytest.raises(ValueError, match="suffix rows should be between 2 and"):
            factor_rows(1_000_000, 3, suffix_rows=bad)


@pytest.mark.parametrize("d,expected", [(64, [4, 4, 4]), (128, [8, 4, 4]), (16, [4, 2, 2]), (13, [13, 1, 1]),
                                        (1, [1, 1, 1])])
def test_dim_factors_exact_and_balanced(d, expected):
    assert factor_dims(d, 3) == expected


def test_bad_orders_and_sizes():
    with pytest.raises(ValueError, match="order"):
        factor_rows(100, 5)
    with pytest.raises(ValueError, match="rows"):
        factor_rows(0, 3)


def test_interleaving_roundtrip(rng):
    w = rng.standard_normal((997, 12)).astype(np.float32)
    rf, df = factor_rows(997, 3), factor_dims(12, 3)
    t = table_to_tt_tensor(w, rf, df)
    assert t.shape == tuple(n * d for n, d in zip(rf, df))
    # A full-rank TT of that tensor maps back to the same rows.
    cores = [np.asarray(c).reshape(c.shape[0], n, d, c.shape[2])
             for c, n, d in zip(tensor_train(t, rank=max_tt_ranks(rf, df)), rf, df)]
    np.testing.assert_allclose(tt_to_table(cores, 997), w, atol=1e-4)


def test_full_rank_reconstructs_exactly(rng):
    w = rng.standard_normal((1000, 16)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dec = decompose_table(w, rank=10_000)
    assert dec.relative_error < 1e-5
    np.testing.assert_allclose(tt_to_table(dec.cores, 1000), w, atol=1e-4)


def test_same_as_tensorly_at_equal_ranks(rng):
    w = low_tt_rank_table(4000, 32, rank=6, noise=0.3)
    rf, df = factor_rows(4000, 3), factor_dims(32, 3)
    ours = tt_svd_tolerance(w, rf, df, eps=0.2)
    ranks = [1] + [c.shape[3] for c in ours]
    ref = tensor_train(table_to_tt_tensor(w, rf, df), rank=ranks)
    assert [f.shape[2] for f in ref] == ranks[1:]
    np.testing.assert_allclose(tt_to_table(ours, 4000),
                               tt_to_table([np.asarray(f).reshape(f.shape[0], n, d, f.shape[2])
                                            for f, n, d in zip(ref, rf, df)], 4000), atol=2e-4)


def test_error_falls_as_rank_grows():
    w = low_tt_rank_table(8000, 32, rank=8, noise=0.05)
    errors = [decompose_table(w, rank=r).relative_error for r in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[3] < 0.08  # at the true rank only the noise is left


@pytest.mark.parametrize("eps", [0.5, 0.2, 0.06, 0.01])
def test_tolerance_mode_meets_eps(eps):
    w = low_tt_rank_table(8000, 32, rank=8, noise=0.05)
    dec = decompose_table(w, tol=eps)
    assert dec.relative_error <= eps + 1e-6
    if eps >= 0.2:  # not trivially full rank
        assert dec.shape.param_count < 8000 * 32


def test_tolerance_zero_is_exact(rng):
    w = rng.standard_normal((500, 8)).astype(np.float32)
    assert decompose_table(w, tol=0.0).relative_error < 1e-5


@pytest.mark.parametrize("budget", [2_000, 10_000, 40_000])
def test_budget_mode_stays_within_budget(budget):
    w = low_tt_rank_table(8000, 32, rank=8, noise=0.05)
    dec = decompose_table(w, budget_bytes=budget)
    assert dec.shape.param_count * 4 <= budget
    bigger = decompose_table(w, rank=dec.shape.ranks[1] + 1)  # the next rank would not fit
    assert bigger.shape.param_count * 4 > budget


def test_ratio_mode_reaches_ratio():
    w = low_tt_rank_table(8000, 32, rank=8, noise=0.05)
    dec = decompose_table(w, ratio=50)
    assert 8000 * 32 / dec.shape.param_count >= 50


def test_param_count_formula():
    assert tt_param_count([10, 10, 10], [4, 2, 2], [1, 8, 8, 1]) == 10 * 4 * 8 + 8 * 10 * 2 * 8 + 8 * 10 * 2


@pytest.mark.parametrize("shape", [(0, 8), (8, 0)])
def test_empty_tables_refused(shape):
    with pytest.raises(ValueError, match="at least one row and one column"):
        decompose_table(np.zeros(shape, np.float32), rank=2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(rng, bad):
    w = rng.standard_normal((100, 8)).astype(np.float32)
    w[17, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf values in 1 of its 100 rows"):
        decompose_table(w, rank=2)


def test_impossible_rank_is_clamped_with_warning(rng):
    w = rng.standard_normal((1000, 16)).astype(np.float32)
    with pytest.warns(UserWarning, match="clamped to"):
        dec = decompose_table(w, rank=[500, 7])
    assert dec.shape.ranks == [1, 40, 7, 1]


def test_rank_modes_are_exclusive(rng):
    w = rng.standard_normal((100, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="exactly one of"):
        decompose_table(w, rank=2, tol=0.1)
    with pytest.raises(ValueError, match="rank 1 already needs"):
        decompose_table(w, budget_bytes=8)
    with pytest.raises(ValueError, match="2D"):
        decompose_table(np.zeros(10, np.float32), rank=2)


@pytest.mark.parametrize("svd", ["truncated_svd", "randomized_svd"])
@pytest.mark.parametrize("n, rf, df", [(997, [10, 10, 10], [4, 2, 2]), (5000, [80, 63], [4, 4]),
                                       (997, [4, 5, 5, 10], [2, 2, 2, 2])])
def test_ladder_errors_without_rebuilding_equal_the_rebuilt_ones(rng, svd, n, rf, df):
    # the ladder's errors come from the first core's projection (and the padded rows); they must be the
    # error of the table rebuilt from its cores, for the exact and the randomized SVD alike
    from fpd_convert.tt import clamp_ranks, relative_error
    from fpd_convert.tt.decompose import tt_svd_ladder
    w = (rng.standard_normal((n, 16)) @ rng.standard_normal((16, 16))).astype(np.float32)
    w[:, :4] += 3 * rng.standard_normal((n, 1)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lists = [clamp_ranks(r, rf, df) for r in (2, 5, 12)]
    decs = tt_svd_ladder(w, rf, df, lists, svd, 0)
    errors = [d.relative_error for d in decs]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]
    for dec in decs:
        assert dec.relative_error == pytest.approx(relative_error(w, dec.cores), abs=1e-5)


def test_the_candidates_sketch_is_close_to_the_exact_ladder(rng):
    # a slowly decaying spectrum, as trained tables have: the sketch's errors stay within 0.003 of the
    # exact SVD's at every rank, and each is the error of its own cores
    from fpd_convert.tt import relative_error
    from fpd_convert.tt.decompose import Sketch, tt_svd_ladder
    n, rf, df = 60_000, [235, 16, 16], [4, 2, 2]
    w = (rng.standard_normal((n, 16)) * (1 + np.arange(16)) ** -0.3).astype(np.float32)
    w += (rng.standard_normal((n, 1)) * rng.standard_normal((1, 16))).astype(np.float32)
    lists = [[1, r, r, 1] for r in (4, 16, 48)]
    exact = tt_svd_ladder(w, rf, df, lists, "truncated_svd", 0)
    sketch = tt_svd_ladder(w, rf, df, lists, "truncated_svd", 0, sketch=Sketch(0))
    for e, s in zip(exact, sketch):
        assert abs(s.relative_error - e.relative_error) <= 0.003
        assert s.relative_error == pytest.approx(relative_error(w, s.cores), abs=1e-5)


def test_the_candidates_evaluation_sample_estimates_the_weighted_sums(rng):
    from fpd_convert.convert.importance import TableEval
    n = 50_000
    weights = rng.pareto(1.2, n) + 0.01
    rows = rng.standard_normal((n, 8)).astype(np.float32)
    ev = TableEval(np.arange(n), weights, rows)
    assert ev.subset(n) is ev
    sub = ev.subset(8_192, seed=1)
    assert sub.ids.size == 8_192 and np.all(np.diff(sub.ids) > 0)
    heavy = np.argsort(-weights)[:4_096]
    assert np.isin(heavy, sub.ids).all()  # the heaviest half is always in
    err = rng.standard_normal((n, 8)) * 0.1
    full = float(np.sum(weights * np.sum(err ** 2, axis=1)))
    est = float(np.sum(sub.weights * np.sum(err[sub.ids] ** 2, axis=1)))
    assert est == pytest.approx(full, rel=0.05)  # the sample stands for the rest


def test_optimizer_importance_is_the_root_of_the_accumulated_squares():
    from fpd_convert.tt.importance import importance_from, top_rows
    sums = np.array([0.0, 4.0, 400.0, 1.0, 9.0])
    norms = np.array([1.0, 2.0, 3.0, 4.0, 0.5])
    imp = importance_from(norms, "optimizer", sums)
    np.testing.assert_allclose(imp, np.sqrt(sums) + 1e-3 * norms / 4.0)
    assert list(top_rows(imp, 5)) == list(top_rows(sums + 1e-3 * norms / 4.0, 5))  # the same ranking
    data = importance_from(norms, "data", sums)  # lookup counts stay counts
    np.testing.assert_allclose(data, sums + 1e-3 * norms / 4.0)


def test_a_sketch_starts_the_next_table_from_its_subspace(rng):
    # two tables that differ in 1% of their rows: the second, from the first's subspace with one power
    # iteration, is as close to its exact SVD as a cold start with four
    from fpd_convert.tt.decompose import SKETCH_OVERSAMPLES, Sketch
    a = (rng.standard_normal((900, 40)) @ rng.standard_normal((40, 1000))
         + 0.3 * rng.standard_normal((900, 1000))).astype(np.float32)
    b = a.copy()
    b[rng.choice(900, 9, replace=False)] = rng.standard_normal((9, 1000)).astype(np.float32)
    exact = np.linalg.svd(b.astype(np.float64), compute_uv=False)

    def captured(u):
        return float(np.sum((u.T @ b.astype(np.float64)) ** 2))

    sk = Sketch(0)
    sk.svd(a, 32)
    assert sk.basis.shape == (900, 32 + SKETCH_OVERSAMPLES)  # its subspace, left for the next table
    warm = sk.svd(b, 32)
    cold = Sketch(1).svd(b, 32)
    best = float(np.sum(exact[:32] ** 2))
    assert captured(warm[0]) >= 0.999 * best and captured(cold[0]) >= 0.999 * best
    np.testing.assert_allclose(warm[1], exact[:32], rtol=2e-3)
