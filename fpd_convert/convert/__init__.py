"""The operations behind the commands: compress, inspect, decompress, export, load; and for your own
model, compress_module, load_into and save."""
from .compress import CompressionSummary, TableSummary, compress
from .decompress import decompress
from .export import export
from .inspect import format_inspect, inspect
from .load import load
from .modules import compress_module, load_into, save

__all__ = ["CompressionSummary", "TableSummary", "compress", "compress_module", "decompress", "export", "format_inspect",
           "inspect", "load", "load_into", "save"]
