"""Where each row of a TT table with a row map and exact rows lives, found in one lookup.

A row is at its own TT position, at a TT position the row map gives it, or in the exact
rows.  :func:`build_row_index` merges both features into one sorted id list with one int64
code per id: the TT position (``>= 0``) or ``-1 - k`` for exact row ``k`` (an exact row
wins over the map).  :func:`row_codes` answers a batch of ids with one search instead of
one per feature.

On the CPU the search is a rank query on a bit set (one bit per table row, plus one
count per 64 rows: 0.25 bytes a row), 2x faster than ``np.searchsorted`` over the sorted
list; on other devices it is ``torch.searchsorted``.  Traced lookups search the sorted list
within buckets of ids (:func:`index_buckets`, held with the index), in gathers and compares.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

_ONE = np.uint64(1)


def build_row_index(map_from: Optional[torch.Tensor], map_to: Optional[torch.Tensor],
                    exact_ids: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ids, codes)``: the sorted ids that do not sit at their own TT position, and their codes."""
    parts_ids, parts_codes = [], []
    if map_from is not None and map_from.numel():
        parts_ids.append(map_from.long())
        parts_codes.append(map_to.long())
    if exact_ids is not None and exact_ids.numel():
        parts_ids.append(exact_ids.long())
        parts_codes.append(-1 - torch.arange(exact_ids.numel(), device=exact_ids.device))
    if not parts_ids:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    ids, codes = torch.cat(parts_ids), torch.cat(parts_codes)
    # stable sort by id: a row both moved by the map and exact appears twice, the exact code last
    order = torch.sort(ids, stable=True).indices
    ids, codes = ids[order], codes[order]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:-1] = ids[1:] != ids[:-1]
    return ids[keep].contiguous(), codes[keep].contiguous()


class BitRank:
    """Rank queries over a set of sorted row ids in ``[0, num_rows)``, on the CPU.

    ``find(q)`` gives, for each query id, whether it is in the set and its index in the
    sorted list (where it is).
    """

    def __init__(self, ids: np.ndarray, num_rows: int):
        ids = np.asarray(ids, dtype=np.int64)
        self.words = np.zeros((num_rows + 63) // 64, dtype=np.uint64)
        np.bitwise_or.at(self.words, ids >> 6, np.left_shift(_ONE, (ids & 63).astype(np.uint64)))
        self.before = np.zeros(self.words.size, dtype=np.int64)  # set bits in the words before
        np.cumsum(_popcount(self.words)[:-1], out=self.before[1:])

    def find(self, query: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        word_at = query >> 6
        words = self.words[word_at]
        bit = (query & 63).astype(np.uint64)
        found = ((words >> bit) & _ONE).astype(bool)
        at = self.before[word_at] + _popcount(words & ((_ONE << bit) - _ONE))
        return found, at


def _popcount(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words).astype(np.int64)
    return np.unpackbits(words.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1, dtype=np.int64)


def row_codes(index_ids: torch.Tensor, index_codes: torch.Tensor, query: torch.Tensor,
              bit_rank: Optional[BitRank] = None) -> torch.Tensor:
    """The code of each query id: its own id when the index does not list it (int64)."""
    if index_ids.numel() == 0:
        return query
    if query.device.type == "cpu":
        q = query.numpy()
        if bit_rank is not None:
            found, at = bit_rank.find(q)
        else:
            at = np.minimum(np.searchsorted(index_ids.numpy(), q), index_ids.numel() - 1)
            found = index_ids.numpy()[at] == q
        return torch.from_numpy(np.where(found, index_codes.numpy()[np.minimum(at, index_ids.numel() - 1)], q))
    at = torch.searchsorted(index_ids, query).clamp_(max=index_ids.numel() - 1)
    return torch.where(index_ids[at] == query, index_codes[at], query)


def index_buckets(sorted_ids: torch.Tensor, num_rows: int) -> Tuple[torch.Tensor, int, int]:
    """``(starts, shift, depth)``: the row index cut in buckets of ``2**shift`` ids, about one indexed id a
    bucket; ``starts[b]`` counts the indexed ids below bucket ``b`` (``starts[b + 1] - starts[b]`` is its
    count, at most ``2**depth - 1``).  A traced lookup searches a query's bucket, ``depth`` steps of a
    gather and a compare, instead of the whole index: ONNX has no ``searchsorted``, and inductor fuses
    the steps (:func:`fpd_convert.layers.traced._find_sorted`).  ``starts`` has about as many entries as
    the index."""
    k = max(int(sorted_ids.numel()), 1)
    shift = max(0, (num_rows // k).bit_length() - 1)
    edges = torch.arange(0, (num_rows >> shift) + 2, dtype=torch.long) << shift
    starts = torch.searchsorted(sorted_ids.detach().cpu().long(), edges)
    depth = int((starts[1:] - starts[:-1]).max()).bit_length()
    return starts.to(sorted_ids.device), shift, depth
