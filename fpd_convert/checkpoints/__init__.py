"""Checkpoint formats: safe loading, source layouts, the compressed file."""
from .compressed_format import (FORMAT_NAME, FORMAT_VERSION, CompressedMeta, core_key, is_compressed,
                                read_compressed, read_compressed_meta, split_tables, write_compressed,
                                TableTensors, decode_table, encode_table, table_file_keys)
from .safe_load import CheckpointError, load_torch_file
from .source import Source, read_source, sha256_of

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "CompressedMeta",
           "core_key", "is_compressed", "read_compressed", "read_compressed_meta", "split_tables",
           "write_compressed", "TableTensors", "decode_table", "encode_table", "table_file_keys",
           "CheckpointError", "load_torch_file", "Source", "read_source", "sha256_of"]
