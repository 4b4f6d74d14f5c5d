"""Spreading a byte budget over tables where it buys the most.

Each table offers candidates (a configuration, its exact byte count, its error); the
objective is the sum over tables of the squared importance-weighted relative errors.
Greedy marginal analysis: start every table at its cheapest candidate, then repeatedly
take the upgrade (any dearer, better candidate of one table) with the largest error
reduction per extra byte that still fits the budget, until none fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class Candidate:
    config: dict
    nbytes: int
    error: float  # objective contribution: squared weighted relative error
    extra: dict = field(default_factory=dict)


class BudgetError(ValueError):
    """The budget is below the cheapest configuration of the tables."""


def allocate(candidates: Dict[str, List[Candidate]], budget: int) -> Dict[str, Candidate]:
    """One candidate per table, total bytes <= ``budget``, greedy on error per byte."""
    chosen = {k: min(c, key=lambda x: (x.nbytes, x.error)) for k, c in candidates.items()}
    total = sum(c.nbytes for c in chosen.values())
    if total > budget:
        raise BudgetError(f"the budget of {budget:,} bytes is below the smallest configuration of these tables "
                          f"({total:,} bytes); raise it or compress fewer tables")
    while True:
        best, best_gain = None, 0.0
        for k, options in candidates.items():
            cur = chosen[k]
            for c in options:
                extra = c.nbytes - cur.nbytes
                if extra <= 0 or c.error >= cur.error or total + extra > budget:
                    continue
                gain = (cur.error - c.error) / extra
                if gain > best_gain:
                    best, best_gain = (k, c), gain
        if best is None:
            return chosen
        k, c = best
        total += c.nbytes - chosen[k].nbytes
        chosen[k] = c
