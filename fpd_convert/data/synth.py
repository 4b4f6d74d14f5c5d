"""A Criteo-like synthetic data generator with a hidden teacher.

- 13 dense features: log-normal counts (some missing);
- 26 categorical features with Zipf-distributed ids over tables of the given sizes, the
  popular ids scattered over the table (as hashing does);
- labels drawn from a hidden teacher: ``logit = b + w.x + sum_f u_f[id_f] +
  sum_{f<g} <a_f[id_f], a_g[id_g]> / sqrt(F)`` with small latent vectors per id, so a trained
  DLRM reaches a real, imperfect AUC (about 0.75-0.82 with the defaults).

Deterministic by seed.  Written as Criteo text (ids encoded as 8-hex-digit hashes that map
back with ``int(hex, 16) % rows``) or as a facebookresearch/dlrm ``.npz``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ..outputs import atomic_path, check_output, releases_outputs
from .batch import NUM_DENSE, NUM_SPARSE

DEFAULT_TABLE_ROWS = [60_000, 50_000, 40_000, 30_000, 25_000, 4_000, 3_000, 2_000, 1_500, 1_000, 800, 600, 500,
                      400, 300, 200, 150, 100, 60, 40, 20, 12, 8, 5, 4, 3]


@dataclass
class Teacher:
    """The hidden model that labels samples (drawn once per seed)."""

    table_rows: List[int]
    seed: int = 0
    latent_dim: int = 4
    zipf: float = 1.1
    bias: float = -2.1
    noise: float = 1.6
    tables: list = field(init=False)

    def __post_init__(self):
        g = np.random.default_rng(self.seed)
        self.w = g.normal(0, 0.25, NUM_DENSE)
        self.u = [g.normal(0, 0.4, n) for n in self.table_rows]
        self.a = [g.normal(0, 0.8, (n, self.latent_dim)) for n in self.table_rows]
        self.perm = [g.permutation(n) for n in self.table_rows]
        self.cdf = []
        for n in self.table_rows:
            p = 1.0 / np.arange(1, n + 1) ** self.zipf
            self.cdf.append(np.cumsum(p) / p.sum())

    def sample(self, n: int, rng: np.random.Generator):
        """(X_int (n, 13) int32 raw counts with -1 for missing, X_cat (n, 26) ids, y (n,))."""
        counts = np.floor(np.exp(rng.normal(1.5, 1.4, (n, NUM_DENSE)))).astype(np.int64)
        missing = rng.random((n, NUM_DENSE)) < 0.15
        x = np.log1p(np.where(missing, 0, counts))
        cats = np.stack([self.perm[f][np.searchsorted(self.cdf[f], rng.random(n))] for f in range(NUM_SPARSE)], 1)
        logit = self.bias + (x - 1.5) @ self.w
        lat = np.zeros((n, self.latent_dim))
        sq = np.zeros(n)
        for f in range(NUM_SPARSE):
            logit += self.u[f][cats[:, f]]
            v = self.a[f][cats[:, f]]
            lat += v
            sq += (v * v).sum(1)
        logit += 0.5 * (((lat * lat).sum(1) - sq) / 2) / np.sqrt(NUM_SPARSE) / self.latent_dim
        logit += rng.normal(0, self.noise, n)  # what no model can see: caps the AUC
        y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int32)
        return np.where(missing, -1, counts).astype(np.int32), cats.astype(np.int32), y


def generate(n: int, seed: int = 0, table_rows: Optional[List[int]] = None, teacher_seed: int = 1234,
             zipf: float = 1.1):
    """``n`` samples: (X_int, X_cat, y, table_rows); ``seed`` varies the samples, ``teacher_seed``
    the hidden model (keep it fixed across train/val/test splits)."""
    rows = list(table_rows or DEFAULT_TABLE_ROWS)
    if len(rows) != NUM_SPARSE:
        raise ValueError(f"need {NUM_SPARSE} table sizes but got {len(rows)}")
    teacher = Teacher(rows, teacher_seed, zipf=zipf)
    x_int, x_cat, y = teacher.sample(n, np.random.default_rng(seed))
    return x_int, x_cat, y, rows


def write_npz(path, x_int, x_cat, y, table_rows) -> None:
    """A dlrm ``.npz``, written atomically (``np.savez`` gets an open file: it would add ``.npz`` to a name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, X_int=np.maximum(x_int, 0), X_cat=x_cat, y=y, counts=np.array(table_rows, np.int64))


def write_criteo_text(path, x_int, x_cat, y, table_rows, seed: int = 0) -> None:
    """Criteo raw text; missing integers are empty fields, trailing empty fields trimmed as in
    the real files."""
    g = np.random.default_rng(seed)
    rows = np.array(table_rows, np.int64)
    mult = g.integers(0, (2 ** 32 - 1) // rows, size=x_cat.shape)
    hashes = x_cat.astype(np.int64) + mult * rows
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for i in range(len(y)):
            ints = ["" if v < 0 else str(v) for v in x_int[i]]
            fields = [str(int(y[i]))] + ints + [f"{h:08x}" for h in hashes[i]]
            while fields and fields[-1] == "":
                fields.pop()
            f.write("\t".join(fields) + "\n")


@releases_outputs
def synth(output, n: int, seed: int = 0, fmt: Optional[str] = None, table_rows=None, teacher_seed: int = 1234,
          force: bool = False):
    """Generate and write ``n`` samples; the format follows ``fmt`` or the suffix (``.npz`` or text).
    An existing ``output`` is refused unless ``force``."""
    output = check_output(output, [], force)
    fmt = fmt or ("npz" if output.suffix == ".npz" else "text")
    x_int, x_cat, y, rows = generate(n, seed, table_rows, teacher_seed)
    if fmt == "npz":
        write_npz(output, x_int, x_cat, y, rows)
    else:
        write_criteo_text(output, x_int, x_cat, y, rows, seed)
    return {"path": str(output), "rows": n, "positives": int(y.sum()), "table_rows": rows, "format": fmt}
