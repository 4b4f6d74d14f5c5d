"""One entry point over every data format, with model checks and loading workers."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from .arrays import check_arrays, iter_arrays, load_arrays
from .batch import NUM_SPARSE, Batch
from .criteo_text import DataError, read_criteo_text


def data_format(path) -> str:
    """``npz``, ``npy`` (TorchRec days) or ``text`` (Criteo raw, plain or gz)."""
    p = str(path)
    if p.endswith(".npz"):
        return "npz"
    if p.endswith(".npy") or Path(p + "_dense.npy").exists():
        return "npy"
    return "text"


class CriteoData(torch.utils.data.IterableDataset):
    """Batches from any supported file; with a ``DataLoader`` of ``num_workers`` > 0 each worker
    reads its own share (every k-th line or batch).

    ``table_rows``: the model's table sizes (text ids are hashed modulo them; array ids are
    checked against them with a clear error).
    """

    def __init__(self, path, table_rows: Sequence[int], batch_size: int = 4096, dense_transform: str = "log",
                 strict: bool = False, max_rows: Optional[int] = None, shard: int = 0, num_shards: int = 1):
        super().__init__()
        if batch_size < 1 or (max_rows is not None and max_rows < 1):
            raise DataError(f"batch size and max rows should be >= 1 but got {batch_size} and {max_rows}")
        self.path, self.table_rows, self.batch_size = Path(path), list(table_rows), batch_size
        self.dense_transform, self.strict, self.max_rows = dense_transform, strict, max_rows
        self.shard, self.num_shards = shard, num_shards
        self.format = data_format(path)
        if len(self.table_rows) != NUM_SPARSE:
            raise DataError(f"Criteo data has {NUM_SPARSE} categorical features but the model has "
                            f"{len(self.table_rows)} tables")
        if min(self.table_rows) < 1:
            raise DataError(f"every table needs at least one row but the sizes are {self.table_rows}")
        if self.format != "text":
            dense, sparse, labels, _ = load_arrays(path)
            check_arrays(path, dense, sparse, labels, self.table_rows, max_rows)
            self._arrays = (dense, sparse, labels)

    def __iter__(self) -> Iterator[Batch]:
        shard, num = self.shard, self.num_shards
        info = torch.utils.data.get_worker_info()
        if info is not None:
            shard, num = shard * info.num_workers + info.id, num * info.num_workers
        if self.format == "text":
            return read_criteo_text(self.path, self.table_rows, self.batch_size, self.strict, self.dense_transform,
                                    shard, num, self.max_rows)
        return iter_arrays(*self._arrays, self.batch_size, self.dense_transform, shard, num, self.max_rows)


def data_loader(data: CriteoData, workers: int = 0) -> torch.utils.data.DataLoader:
    """A loader that passes our batches through (``batch_size=None``) with ``workers`` processes."""
    return torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers)
