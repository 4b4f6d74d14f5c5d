"""fpd-convert: compress trained recommender models with tensor-train embedding tables.

Python API (each command has its function)::

    import fpd_convert
    summary = fpd_convert.compress("model.pt", "model.tt.safetensors", ratio=50)
    model = fpd_convert.load("model.tt.safetensors")          # nn.Module, eval mode
    fpd_convert.decompress("model.tt.safetensors", "model.dense.pt")
    fpd_convert.inspect("model.tt.safetensors")
    fpd_convert.keep_freed_memory()  # once, before serving on the CPU (glibc; see fpd_convert.allocator)
"""
__version__ = "0.1.0"

from .allocator import keep_freed_memory  # noqa: E402
from .convert import compress, decompress, inspect, load  # noqa: E402
from .layers import TTEmbedding, TTEmbeddingBag  # noqa: E402
from .tt import decompose_table  # noqa: E402

__all__ = ["__version__", "TTEmbedding", "TTEmbeddingBag", "decompose_table", "compress", "decompress",
           "inspect", "keep_freed_memory", "load"]
