"""fpd-convert: compress trained recommender models with tensor-train embedding tables.

The layers and TT math are importable directly::

    from fpd_convert import TTEmbeddingBag, decompose_table
"""
__version__ = "0.1.0"

from .layers import TTEmbedding, TTEmbeddingBag  # noqa: E402
from .tt import decompose_table  # noqa: E402

__all__ = ["__version__", "TTEmbedding", "TTEmbeddingBag", "decompose_table"]
