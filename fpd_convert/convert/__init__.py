"""The operations behind the commands: compress, inspect, decompress, load."""
from .compress import CompressionSummary, TableSummary, compress
from .decompress import decompress
from .inspect import format_inspect, inspect
from .load import load

__all__ = ["CompressionSummary", "TableSummary", "compress", "decompress", "format_inspect", "inspect", "load"]
