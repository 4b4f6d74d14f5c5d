import gzip
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fpd_convert.cli import main
from fpd_convert.data import CriteoData, DataError, data_loader, generate, read_criteo_text

REAL = Path(__file__).parent / "data" / "criteo_kaggle_head1000.txt"
BIG = [10 ** 7] * 26


def read_all(path, rows=BIG, **kw):
    out = list(read_criteo_text(path, rows, batch_size=10_000, **kw))
    return torch.cat([b.dense for b in out]), torch.cat([b.sparse for b in out]), torch.cat([b.labels for b in out])


def test_real_criteo_lines():
    stats = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no line of the real file may be called malformed
        batches = list(read_criteo_text(REAL, BIG, batch_size=10_000, stats=stats))
    dense = torch.cat([b.dense for b in batches])
    sparse = torch.cat([b.sparse for b in batches])
    labels = torch.cat([b.labels for b in batches])
    # All 1,000 lines are valid, the last one (no trailing newline) included.
    assert stats == {"rows": 1000, "malformed": 0} and len(labels) == 1000
    assert int(labels.sum()) == 205
    # Line 1: 0, 1,1,5,0,1382,4,15,2,181,1,2,,2, 68fd1e64 80e26c9b ... e8b83407 9727dd16
    expected = np.log1p([1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2]).astype(np.float32)
    np.testing.assert_allclose(dense[0].numpy(), expected, rtol=1e-6)
    assert sparse[0, 0] == int("68fd1e64", 16) % 10 ** 7 and sparse[0, 1] == int("80e26c9b", 16) % 10 ** 7
    assert sparse[0, 25] == int("9727dd16", 16) % 10 ** 7
    assert sparse[0, 21] == 0  # C22 is empty on line 1: missing -> row 0
    # The last line (no newline) has 38 fields: its last two categoricals are missing.
    last = REAL.read_text().split("\n")[-1].split("\t")
    assert len(last) == 38 and torch.equal(sparse[-1, -2:], torch.zeros(2, dtype=torch.long))
    assert sparse[-1, 23] == int(last[37], 16) % 10 ** 7 and float(labels[-1]) == float(last[0])


def test_gz_and_hash_modulo(tmp_path):
    gz = tmp_path / "day_0.gz"
    with open(REAL, "rb") as f, gzip.open(gz, "wb") as g:
        shutil.copyfileobj(f, g)
    d1, s1, y1 = read_all(REAL, [1000] * 26)
    d2, s2, y2 = read_all(gz, [1000] * 26)
    assert torch.equal(s1, s2) and torch.equal(d1, d2) and torch.equal(y1, y2)
    assert int(s1.max()) < 1000


def test_malformed_lines(tmp_path):
    good = REAL.read_text().split("\n")[:3]
    bad = ["2\t1\t2", "0\t" + "\t".join(["x"] * 39), "0" + "\t1" * 45, good[0].replace("68fd1e64", "zz!")]
    path = tmp_path / "mixed.txt"
    path.write_text("\n".join(good + bad) + "\n")
    stats = {}
    with pytest.warns(UserWarning, match="skipped 4 malformed lines of 7"):
        out = list(read_criteo_text(path, BIG, stats=stats))
    assert stats == {"rows": 3, "malformed": 4} and len(out[0]) == 3
    with pytest.raises(DataError, match=r"mixed.txt:4: malformed line \(3 fields, too few"):
        list(read_criteo_text(path, BIG, strict=True))


def test_npz_and_npy_readers(tmp_path):
    x_int, x_cat, y, rows = generate(3000, seed=3)
    np.savez(tmp_path / "d.npz", X_int=np.maximum(x_int, 0), X_cat=x_cat, y=y, counts=np.array(rows))
    np.save(tmp_path / "day_0_dense.npy", np.maximum(x_int, 0))
    np.save(tmp_path / "day_0_sparse.npy", x_cat)
    np.save(tmp_path / "day_0_labels.npy", y.reshape(-1, 1))
    a = list(CriteoData(tmp_path / "d.npz", rows, 1000))
    b = list(CriteoData(tmp_path / "day_0", rows, 1000))
    assert len(a) == len(b) == 3
    for p, q in zip(a, b):
        assert torch.equal(p.sparse, q.sparse) and torch.equal(p.labels, q.labels) and torch.equal(p.dense, q.dense)
    np.testing.assert_allclose(a[0].dense.numpy(), np.log1p(np.maximum(x_int[:1000], 0)), rtol=1e-6)
    for bad in (dict(batch_size=0), dict(batch_size=10, max_rows=0)):  # the Python API refuses them too
        with pytest.raises(DataError, match="should be >= 1"):
            CriteoData(tmp_path / "d.npz", rows, **bad)
    assert torch.equal(a[1].sparse, torch.from_numpy(x_cat[1000:2000]).long())


def test_workers_read_every_row_once(tmp_path):
    x_int, x_cat, y, rows = generate(5000, seed=4)
    np.savez(tmp_path / "d.npz", X_int=np.maximum(x_int, 0), X_cat=x_cat, y=y, counts=np.array(rows))
    seen = torch.cat([b.labels for b in data_loader(CriteoData(tmp_path / "d.npz", rows, 500), workers=2)])
    assert len(seen) == 5000 and int(seen.sum()) == int(y.sum())


def test_mismatch_errors(tmp_path):
    x_int, x_cat, y, rows = generate(100, seed=5)
    np.savez(tmp_path / "d.npz", X_int=x_int, X_cat=x_cat, y=y)
    small = [max(2, r // 10) for r in rows]
    with pytest.raises(DataError, match="feature 0 has id .* but the model's table 0 has"):
        CriteoData(tmp_path / "d.npz", small)
    with pytest.raises(DataError, match="26 categorical features but the model has 5 tables"):
        CriteoData(tmp_path / "d.npz", rows[:5])
    np.savez(tmp_path / "bad.npz", X_int=x_int, y=y)
    with pytest.raises(DataError, match="missing \\['X_cat'\\]"):
        CriteoData(tmp_path / "bad.npz", rows)


def test_synth_is_deterministic_and_round_trips_through_text(tmp_path):
    a = generate(2000, seed=7)
    b = generate(2000, seed=7)
    assert all(np.array_equal(p, q) for p, q in zip(a[:3], b[:3]))
    assert 0.15 < a[2].mean() < 0.35
    r = CliRunner().invoke(main, ["synth", "-o", str(tmp_path / "s.txt"), "-n", "2000", "--seed", "7"])
    assert r.exit_code == 0, r.output
    d, s, y = read_all(tmp_path / "s.txt", a[3])
    assert torch.equal(s, torch.from_numpy(a[1]).long()) and torch.equal(y, torch.from_numpy(a[2]).float())
    np.testing.assert_allclose(d.numpy(), np.log1p(np.maximum(a[0], 0)), rtol=1e-6)
    lines = (tmp_path / "s.txt").read_text().splitlines()
    assert all(len(line.split("\t")) <= 40 for line in lines)
