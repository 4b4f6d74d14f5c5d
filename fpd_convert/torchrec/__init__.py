"""fpd-convert for TorchRec users: TT tables inside TorchRec's own modules (the ``[torchrec]`` extra).

- :class:`TTEmbeddingBagCollection`: an ``EmbeddingBagCollection`` whose largest tables are TT tables;
  ``torchrec.models.dlrm.DLRM`` and ``DistributedModelParallel`` take it as they take an EBC.
- :class:`TTEmbeddingCollection`: an ``EmbeddingCollection`` (unpooled, for sequence models) likewise.
- :func:`compress_module`: a live TorchRec model (or EBC, or EC) with its largest tables in TT.
- :func:`save` / :func:`load`: the compressed file of such a model, and a compressed file (from ``save``
  or from ``fpd-convert compress`` of a TorchRec checkpoint) as a real TorchRec DLRM.
- :func:`to_kjt`: a (B, F) batch of ids as the ``KeyedJaggedTensor`` the models take.
- :func:`distribute`: ``DistributedModelParallel`` of such a model (dense tables sharded, TT tables
  replicated), with its weights; :func:`tt_collections` readies your own model, after
  ``fpd_convert.load_into``, for it.

Using it: docs/torchrec.md.
"""
from __future__ import annotations

try:
    import torchrec  # noqa: F401
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError("fpd_convert.torchrec needs torchrec: docs/torchrec.md says how to install it "
                      f"({e})") from None

from .collection import TTEmbeddingBagCollection
from .convert import compress_module, distribute, load, save, to_kjt, tt_collections
from .unpooled import TTEmbeddingCollection

__all__ = ["TTEmbeddingBagCollection", "TTEmbeddingCollection", "compress_module", "distribute", "load", "save",
           "to_kjt", "tt_collections"]
