"""Shapes of a TT-matrix view of an embedding table.

A table of shape ``(n, d)`` is viewed as a TT-matrix with row factors
``n_1 * ... * n_k >= n`` (the table is padded with zero rows up to the product)
and dim factors ``d_1 * ... * d_k == d``.  Row ``i`` has digits ``(i_1, ..., i_k)``
in the mixed radix ``(n_1, ..., n_k)``, most significant first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

SUPPORTED_ORDERS = (2, 3, 4)


def _check_order(order: int) -> None:
    if order not in SUPPORTED_ORDERS:
        raise ValueError(f"TT order should be one of {SUPPORTED_ORDERS} but got {order}")


def factor_rows(n: int, order: int = 3, suffix_rows: Optional[int] = None) -> List[int]:
    """Row factors whose product is ``>= n`` with the least padding.

    By default balanced: among the factorizations whose factors lie within about +-30% of
    ``n ** (1/order)`` the one with the smallest product wins; ties go to the most balanced
    one.  Factors are returned in descending order.

    ``suffix_rows`` instead fixes the product of the trailing factors ``n_2 ... n_k`` (split
    as evenly as possible) and gives the first factor the rest, ``ceil(n / suffix_rows)``.
    The product of all cores but the first then spans only ``suffix_rows`` digit
    combinations: the table that CPU inference caches (``suffix_rows x r_1 x d / d_1``
    floats, e.g. 512 KB at 512, rank 16 and ``d / d_1 = 16``) stays in the CPU's L2 cache, which made
    lookups on fresh batches 1.5x faster at 1M x 64 (docs/benchmarks.md).

    Example::

        >>> factor_rows(1_000_000, 3)
        [100, 100, 100]
        >>> factor_rows(1000, 2)
        [32, 32]
        >>> factor_rows(1_000_000, 3, suffix_rows=512)
        [1954, 32, 16]
    """
    _check_order(order)
    if n < 1:
        raise ValueError(f"number of rows should be >= 1 but got {n}")
    if suffix_rows is not None:
        suffix_rows = int(suffix_rows)
        if not 2 <= suffix_rows <= n // 2:
            raise ValueError(f"suffix rows should be between 2 and half the table's rows ({n // 2}) "
                             f"but got {suffix_rows}")
        tail = [suffix_rows] if order == 2 else factor_rows(suffix_rows, order - 1)
        return [-(-n // math.prod(tail))] + tail
    best = None

    def search(remaining: int, k: int, prefix: List[int]):
        nonlocal best
        if k == 1:
            factors = sorted(prefix + [max(1, remaining)], reverse=True)
            key = (math.prod(factors), factors[0] - factors[-1])
            if best is None or key < best[0]:
                best = (key, factors)
            return
        root = remaining ** (1.0 / k)
        lo = max(1, int(root * 0.7))
        hi = max(lo, math.ceil(root * 1.3))
        for f in range(lo, hi + 1):
            search(-(-remaining // f), k - 1, prefix + [f])

    search(n, order, [])
    return best[1]


def factor_dims(d: int, order: int = 3) -> List[int]:
    """Exact factors ``d_1 * ... * d_k == d``, as balanced as possible.

    Fallback for a ``d`` without a balanced factorization (a prime, say): the
    factorization is still exact, with factors of 1 where nothing else divides,
    e.g. ``factor_dims(13, 3) == [13, 1, 1]``.  The TT then compresses the rows only
    along those modes, which is correct but less effective.  Factors are returned
    in descending order.

    Example::

        >>> factor_dims(64, 3)
        [4, 4, 4]
        >>> factor_dims(128, 3)
        [8, 4, 4]
    """
    _check_order(order)
    if d < 1:
        raise ValueError(f"embedding dim should be >= 1 but got {d}")
    best = None

    def search(remaining: int, k: int, prefix: List[int]):
        nonlocal best
        if k == 1:
            factors = sorted(prefix + [remaining], reverse=True)
            key = (factors[0] / factors[-1], factors[0])
            if best is None or key < best[0]:
                best = (key, factors)
            return
        for f in range(1, remaining + 1):
            if remaining % f == 0:
                search(remaining // f, k - 1, prefix + [f])

    search(d, order, [])
    return best[1]


@dataclass
class TTShape:
    """Everything that fixes the layout of a TT table.

    ``ranks`` has ``order + 1`` entries with ``ranks[0] == ranks[-1] == 1``.
    Core ``j`` has shape ``(ranks[j], row_factors[j], dim_factors[j], ranks[j+1])``.
    """

    num_rows: int
    dim: int
    row_factors: List[int]
    dim_factors: List[int]
    ranks: List[int] = field(default_factory=list)

    def __post_init__(self):
        self.row_factors = [int(x) for x in self.row_factors]
        self.dim_factors = [int(x) for x in self.dim_factors]
        self.ranks = [int(x) for x in self.ranks]
        if len(self.row_factors) != len(self.dim_factors):
            raise ValueError(
                f"row and dim factors should have the same length but got "
                f"{self.row_factors} and {self.dim_factors}")
        _check_order(len(self.row_factors))
        if math.prod(self.row_factors) < self.num_rows:
            raise ValueError(f"row factors {self.row_factors} cover fewer than {self.num_rows} rows")
        if math.prod(self.dim_factors) != self.dim:
            raise ValueError(f"dim factors {self.dim_factors} do not multiply to dim {self.dim}")
        if self.ranks and (len(self.ranks) != self.order + 1 or self.ranks[0] != 1 or self.ranks[-1] != 1):
            raise ValueError(f"ranks should be [1, r_1, ..., r_{{k-1}}, 1] but got {self.ranks}")

    @property
    def order(self) -> int:
        return len(self.row_factors)

    @property
    def padded_rows(self) -> int:
        return math.prod(self.row_factors)

    @property
    def core_shapes(self) -> List[tuple]:
        r = self.ranks
        return [(r[j], self.row_factors[j], self.dim_factors[j], r[j + 1]) for j in range(self.order)]

    @property
    def param_count(self) -> int:
        """``sum_j r_{j-1} * n_j * d_j * r_j`` -- the number of TT parameters."""
        return tt_param_count(self.row_factors, self.dim_factors, self.ranks)

    def to_dict(self) -> dict:
        return {"num_rows": self.num_rows, "dim": self.dim, "row_factors": list(self.row_factors),
                "dim_factors": list(self.dim_factors), "ranks": list(self.ranks)}

    @classmethod
    def from_dict(cls, d: dict) -> "TTShape":
        return cls(int(d["num_rows"]), int(d["dim"]), d["row_factors"], d["dim_factors"], d["ranks"])


def tt_param_count(row_factors: Sequence[int], dim_factors: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of parameters of TT cores: ``sum_j ranks[j] * n_j * d_j * ranks[j+1]``."""
    return sum(ranks[j] * row_factors[j] * dim_factors[j] * ranks[j + 1] for j in range(len(row_factors)))


def max_tt_ranks(row_factors: Sequence[int], dim_factors: Sequence[int]) -> List[int]:
    """The largest meaningful ranks: bond j is limited by both sides of its unfolding."""
    modes = [n * d for n, d in zip(row_factors, dim_factors)]
    out = [1]
    for j in range(1, len(modes)):
        out.append(min(math.prod(modes[:j]), math.prod(modes[j:])))
    out.append(1)
    return out
