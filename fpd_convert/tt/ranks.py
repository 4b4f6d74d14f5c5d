"""Choosing TT ranks: explicit, by compression ratio, or by a byte budget.

The tolerance mode (``eps``) picks ranks from singular values and so lives with
the decomposition in :mod:`fpd_convert.tt.decompose`.
"""
from __future__ import annotations

import warnings
from typing import List, Sequence, Union

from .shapes import max_tt_ranks, tt_param_count


def clamp_ranks(rank: Union[int, Sequence[int]], row_factors: Sequence[int],
                dim_factors: Sequence[int], warn: bool = True) -> List[int]:
    """Full rank list ``[1, r_1, ..., r_{k-1}, 1]`` from an int or a list of inner ranks.

    ``rank`` may be an int (same rank on every bond), the ``k-1`` inner ranks, or all
    ``k+1`` ranks with ones at both ends.  A rank above what its unfolding allows is
    lowered to that maximum with a warning (it could only add zero singular values).
    """
    order = len(row_factors)
    if isinstance(rank, int):
        inner = [rank] * (order - 1)
    else:
        rank = [int(r) for r in rank]
        if len(rank) == order + 1:
            if rank[0] != 1 or rank[-1] != 1:
                raise ValueError(f"a full rank list should start and end with 1 but got {rank}")
            inner = rank[1:-1]
        elif len(rank) == order - 1:
            inner = rank
        else:
            raise ValueError(
                f"rank should be an int, {order - 1} inner ranks or {order + 1} ranks for a TT of "
                f"order {order} but got {len(rank)} values: {rank}")
    if any(r < 1 for r in inner):
        raise ValueError(f"TT ranks should be >= 1 but got {inner}")
    limit = max_tt_ranks(row_factors, dim_factors)
    full = [1] + list(inner) + [1]
    clamped = [min(r, m) for r, m in zip(full, limit)]
    if warn and clamped != full:
        warnings.warn(f"TT rank {full} exceeds what the shape allows ({limit}); clamped to {clamped}",
                      stacklevel=3)
    return clamped


def ranks_for_params(max_params: float, row_factors: Sequence[int], dim_factors: Sequence[int]) -> List[int]:
    """The largest uniform rank whose parameter count is ``<= max_params``.

    Raises ``ValueError`` when even rank 1 does not fit.
    """
    top = max(max_tt_ranks(row_factors, dim_factors))
    lo, hi = 1, top
    one = clamp_ranks(1, row_factors, dim_factors, warn=False)
    if tt_param_count(row_factors, dim_factors, one) > max_params:
        raise ValueError(
            f"the budget allows {int(max_params)} parameters but rank 1 already needs "
            f"{tt_param_count(row_factors, dim_factors, one)}")
    while lo < hi:  # largest r with count(r) <= max_params; count grows with r
        mid = (lo + hi + 1) // 2
        if tt_param_count(row_factors, dim_factors, clamp_ranks(mid, row_factors, dim_factors, warn=False)) <= max_params:
            lo = mid
        else:
            hi = mid - 1
    return clamp_ranks(lo, row_factors, dim_factors, warn=False)


def ranks_for_ratio(ratio: float, num_rows: int, dim: int, row_factors: Sequence[int],
                    dim_factors: Sequence[int]) -> List[int]:
    """Largest uniform rank with ``num_rows * dim / params >= ratio``."""
    if ratio <= 0:
        raise ValueError(f"compression ratio should be > 0 but got {ratio}")
    return ranks_for_params(num_rows * dim / ratio, row_factors, dim_factors)


def ranks_for_budget(budget_bytes: int, row_factors: Sequence[int], dim_factors: Sequence[int],
                     bytes_per_param: int = 4) -> List[int]:
    """Largest uniform rank whose cores take at most ``budget_bytes``."""
    if budget_bytes <= 0:
        raise ValueError(f"byte budget should be > 0 but got {budget_bytes}")
    return ranks_for_params(budget_bytes / bytes_per_param, row_factors, dim_factors)
