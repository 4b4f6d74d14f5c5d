"""Choosing a table's row factorization: balanced, or a long first core over a small suffix.

At a given rank the balanced factorization is not the smallest: its middle core holds
``r^2`` numbers per digit value.  A long first core over ``S`` suffix rows
(:func:`~fpd_convert.tt.shapes.factor_rows` with ``suffix_rows=S``) moves the parameters
into the first core, which grows as ``n / S``.  Between the two lies a byte-neutral
point: the smallest ``S`` whose TT is no larger than the balanced one.  Its small suffix
table (``S x r_1 x d / d_1`` floats: 1 MB at 1M x 64 rank 16, against 10 MB balanced) keeps
CPU lookups in cache, 1.3-1.6x faster on fresh batches, and it gave the same AUC as balanced on a trained
1M-row table (docs/benchmarks.md, eleventh session).  That point is the ``auto`` layout.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

from .ranks import clamp_ranks
from .shapes import factor_rows, tt_param_count

LAYOUTS = ("auto", "balanced")


def parse_suffix_rows(value: Union[str, int, None]) -> Union[str, int]:
    """``"auto"``, ``"balanced"`` or a suffix row count (an int >= 2) from text or an int;
    ``None`` means ``"auto"``."""
    if value is None:
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        text = str(value).strip().lower()
        if text in LAYOUTS:
            return text
        try:
            number = int(text)
        except ValueError:
            raise ValueError(f"suffix rows should be 'auto', 'balanced' or an int >= 2 but got {value!r}") from None
    if number < 2:
        raise ValueError(f"suffix rows should be 'auto', 'balanced' or an int >= 2 but got {value!r}")
    return number


def byte_neutral_suffix(num_rows: int, dim_factors: Sequence[int], rank: Union[int, Sequence[int]]) -> Optional[int]:
    """The smallest power-of-two suffix whose TT at ``rank`` has no more parameters than the
    balanced TT at the same rank, or ``None`` where there is none (order 2, small tables).

    Example::

        >>> byte_neutral_suffix(1_000_000, [4, 4, 4], 16)  # [977, 32, 32]: 97,344 params, balanced 115,200
        1024
    """
    order = len(dim_factors)
    if order < 3:  # two cores: the balanced split is already the smallest
        return None

    def params(row_factors):
        return tt_param_count(row_factors, dim_factors, clamp_ranks(rank, row_factors, dim_factors, warn=False))

    limit = params(factor_rows(num_rows, order))
    suffix = 4 ** (order - 1)  # at least two rows a trailing digit
    while suffix <= num_rows // 2:
        if params(factor_rows(num_rows, order, suffix)) <= limit:
            return suffix
        suffix *= 2
    return None


def choose_row_factors(num_rows: int, dim_factors: Sequence[int], rank: Union[int, Sequence[int], None],
                       suffix_rows: Union[str, int, None] = "auto") -> List[int]:
    """Row factors for ``suffix_rows``: ``"balanced"``; an int (that suffix); ``"auto"`` (the
    byte-neutral suffix at ``rank``, balanced where there is none or ``rank`` is ``None``)."""
    choice = parse_suffix_rows(suffix_rows)
    order = len(dim_factors)
    if choice == "balanced":
        return factor_rows(num_rows, order)
    if choice == "auto":
        suffix = byte_neutral_suffix(num_rows, dim_factors, rank) if rank is not None else None
        return factor_rows(num_rows, order, suffix)
    return factor_rows(num_rows, order, choice)
