import os

import numpy as np
import pytest
import torch

# Without a GPU, the Triton kernels run (and are tested) in Triton's interpreter on
# CPU tensors; the variable must be set before triton compiles anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def low_tt_rank_table(n, d, rank, noise, seed=0, order=3):
    """A table with TT-rank ``rank`` (in its TT-matrix view) plus Gaussian noise."""
    from fpd_convert.tt import factor_dims, factor_rows, tt_to_table
    g = np.random.default_rng(seed)
    rf, df = factor_rows(n, order), factor_dims(d, order)
    ranks = [1] + [rank] * (order - 1) + [1]
    cores = [g.standard_normal((ranks[j], rf[j], df[j], ranks[j + 1])) for j in range(order)]
    w = tt_to_table(cores, n)
    w = w / np.linalg.norm(w) * np.sqrt(n * d)
    return (w + noise * g.standard_normal(w.shape)).astype(np.float32)


@pytest.fixture
def structured_table():
    return low_tt_rank_table


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def has_triton() -> bool:
    from fpd_convert.kernels import triton_tt
    return triton_tt.available()


needs_triton = pytest.mark.skipif(not has_triton(), reason="needs triton (GPU, or TRITON_INTERPRET=1 on CPU)")
