"""The operations behind the commands: compress, inspect, decompress, export, load; and for your own
model, compress_module and load_into."""
from .compress import CompressionSummary, TableSummary, compress
from .decompress import decompress
from .export import export
from .inspect import format_inspect, inspect
from .load import load
from .modules import compress_module, load_into

__all__ = ["CompressionSummary", "TableSummary", "compress", "compress_module", "decompress", "export", "format_inspect",
           "inspect", "load", "load_into"]
