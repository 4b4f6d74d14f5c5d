"""One entry point over every data format, with model checks and loading workers."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from .arrays import check_arrays, iter_arrays, load_arrays
from .batch import NUM_SPARSE, Batch
from .criteo_text import DataError, read_criteo_text

logger = logging.getLogger(__name__)


def data_format(path) -> str:
    """``npz``, ``npy`` (TorchRec days) or ``text`` (Criteo raw, plain or gz)."""
    p = str(path)
    if p.endswith(".npz"):
        return "npz"
    if p.endswith(".npy"):
        return "npy"
    if Path(p).is_file():  # a raw ``day_0`` beside its ``day_0_*.npy`` is the raw text
        return "text"
    if Path(p + "_dense.npy").exists():
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
        if logger.isEnabledFor(logging.INFO):
            n = self.num_batches()
            logger.info("%s: read as %s, %s batches of %d", self.path, self.format,
                        f"{n:,}" if n else "an unknown number of", batch_size)

    def num_batches(self) -> Optional[int]:
        """Batches of one pass over this shard: exact for arrays, estimated from the file's size and its
        first lines for plain text, None for compressed text."""
        if self.format != "text":
            n = len(self._arrays[2]) if self.max_rows is None else min(len(self._arrays[2]), self.max_rows)
        else:
            n = estimate_text_rows(self.path)
            if n is None:
                return None
            if self.max_rows is not None:
                n = min(n, self.max_rows)
        batches = -(-n // self.batch_size)
        return len(range(self.shard, batches, self.num_shards))

    def __iter__(self) -> Iterator[Batch]:
        shard, num = self.shard, self.num_shards
        info = torch.utils.data.get_worker_info()
        if info is not None:
            shard, num = shard * info.num_workers + info.id, num * info.num_workers
        if self.format == "text":
            return read_criteo_text(self.path, self.table_rows, self.batch_size, self.strict, self.dense_transform,
                                    shard, num, self.max_rows)
        return iter_arrays(*self._arrays, self.batch_size, self.dense_transform, shard, num, self.max_rows)


def estimate_text_rows(path, sample_bytes: int = 1 << 20) -> Optional[int]:
    """Lines of a plain-text file from its size and the mean length of its first ``sample_bytes`` (None for
    gzip, whose size says little)."""
    path = Path(path)
    if not path.is_file():  # a pipe or a device: nothing to measure (and reading would consume it)
        return None
    with open(path, "rb") as f:
        head = f.read(sample_bytes)
    if head[:2] == b"\x1f\x8b" or not head:
        return None
    size = path.stat().st_size
    if size <= len(head):
        return head.count(b"\n") + (not head.endswith(b"\n"))
    return max(1, round(size * head.count(b"\n") / len(head)))


def data_loader(data: CriteoData, workers: int = 0) -> torch.utils.data.DataLoader:
    """A loader that passes our batches through (``batch_size=None``) with ``workers`` processes."""
    return torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers)
