"""The operations behind the commands: compress, inspect, decompress, export, load."""
from .compress import CompressionSummary, TableSummary, compress
from .decompress import decompress
from .export import export
from .inspect import format_inspect, inspect
from .load import load

__all__ = ["CompressionSummary", "TableSummary", "compress", "decompress", "export", "format_inspect", "inspect", "load"]
