"""The scripts under examples/ run as a user would run them and print what they promise."""
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script, *args):
    r = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_convert_a_checkpoint(tmp_path):
    out = run("convert_a_checkpoint.py", "--dir", str(tmp_path), "--train-rows", "20000", "--test-rows", "5000")
    # the default layout is the long first core, no larger than balanced, table by table
    sizes = {}
    for layout, table, factors, after in re.findall(r"^(auto|balanced)\s+(\d+): .*row factors (\[[\d, ]+\]).*"
                                                    r"-> ([\d,]+) bytes", out, re.M):
        sizes[layout, table] = (factors, int(after.replace(",", "")))
    assert len(sizes) == 10, out
    assert sizes["auto", "0"][0] == "[235, 16, 16]" and sizes["balanced", "0"][0] == "[50, 40, 30]"
    assert all(sizes["auto", t][1] <= sizes["balanced", t][1] for t in "01234")
    assert "loaded DLRMNet with 5 TT tables" in out
    auc = float(re.search(r"test AUC of the compressed model: ([\d.]+)", out).group(1))
    assert 0.6 < auc < 1.0
    assert re.search(r"^compressed\s+[\d.]+ MB", out, re.M)
    assert (tmp_path / "compressed_auto.safetensors").exists() and (tmp_path / "baseline.pt").exists()


def test_tt_layer():
    out = run("tt_layer.py", "--rows", "20000", "--dim", "16", "--rank", "8", "--batch", "256")
    err = float(re.search(r"relative error ([\d.]+)", out).group(1))
    assert 0 < err < 0.5  # a table of TT rank 8 plus noise
    loss = re.search(r"loss ([\d.e+-]+) -> ([\d.e+-]+)", out)
    assert float(loss.group(2)) < float(loss.group(1))
    assert "reloaded layer gives the same bags: True" in out


def test_own_model(tmp_path):
    out = run("own_model.py", "--dir", str(tmp_path), "--users", "3000", "--items", "5000", "--onnx")
    assert re.findall(r"^  (\w+)\.weight: ", out, re.M) == ["item_emb", "user_emb"], out  # not the MLP's weights
    assert "user_emb TTEmbedding, item_emb TTEmbeddingBag (mode 'mean', padding_idx 0)" in out
    diff = float(re.search(r"with the TT reconstructions: ([\d.e+-]+)", out).group(1))
    assert diff < 1e-5
    assert "fpd_convert.save, then load_into: same scores True" in out
    assert "torch.compile(fullgraph=True): same scores True" in out
    assert "torch.export (dynamic batch), another batch size: same scores True" in out
    assert "within fpd_convert.portable: fpd_convert operators in the program: none" in out
    assert "ONNX Runtime, another batch size: same scores True" in out


def test_serve_exported(tmp_path):
    out = run("serve_exported.py", "--dir", str(tmp_path), "--formats", "pt2,onnx")
    eager = re.search(r"^eager load\(\): (.+)$", out, re.M).group(1).split()
    for fmt in ("pt2", "onnx"):
        got = re.search(rf"^{fmt} \([\d,]+ bytes, without fpd_convert\): (.+)$", out, re.M).group(1).split()
        assert len(got) == 4 and all(abs(float(a) - float(b)) < 1e-5 for a, b in zip(got, eager)), out


def test_torchrec_model(tmp_path):
    import pytest
    pytest.importorskip("torchrec")
    out = run("torchrec_model.py", "--dir", str(tmp_path), "--steps", "5")
    assert "compressed: DLRM with TTEmbeddingBagCollection, TT tables ['t_item', 't_user']" in out
    sizes = re.findall(r"^  t_(\w+): ([\d,]+) x 16, ([\d,]+) -> ([\d,]+) bytes", out, re.M)
    assert [s[0] for s in sizes] == ["user", "item"], out
    assert all(int(a.replace(",", "")) < int(b.replace(",", "")) for _, _, b, a in sizes)
    diff = float(re.search(r"largest difference from TorchRec with the TT reconstructions: ([\d.e+-]+)", out).group(1))
    assert diff < 1e-5
    assert "as torchrec.models.dlrm.DLRM: same scores True" in out
    assert (tmp_path / "model.tt.safetensors").exists()
