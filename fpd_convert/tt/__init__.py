"""TT math: shapes, ranks and TT-SVD of embedding tables (numpy + TensorLy, no I/O)."""
from .decompose import (TTDecomposition, decompose_table, relative_error, resolve_ranks, table_to_tt_tensor,
                        tt_svd, tt_svd_tolerance, tt_to_table)
from .streaming import stream_plan, streaming_peak_bytes, streaming_tt_svd
from .layout import byte_neutral_suffix, choose_row_factors, parse_suffix_rows
from .ranks import clamp_ranks, ranks_for_budget, ranks_for_params, ranks_for_ratio
from .shapes import TTShape, factor_dims, factor_rows, max_tt_ranks, tt_param_count

__all__ = ["TTDecomposition", "decompose_table", "relative_error", "resolve_ranks", "stream_plan",
           "streaming_peak_bytes", "streaming_tt_svd", "table_to_tt_tensor", "tt_svd",
           "tt_svd_tolerance", "tt_to_table", "byte_neutral_suffix", "choose_row_factors", "parse_suffix_rows",
           "clamp_ranks", "ranks_for_budget", "ranks_for_params",
           "ranks_for_ratio", "TTShape", "factor_dims", "factor_rows", "max_tt_ranks", "tt_param_count"]
