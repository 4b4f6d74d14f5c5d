"""Data: Criteo text, dlrm .npz, TorchRec .npy readers and a synthetic generator."""
from .arrays import iter_arrays, load_arrays
from .batch import NUM_DENSE, NUM_SPARSE, Batch, transform_dense
from .criteo_text import DataError, parse_line, read_criteo_text
from .dataset import CriteoData, data_format, data_loader
from .synth import DEFAULT_TABLE_ROWS, generate, synth

__all__ = ["iter_arrays", "load_arrays", "NUM_DENSE", "NUM_SPARSE", "Batch", "transform_dense", "DataError",
           "parse_line", "read_criteo_text", "CriteoData", "data_format", "data_loader", "DEFAULT_TABLE_ROWS",
           "generate", "synth"]
