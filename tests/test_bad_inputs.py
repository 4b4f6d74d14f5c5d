"""A corpus of bad inputs, built from real files, run against every command.

Each case must exit non-zero with ``Error:`` and no traceback, leave nothing in the output folder,
and leave every input file byte for byte as it was.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import fpd_convert
from fpd_convert.cli import main
from fpd_convert.data.synth import synth
from fpd_convert.training.train import train

from layouts import NotATensor, dlrm_checkpoint, dlrm_state

HERE = Path(__file__).parent
ROWS = [2000, 1500, 1000, 800, 600] + [50] * 21


def _rewrite_safetensors(src: Path, dst: Path, edit_tensors=None, edit_meta=None):
    from safetensors import safe_open
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)


def _npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    f = {}
    f["train"] = d / "train.npz"
    synth(f["train"], 1500, seed=0, table_rows=ROWS)
    f["val"] = d / "val.npz"
    synth(f["val"], 500, seed=1, table_rows=ROWS)
    f["text"] = d / "criteo.txt"
    shutil.copy(HERE / "data" / "criteo_kaggle_head1000.txt", f["text"])
    f["base"] = d / "base.pt"
    train(f["train"], f["base"], table_rows=ROWS, max_steps=3, progress=False)
    f["comp"] = d / "comp.safetensors"
    fpd_convert.compress(f["base"], f["comp"], rank=4, tables=["0", "1", "2"], progress=False)
    f["other_base"] = d / "other.pt"  # another model of the same shapes: not COMPRESSED's source
    train(f["train"], f["other_base"], table_rows=ROWS, max_steps=3, progress=False, seed=5)

    # --- bad model files
    f["missing"] = d / "missing.pt"
    f["dir"] = d / "folder.pt"
    f["dir"].mkdir()
    f["fifo"] = d / "fifo.safetensors"
    os.mkfifo(f["fifo"])
    f["fifo_pt"] = d / "fifo.pt"
    os.mkfifo(f["fifo_pt"])
    f["empty"] = d / "empty.pt"
    f["empty"].write_bytes(b"")
    f["random"] = d / "random.pt"
    f["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    f["png"] = d / "picture.pt"
    f["png"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    f["truncated"] = d / "truncated.pt"
    f["truncated"].write_bytes(f["base"].read_bytes()[: f["base"].stat().st_size // 2])
    f["npz_as_pt"] = d / "data_as_model.pt"
    shutil.copy(f["train"], f["npz_as_pt"])
    f["text_as_pt"] = d / "text_as_model.pt"
    shutil.copy(f["text"], f["text_as_pt"])
    f["unsafe"] = d / "unsafe.pt"
    torch.save({"state_dict": dlrm_state(), "hook": NotATensor()}, f["unsafe"])
    f["zero_row"] = d / "zero_row.pt"
    s = dlrm_state()
    s["emb_l.1.weight"] = torch.zeros(0, 8)
    torch.save(dlrm_checkpoint(s), f["zero_row"])
    f["nan_model"] = d / "nan_model.pt"
    s = dlrm_state()
    s["emb_l.0.weight"][5, 2] = float("nan")
    torch.save(dlrm_checkpoint(s), f["nan_model"])
    f["trunc_st"] = d / "truncated.safetensors"
    f["trunc_st"].write_bytes(f["comp"].read_bytes()[:1000])
    f["random_st"] = d / "random.safetensors"
    f["random_st"].write_bytes(np.random.default_rng(1).bytes(3000))
    f["generic"] = d / "generic.safetensors"
    save_file({"w": torch.randn(500, 8), "b": torch.randn(8)}, str(f["generic"]))

    # --- bad compressed files (each a real compressed file, edited)
    def nan_core(t):
        t["emb_l.0.weight.tt_core.1"][0, 0, 0, 0] = float("nan")

    def drop(key):
        return lambda t: t.pop(key)

    def set_meta(key, value):
        return lambda m: m.__setitem__(key, value)

    def bad_shape(t):
        t["emb_l.0.weight.tt_core.0"] = torch.zeros(1, 3, 2, 4)

    for name, et, em in (
            ("c_nan_core", nan_core, None),
            ("c_no_core", drop("emb_l.0.weight.tt_core.2"), None),
            ("c_no_dense", drop("bot_l.0.weight"), None),
            ("c_bad_json", None, set_meta("tt_tables", "{not json")),
            ("c_future", None, set_meta("format_version", "99")),
            ("c_core_shape", bad_shape, None),
            ("c_nan_mlp", lambda t: t["top_l.0.bias"].fill_(float("inf")), None),
    ):
        f[name] = d / f"{name}.safetensors"
        _rewrite_safetensors(f["comp"], f[name], et, em)
    f["c_unknown_feature"] = d / "c_unknown_feature.safetensors"

    def future_feature(m):
        tables = json.loads(m["tt_tables"])
        tables["emb_l.0.weight"]["features"] = ["holographic_rows"]
        m["tt_tables"] = json.dumps(tables)
    _rewrite_safetensors(f["comp"], f["c_unknown_feature"], None, future_feature)

    # --- bad data
    good = np.load(f["train"])
    x_int, x_cat, y, counts = good["X_int"], good["X_cat"], good["y"], good["counts"]
    f["d_empty"] = d / "empty.txt"
    f["d_empty"].write_text("")
    f["d_malformed"] = d / "malformed.txt"
    f["d_malformed"].write_text("this is not\ta criteo line\n" * 20)
    lines = f["text"].read_text().splitlines()
    f["d_labels2"] = d / "labels2.txt"
    f["d_labels2"].write_text("\n".join("2" + line[1:] for line in lines[:50]) + "\n")
    f["d_neg_hex"] = d / "neg_hex.txt"
    f["d_neg_hex"].write_text("\n".join(line.replace("\t68fd1e64", "\t-68fd1e64") for line in lines[:50]
                                        if "\t68fd1e64" in line) + "\n")
    f["d_float_id"] = d / "float_id.txt"
    f["d_float_id"].write_text("\n".join(line.replace("\t68fd1e64", "\t1.5") for line in lines[:50]
                                         if "\t68fd1e64" in line) + "\n")
    gz = d / "criteo.txt.gz"
    import gzip
    with gzip.open(gz, "wb") as g:
        g.write(f["text"].read_bytes())
    f["d_trunc_gz"] = d / "truncated.txt.gz"
    f["d_trunc_gz"].write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    gz.unlink()
    f["d_random_npz"] = d / "random.npz"
    f["d_random_npz"].write_bytes(np.random.default_rng(2).bytes(2000))
    variants = {
        "d_no_cat": dict(X_int=x_int, y=y, counts=counts),
        "d_nan_dense": dict(X_int=np.where(np.arange(x_int.size).reshape(x_int.shape) == 77, np.nan,
                                           x_int.astype(np.float32)), X_cat=x_cat, y=y, counts=counts),
        "d_short_y": dict(X_int=x_int, X_cat=x_cat, y=y[:-10], counts=counts),
        "d_float_ids": dict(X_int=x_int, X_cat=x_cat.astype(np.float64) + 0.5, y=y, counts=counts),
        "d_neg_ids": dict(X_int=x_int, X_cat=np.where(np.arange(x_cat.size).reshape(x_cat.shape) == 9, -3, x_cat),
                          y=y, counts=counts),
        "d_1d_cat": dict(X_int=x_int, X_cat=x_cat[:, 0], y=y, counts=counts),
        "d_big_ids": dict(X_int=x_int, X_cat=x_cat + 5000, y=y, counts=counts),
        "d_labels_2": dict(X_int=x_int, X_cat=x_cat, y=y * 2, counts=counts),
        "d_zero_rows": dict(X_int=x_int[:0], X_cat=x_cat[:0], y=y[:0], counts=counts),
        "d_25_features": dict(X_int=x_int, X_cat=x_cat[:, :25], y=y, counts=counts),
    }
    for name, arrays in variants.items():
        f[name] = d / f"{name}.npz"
        _npz(f[name], **arrays)
    f["d_npy_part"] = d / "day_0"
    np.save(d / "day_0_dense.npy", x_int.astype(np.float32))
    np.save(d / "day_0_sparse.npy", x_cat)  # no day_0_labels.npy
    f["existing"] = d / "existing.safetensors"
    f["existing"].write_bytes(b"keep me")
    f["folder"] = d
    return f


def _digests(folder: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file() and not p.is_fifo()}


BAD_MODELS = ["missing", "dir", "fifo", "fifo_pt", "empty", "random", "png", "truncated", "npz_as_pt", "text_as_pt",
              "unsafe", "zero_row", "trunc_st", "random_st"]
BAD_COMPRESSED = ["c_nan_core", "c_no_core", "c_no_dense", "c_bad_json", "c_future", "c_core_shape", "c_nan_mlp",
                  "c_unknown_feature"]
BAD_DATA = ["missing", "dir", "fifo", "d_empty", "d_malformed", "d_labels2", "d_neg_hex", "d_float_id",
            "d_trunc_gz", "d_random_npz", "d_no_cat", "d_nan_dense", "d_short_y", "d_float_ids", "d_neg_ids",
            "d_1d_cat", "d_big_ids", "d_labels_2", "d_zero_rows", "d_25_features", "d_npy_part"]


def _cases():
    """(case id, a function of (files, output folder) -> the command's arguments)."""
    cases = []
    for bad in BAD_MODELS:
        cases.append((f"inspect-{bad}", lambda f, o, b=bad: ["inspect", str(f[b])]))
        cases.append((f"compress-{bad}", lambda f, o, b=bad: ["compress", str(f[b]), "-o", str(o / "c.safetensors"),
                                                             "--rank", "4"]))
    cases.append(("compress-nan", lambda f, o: ["compress", str(f["nan_model"]), "-o", str(o / "c.safetensors"),
                                               "--rank", "4"]))
    for rule in ("--ratio", "--tol"):  # the byte search and the delta TT-SVD met the NaN in an SVD first
        cases.append((f"compress-nan{rule}", lambda f, o, r=rule: ["compress", str(f["nan_model"]), "-o",
                                                                  str(o / "c.safetensors"), r, "8" if r == "--ratio" else "0.5",
                                                                  "--tables", "0"]))
    cases.append(("compress-nan-default-output", lambda f, o: ["compress", str(f["nan_model"]), "--rank", "4"]))
    cases.append(("compress-a-compressed-file", lambda f, o: ["compress", str(f["comp"]), "-o", str(o / "c.safetensors"),
                                                             "--rank", "4"]))
    cases.append(("compress-generic-no-yes", lambda f, o: ["compress", str(f["generic"]), "-o", str(o / "c.st"),
                                                          "--rank", "2"]))
    for bad in BAD_COMPRESSED + ["base", "generic", "trunc_st", "fifo", "missing"]:
        cases.append((f"decompress-{bad}", lambda f, o, b=bad: ["decompress", str(f[b]), "-o", str(o / "d.pt")]))
        cases.append((f"finetune-{bad}", lambda f, o, b=bad: ["finetune", str(f[b]), "--train", str(f["train"]),
                                                             "-o", str(o / "ft.safetensors"), "--max-steps", "2"]))
        cases.append((f"report-compressed-{bad}", lambda f, o, b=bad: ["report", str(f["base"]), str(f[b]),
                                                                      "--no-int8"]))
    for bad in BAD_COMPRESSED[:3]:
        cases.append((f"inspect-{bad}", lambda f, o, b=bad: ["inspect", str(f[b])]))
    for bad in ["missing", "random", "png", "truncated", "text_as_pt"]:
        cases.append((f"report-original-{bad}", lambda f, o, b=bad: ["report", str(f[b]), str(f["comp"]),
                                                                    "--no-int8"]))
    for bad in BAD_DATA:
        cases.append((f"train-{bad}", lambda f, o, b=bad: ["train", "--train", str(f[b]), "-o", str(o / "m.pt"),
                                                          "--table-rows", ",".join(map(str, ROWS))]))
        cases.append((f"finetune-data-{bad}", lambda f, o, b=bad: ["finetune", str(f["comp"]), "--train", str(f[b]),
                                                                  "-o", str(o / "ft.safetensors"), "--max-steps", "2"]))
        cases.append((f"report-data-{bad}", lambda f, o, b=bad: ["report", str(f["base"]), str(f["comp"]),
                                                                "--data", str(f[b]), "--no-int8"]))
        cases.append((f"compress-data-{bad}", lambda f, o, b=bad: ["compress", str(f["base"]), "-o",
                                                                  str(o / "c.safetensors"), "--ratio", "8",
                                                                  "--data", str(f[b])]))
    options = {
        "tol-2": ["--tol", "2"], "ratio-nan": ["--ratio", "nan"], "ratio-half": ["--ratio", "0.5"],
        "ratio-inf": ["--ratio", "inf"], "budget-word": ["--budget", "lots"], "budget-zero": ["--budget", "0"],
        "rank-zero": ["--rank", "0"], "rank-word": ["--rank", "x"], "rank-and-ratio": ["--rank", "4", "--ratio", "9"],
        "no-such-table": ["--tables", "user_id"], "tables-and-min-rows": ["--tables", "0", "--min-rows", "10"],
        "dim-factors": ["--dim-factors", "3,5"], "data-with-no-importance": ["--importance", "none", "--ratio", "8",
                                                                             "--data", "TRAIN"],
    }
    for name, extra in options.items():
        cases.append((f"compress-option-{name}", lambda f, o, e=extra: [
            "compress", str(f["base"]), "-o", str(o / "c.safetensors"), *[str(f["train"]) if x == "TRAIN" else x
                                                                          for x in e]]))
    outputs = {
        "same-as-input": lambda f, o: str(f["base"]), "existing": lambda f, o: str(f["existing"]),
        "missing-folder": lambda f, o: str(o / "nowhere" / "c.safetensors"), "a-folder": lambda f, o: str(o),
        "unwritable-folder": lambda f, o: "/proc/self/c.safetensors",
    }
    for name, out in outputs.items():
        cases.append((f"compress-output-{name}", lambda f, o, out=out: ["compress", str(f["base"]), "-o", out(f, o),
                                                                       "--rank", "4"]))
        cases.append((f"decompress-output-{name}", lambda f, o, out=out, name=name: ["decompress", str(f["comp"]), "-o",
                                                                         out(f, o) if name != "same-as-input"
                                                                         else str(f["comp"])]))
        cases.append((f"train-output-{name}", lambda f, o, out=out: ["train", "--train", str(f["train"]), "-o", out(f, o)]))
        cases.append((f"synth-output-{name}", lambda f, o, out=out: ["synth", "-o", out(f, o), "--rows", "10"]))
        cases.append((f"report-plot-{name}", lambda f, o, out=out: ["report", str(f["base"]), str(f["comp"]),
                                                                   "--no-int8", "--plot", out(f, o)]))
        cases.append((f"finetune-output-{name}", lambda f, o, out=out, name=name: [
            "finetune", str(f["comp"]), "--train", str(f["train"]), "-o",
            out(f, o) if name != "same-as-input" else str(f["comp"]), "--max-steps", "2"]))
    cases += [
        ("report-plot-onto-data", lambda f, o: ["report", str(f["base"]), str(f["comp"]), "--data", str(f["val"]),
                                                "--no-int8", "--plot", str(f["val"])]),
        ("report-unpaired", lambda f, o: ["report", str(f["other_base"]), str(f["comp"]), "--no-int8"]),
        ("train-table-rows-zero", lambda f, o: ["train", "--train", str(f["train"]), "-o", str(o / "m.pt"), "--table-rows",
                                                ",".join(["0"] * 26)]),
        ("train-table-rows-few", lambda f, o: ["train", "--train", str(f["train"]), "-o", str(o / "m.pt"), "--table-rows",
                                               "10,20"]),
        ("train-table-rows-word", lambda f, o: ["train", "--train", str(f["train"]), "-o", str(o / "m.pt"), "--table-rows", "a"]),
        ("finetune-resume-nothing", lambda f, o: ["finetune", str(f["comp"]), "--train", str(f["train"]), "-o",
                                                  str(o / "ft.safetensors"), "--resume"]),
        ("finetune-generic", lambda f, o: ["finetune", str(f["generic"]), "--train", str(f["train"]), "-o",
                                           str(o / "ft.safetensors")]),
        ("bench-model-random", lambda f, o: ["bench", "--model", str(f["random_st"])]),
        ("demo-ratio-nan", lambda f, o: ["demo", "--dir", str(o / "demo"), "--ratio", "nan"]),
        ("demo-dir-is-a-file", lambda f, o: ["demo", "--dir", str(f["existing"])]),
    ]
    return cases


CASES = _cases()


def test_the_corpus_is_large():
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error_and_changes_nothing(files, tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    before = _digests(files["folder"])
    args = case(files, out)
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    assert "Error:" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == [], result.output
    assert _digests(files["folder"]) == before
    leftovers = [p.name for p in files["folder"].iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no lock or temp file beside the inputs


def test_a_table_with_nan_is_named_before_any_svd(files, tmp_path):
    for rule in (["--ratio", "8"], ["--tol", "0.5"], ["--rank", "4", "--importance", "none"]):
        result = CliRunner().invoke(main, ["compress", str(files["nan_model"]), "-o", str(tmp_path / "c.safetensors"),
                                           "--tables", "0", *rule])
        assert result.exit_code == 1 and "table emb_l.0.weight has NaN or infinite values in 1 of its" in result.output, \
            result.output
        assert "(the first: row 5)" in result.output and "did not converge" not in result.output


def test_a_compressed_file_is_not_compressed_again(files, tmp_path):
    for extra in ([], ["--yes"]):  # a generic-looking file: asked about its tables first, without --yes
        result = CliRunner().invoke(main, ["compress", str(files["comp"]), "-o", str(tmp_path / "c.safetensors"),
                                           "--rank", "4", *extra])
        assert result.exit_code == 1 and "already compressed (written by fpd-convert)" in result.output, result.output
