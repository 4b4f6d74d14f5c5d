"""The row layout compress and bench pick: a long first core no larger than the balanced TT."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

import fpd_convert
from fpd_convert.cli import main
from fpd_convert.convert.plan import plan_table
from fpd_convert.tt import (byte_neutral_suffix, choose_row_factors, clamp_ranks, factor_dims, factor_rows,
                            parse_suffix_rows, tt_param_count)

from layouts import batch, dlrm_checkpoint, dlrm_state


def params(n, row_factors, dim_factors, rank):
    assert math.prod(row_factors) >= n
    return tt_param_count(row_factors, dim_factors, clamp_ranks(rank, row_factors, dim_factors, warn=False))


def test_the_byte_neutral_suffix_of_the_cpu_target_table():
    df = factor_dims(64, 3)
    assert byte_neutral_suffix(1_000_000, df, 16) == 1024
    assert choose_row_factors(1_000_000, df, 16) == [977, 32, 32]
    assert params(1_000_000, [977, 32, 32], df, 16) == 97_344 < params(1_000_000, [100, 100, 100], df, 16) == 115_200


@pytest.mark.parametrize("n,dim,rank", [(1_000_000, 64, 16), (10_000_000, 128, 32), (60_000, 16, 16), (200_000, 128, 32),
                                        (1_000_000, 64, 4), (40_000_000, 128, 64), (5_000, 16, 4), (300_000, 32, [8, 24])])
def test_auto_is_never_larger_than_balanced_and_is_the_smallest_such_suffix(n, dim, rank):
    df = factor_dims(dim, 3)
    balanced = params(n, factor_rows(n, 3), df, rank)
    suffix = byte_neutral_suffix(n, df, rank)
    rf = choose_row_factors(n, df, rank)
    assert params(n, rf, df, rank) <= balanced
    if suffix is None:
        assert rf == factor_rows(n, 3)
    else:
        assert rf == factor_rows(n, 3, suffix) and math.prod(rf[1:]) >= suffix
        assert suffix == 16 or params(n, factor_rows(n, 3, suffix // 2), df, rank) > balanced


def test_order_two_tolerance_and_explicit_choices():
    assert byte_neutral_suffix(1_000_000, [8, 8], 16) is None  # two cores: balanced is the smallest
    assert choose_row_factors(1_000_000, [8, 8], 16) == factor_rows(1_000_000, 2)
    assert choose_row_factors(1_000_000, [4, 4, 4], None) == [100, 100, 100]  # no ranks (tolerance mode)
    assert choose_row_factors(1_000_000, [4, 4, 4], 16, "balanced") == [100, 100, 100]
    assert choose_row_factors(1_000_000, [4, 4, 4], 16, 512) == [1954, 32, 16]
    assert choose_row_factors(1_000_000, [4, 4, 4], 16, "512") == [1954, 32, 16]
    assert choose_row_factors(1_000_000, [2, 2, 4, 4], 16) == factor_rows(1_000_000, 4,
                                                                         byte_neutral_suffix(1_000_000, [2, 2, 4, 4], 16))
    assert parse_suffix_rows(None) == "auto" and parse_suffix_rows(" Balanced ") == "balanced"
    for bad in ("x", "1", 0, "-4", "2.5"):
        with pytest.raises(ValueError, match="suffix rows should be 'auto', 'balanced' or an int"):
            parse_suffix_rows(bad)


def test_plans_by_rank_ratio_budget_and_tolerance():
    p = plan_table("k", "t", 1_000_000, 64, rank=16)
    assert p.row_factors == [977, 32, 32] and p.ranks == [1, 16, 16, 1]
    assert plan_table("k", "t", 1_000_000, 64, rank=16, suffix_rows="balanced").row_factors == [100, 100, 100]
    # a ratio: the layout is chosen at the balanced shape's rank, then the ranks fill the same budget on it
    ratio = 1_000_000 * 64 / 115_300
    bal = plan_table("k", "t", 1_000_000, 64, ratio=ratio, suffix_rows="balanced")
    auto = plan_table("k", "t", 1_000_000, 64, ratio=ratio)
    assert bal.ranks == [1, 16, 16, 1] and auto.row_factors == [977, 32, 32]
    assert auto.ranks[1] > 16 and tt_param_count(auto.row_factors, auto.dim_factors, auto.ranks) <= 115_200
    budget = plan_table("k", "t", 1_000_000, 64, budget_bytes=115_200 * 4)
    assert budget.row_factors == auto.row_factors and budget.ranks == auto.ranks
    assert plan_table("k", "t", 1_000_000, 64, tol=0.5).row_factors == [100, 100, 100]


def test_compress_picks_the_long_first_core_by_default_and_keeps_balanced_on_request(tmp_path):
    s = dlrm_state(rows=[20_000, 50, 8_000], m=16)
    torch.save(dlrm_checkpoint(s), tmp_path / "m.pt")
    out = {}
    for choice in ("auto", "balanced"):
        args = ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / f"{choice}.safetensors"), "--rank", "16",
                "--num-largest", "1", "--importance", "none", "--json"]
        r = CliRunner().invoke(main, args + ([] if choice == "auto" else ["--suffix-rows", choice]))
        assert r.exit_code == 0, r.output
        out[choice] = json.loads(r.stdout)["tables"][0]
    df = out["auto"]["dim_factors"]
    assert out["auto"]["row_factors"] == choose_row_factors(20_000, df, 16) != out["balanced"]["row_factors"]
    assert out["balanced"]["row_factors"] == factor_rows(20_000, 3)
    assert out["auto"]["bytes_after"] <= out["balanced"]["bytes_after"]
    model = fpd_convert.load(tmp_path / "auto.safetensors")
    assert model.emb_l[0].tt_shape.row_factors == out["auto"]["row_factors"]
    dense, ids = batch()
    with torch.no_grad():
        assert torch.isfinite(model(dense, ids)).all()
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "m.pt"), "-o", str(tmp_path / "bad.safetensors"),
                                  "--suffix-rows", "many"])
    assert r.exit_code != 0 and "suffix rows should be 'auto', 'balanced' or an int" in r.output, r.output
    assert not (tmp_path / "bad.safetensors").exists()


def test_bench_times_the_layout_compress_would_pick():
    args = ["bench", "--rows", "20000", "--dim", "16", "--rank", "16", "--batch", "64", "--reps", "1", "--json"]
    picked = {}
    for extra in ([], ["--suffix-rows", "balanced"]):
        r = CliRunner().invoke(main, args + extra)
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout)["lookups"]
        picked[bool(extra)] = result["row_factors"]
        # the end CPU serving reads (both tables are small here: the one with fewer bag entries) and its table
        assert result["cpu_serving"]["end"] in ("first", "last") and result["cpu_serving"]["table_bytes"] > 0
    assert picked[False] == choose_row_factors(20_000, factor_dims(16, 3), 16) != picked[True] == factor_rows(20_000, 3)
