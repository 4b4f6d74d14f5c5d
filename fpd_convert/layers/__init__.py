"""Embedding layers backed by TT cores."""
from .tt_embedding import TTEmbedding, TTEmbeddingBag
from .tt_lookup import choose_kernel, lookup_rows, row_digits, tt_rows
from .tt_table import TTIndexError

__all__ = ["TTEmbedding", "TTEmbeddingBag", "TTIndexError", "choose_kernel", "lookup_rows", "row_digits", "tt_rows"]
