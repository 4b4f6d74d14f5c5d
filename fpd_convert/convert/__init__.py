"""The operations behind the commands: compress, inspect, decompress, export, load (and load_into)."""
from .compress import CompressionSummary, TableSummary, compress
from .decompress import decompress
from .export import export
from .inspect import format_inspect, inspect
from .load import load, load_into

__all__ = ["CompressionSummary", "TableSummary", "compress", "decompress", "export", "format_inspect", "inspect", "load", "load_into"]
