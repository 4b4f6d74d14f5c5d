"""Criteo raw text (Kaggle ``train.txt``, Terabyte ``day_N``; plain or ``.gz``).

Each line: ``label <TAB> I1..I13 <TAB> C1..C26``; integers in decimal, categoricals as
8-hex-digit hashes, an empty field is missing.  Real files trim trailing empty fields
(lines of 37-39 fields); they are padded back to 40.  A categorical maps to row
``int(hex, 16) % num_rows`` (the TorchRec/MLPerf convention); a missing one to row 0.
A missing integer is 0 before the dense transform.
"""
from __future__ import annotations

import gzip
import re
import warnings
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np

from ..paths import not_a_file
from .batch import NUM_DENSE, NUM_SPARSE, Batch, make_batch

NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")
_INT = re.compile(r"-?[0-9]{1,19}")


class DataError(ValueError):
    """Data that cannot be read as asked; the message says where and why."""


def open_text(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="ascii", errors="replace", newline="\n")
    return open(path, "rt", encoding="ascii", errors="replace", newline="\n")


def parse_line(line: str, table_rows: Sequence[int]):
    """(label, 13 ints, 26 row ids) of one line, or raise ``ValueError`` saying what is wrong."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) > NUM_FIELDS:
        raise ValueError(f"{len(fields)} fields, expected at most {NUM_FIELDS}")
    if len(fields) < 1 + NUM_DENSE:
        raise ValueError(f"{len(fields)} fields, too few for a label and 13 integers")
    fields += [""] * (NUM_FIELDS - len(fields))
    if fields[0] not in ("0", "1"):
        raise ValueError(f"label {fields[0]!r} is not 0 or 1")
    dense = []
    for x in fields[1:1 + NUM_DENSE]:
        if x and not _INT.fullmatch(x):
            raise ValueError(f"integer feature {x[:20]!r} is not an integer")
        dense.append(int(x) if x else 0)
    cats = []
    for x, n in zip(fields[1 + NUM_DENSE:], table_rows):
        if x:
            if not _HEX.fullmatch(x):
                raise ValueError(f"categorical {x[:20]!r} is not a hex hash")
            cats.append(int(x, 16) % n)
        else:
            cats.append(0)
    return int(fields[0]), dense, cats


def read_criteo_text(path, table_rows: Sequence[int], batch_size: int = 4096, strict: bool = False,
                     dense_transform: str = "log", shard: int = 0, num_shards: int = 1,
                     max_rows: Optional[int] = None, stats: Optional[dict] = None) -> Iterator[Batch]:
    """Stream batches from a Criteo text file with bounded memory.

    ``table_rows``: the 26 table sizes (ids are hashed modulo them).  A malformed line is
    counted and skipped with a warning, or raises :class:`DataError` when ``strict``.
    ``shard``/``num_shards`` read every ``num_shards``-th line (for data-loading workers).
    ``stats`` (a dict) receives ``rows`` and ``malformed`` counts.
    """
    path = Path(path)
    if len(table_rows) != NUM_SPARSE:
        raise DataError(f"Criteo data has {NUM_SPARSE} categorical features but the model has {len(table_rows)} tables")
    if (reason := not_a_file(path)):
        raise DataError(f"{path}: {reason}")
    try:
        yield from _batches(path, table_rows, batch_size, strict, dense_transform, shard, num_shards, max_rows, stats)
    except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged .gz, a read error
        raise DataError(f"{path}: the file cannot be read to its end ({type(e).__name__}: {e})") from None


def _batches(path, table_rows, batch_size, strict, dense_transform, shard, num_shards, max_rows, stats):
    labels: List[int] = []
    dense: List[list] = []
    cats: List[list] = []
    bad = rows = 0
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if (lineno - 1) % num_shards != shard:
                continue
            if not line.strip():
                continue
            try:
                y, d, c = parse_line(line, table_rows)
            except ValueError as e:
                if strict:
                    raise DataError(f"{path}:{lineno}: malformed line ({e})") from None
                bad += 1
                if bad <= 3:
                    warnings.warn(f"{path}:{lineno}: skipping a malformed line ({e})", stacklevel=2)
                continue
            labels.append(y)
            dense.append(d)
            cats.append(c)
            rows += 1
            if len(labels) == batch_size:
                yield make_batch(np.array(dense, np.float64), np.array(cats), np.array(labels), dense_transform)
                labels, dense, cats = [], [], []
            if max_rows is not None and rows >= max_rows:
                break
    if labels:
        yield make_batch(np.array(dense, np.float64), np.array(cats), np.array(labels), dense_transform)
    if bad:
        warnings.warn(f"{path}: skipped {bad} malformed lines of {rows + bad}", stacklevel=2)
    if rows == 0 and num_shards == 1:
        raise DataError(f"{path}: no valid data line" + (f" ({bad} malformed)" if bad else " (the file is empty)"))
    if stats is not None:
        stats.update(rows=rows, malformed=bad)
