"""One option vocabulary across the commands, their help, and what -q/-v/--json/-o do."""
import json
import shutil
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from fpd_convert.cli import main
from fpd_convert.cli.options import ADVANCED_HEADING, AdvancedOption
from fpd_convert.data.dataset import CriteoData, data_format, estimate_text_rows
from fpd_convert.reporting.report import plot_points, report
from fpd_convert.training.loop import planned_steps, progress_line

from tiny import ROWS, tiny_model

HERE = Path(__file__).parent

# which shared options each command takes (the brief: "where they apply")
SHARED = {
    "-o": ["synth", "train", "compress", "decompress", "export", "finetune", "report", "demo"],
    "--train": ["train", "finetune"],
    "--val": ["train", "finetune"],
    "--data": ["compress", "report"],
    "--seed": ["synth", "train", "compress", "finetune", "export", "demo"],
    "--device": ["train", "finetune", "report", "demo", "bench"],
    "--json": ["synth", "train", "compress", "inspect", "decompress", "export", "finetune", "report", "demo", "bench"],
    "--quiet": ["train", "compress", "decompress", "export", "finetune", "report", "demo", "bench"],
    "--verbose": ["train", "compress", "decompress", "export", "finetune", "report", "demo", "bench"],
    "--force": ["synth", "train", "compress", "decompress", "export", "finetune", "report"],
}


def _opts(name):
    return {o for p in main.commands[name].params for o in p.opts}


@pytest.mark.parametrize("option", sorted(SHARED))
def test_shared_options_exist_on_every_command_they_apply_to(option):
    missing = [name for name in SHARED[option] if option not in _opts(name)]
    assert missing == []


def test_every_command_is_in_the_vocabulary_and_no_output_is_positional():
    assert set(main.commands) <= {n for names in SHARED.values() for n in names}
    for name in ("synth", "train"):
        assert [p.name for p in main.commands[name].params if isinstance(p, click.Argument)] == []
    assert "-q" in _opts("compress") and "-v" in _opts("compress") and "-o" in _opts("report")


@pytest.mark.parametrize("name", ["compress", "bench"])
def test_developer_knobs_are_listed_apart(name):
    text = CliRunner().invoke(main, [name, "--help"]).output
    assert ADVANCED_HEADING in text
    everyday, advanced = text.split(ADVANCED_HEADING)
    knobs = [p for p in main.commands[name].params if isinstance(p, AdvancedOption)]
    assert len(knobs) >= 10
    for p in knobs:
        assert p.opts[-1] in advanced and p.opts[-1] + " " not in everyday
    # what a user sets stays first
    for flag in ("--json", "--threads", "-q, --quiet"):
        assert flag in everyday
    if name == "compress":
        assert "--ratio" in everyday and "--suffix-rows" in advanced
        assert len([p for p in main.commands[name].params
                    if isinstance(p, click.Option) and not isinstance(p, AdvancedOption)]) <= 20


def test_quiet_and_verbose_exclude_each_other(tmp_path):
    r = CliRunner().invoke(main, ["train", "--train", str(tmp_path / "x.npz"), "-o", str(tmp_path / "m.pt"), "-q", "-v"])
    assert r.exit_code == 2 and "--quiet and --verbose cannot be used together" in r.output


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    return d, tiny_model(d, held_out="test.npz", held_out_rows=1000, steps=4, tables=("0", "1"))


def test_train_quiet_verbose_and_json(models, tmp_path):
    d, _ = models
    base = ["train", "--train", str(d / "train.npz"), "--max-steps", "3", "--threads", "1"]
    r = CliRunner().invoke(main, base + ["-o", str(tmp_path / "q.pt"), "-q"])
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and r.stdout.startswith(f"wrote {tmp_path / 'q.pt'} after 3 steps")
    r = CliRunner().invoke(main, base + ["-o", str(tmp_path / "v.pt"), "-v", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "train: 3 steps planned (1 epoch, at most 3 steps) on cpu, Adagrad" in r.stderr
    assert "read as npz, 6 batches of 512" in r.stderr
    r = CliRunner().invoke(main, base + ["-o", str(tmp_path / "j.pt"), "--json", "--device", "cpu"])
    out = json.loads(r.stdout)
    assert out["steps"] == 3 and out["device"] == "cpu" and out["table_rows"] == ROWS
    assert out["table_rows_from"].startswith("the counts stored in")


def test_without_o_a_command_writes_beside_its_input_and_never_over_a_file(models, tmp_path):
    d, _ = models
    shutil.copy(d / "base.pt", tmp_path / "model.pt")
    steps = [(["compress", "model.pt", "--rank", "4", "--tables", "0,1"], "model.tt.safetensors"),
             (["finetune", "model.tt.safetensors", "--train", str(d / "train.npz"), "--max-steps", "2"],
              "model.ft.safetensors"),
             (["decompress", "model.tt.safetensors"], "model.dense.pt"),  # the source's container: a dlrm .pt
             (["export", "model.ft.safetensors", "--format", "pt2"], "model.ft.pt2")]
    for args, written in steps:
        args = [a if not a.startswith("model.") else str(tmp_path / a) for a in args] + ["--threads", "1"]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        assert str(tmp_path / written) in r.stdout and (tmp_path / written).is_file()
        if args[0] == "decompress":  # a line per table: a big model takes minutes
            assert "decompress: table 1/2 emb_l.0.weight" in r.stderr and "decompress: table 2/2" in r.stderr
        before = (tmp_path / written).read_bytes()
        again = CliRunner().invoke(main, args)
        assert again.exit_code == 1 and "exists; pass --force" in again.output
        assert (tmp_path / written).read_bytes() == before
    from fpd_convert.default_outputs import compressed_output, dense_output, exported_output, finetuned_output
    assert compressed_output("a/m.safetensors") == Path("a/m.tt.safetensors")
    assert finetuned_output("m.safetensors") == Path("m.ft.safetensors")
    assert dense_output("m.ft.safetensors", "safetensors") == Path("m.ft.dense.safetensors")
    assert [exported_output("m.tt.safetensors", f).name for f in ("aoti", "onnx")] == ["m.tt.aoti.pt2", "m.tt.onnx"]


def test_train_on_text_says_which_table_sizes_it_uses(tmp_path):
    text = tmp_path / "day_0"
    shutil.copy(HERE / "data" / "criteo_kaggle_head1000.txt", text)
    r = CliRunner().invoke(main, ["train", "--train", str(text), "-o", str(tmp_path / "m.pt"), "--max-steps", "1",
                                  "--dim", "4", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "from the synth default sizes (give --table-rows for your data's); text ids are hashed modulo them" \
        in r.stderr


def test_a_raw_day_beside_its_npy_arrays_is_read_as_text(tmp_path):
    raw = tmp_path / "day_0"
    shutil.copy(HERE / "data" / "criteo_kaggle_head1000.txt", raw)
    for part, arr in (("dense", np.zeros((5, 13), np.float32)), ("sparse", np.zeros((5, 26), np.int64)),
                      ("labels", np.zeros(5, np.float32))):
        np.save(tmp_path / f"day_0_{part}.npy", arr)
    assert data_format(raw) == "text"
    assert data_format(tmp_path / "day_0_sparse.npy") == "npy"
    (tmp_path / "day_0").unlink()
    assert data_format(raw) == "npy"  # the prefix of the arrays, when no such file exists


def test_the_number_of_batches_is_known_before_training(models, tmp_path):
    d, _ = models
    data = CriteoData(d / "train.npz", ROWS, 512)
    assert data.num_batches() == 6 == len(list(data))
    assert planned_steps(data, 3, None) == 18 and planned_steps(data, 3, 10) == 10
    text = HERE / "data" / "criteo_kaggle_head1000.txt"
    assert estimate_text_rows(text) == 1000  # a small file: counted
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        for _ in range(40):
            f.write(text.read_bytes())
    assert abs(estimate_text_rows(big, sample_bytes=1 << 16) - 40_000) < 40_000 * 0.05
    line = progress_line("finetune", 1200, 4000, 0, 1, 0.45123, 51000.0, 10.0)
    assert line == "finetune: step 1,200/4,000 (30%), epoch 1/1, loss 0.4512, 51,000 samples/s, ETA 4m40s"


def test_report_sizes_are_the_tensors_written_and_its_output_file(models, tmp_path):
    d, summary = models
    r = report(d / "base.pt", d / "comp.safetensors", data=d / "test.npz")
    assert r["models"]["compressed"]["bytes"] == summary.model_bytes_after  # one measure: compress's
    assert r["models"]["original"]["bytes"] == summary.model_bytes_before
    assert r["models"]["compressed"]["on_disk"] == (d / "comp.safetensors").stat().st_size
    assert r["models"]["int8_rowwise"]["on_disk"] is None
    labels = {name: label for name, _, _, label in plot_points(r)}
    c = r["models"]["compressed"]
    assert f"{c['ratio']:.1f}x" in labels["compressed"] and "AUC " in labels["compressed"]
    assert labels["compressed"].startswith("compressed\n")
    out = tmp_path / "report.md"
    args = ["report", str(d / "base.pt"), str(d / "comp.safetensors"), "--data", str(d / "test.npz"), "--markdown",
            "-o", str(out), "--threads", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert out.read_text() == res.stdout and "| compressed |" in res.stdout.replace("  ", " ")
    # each evaluation reads all the data (minutes on a Criteo day): a line as it starts and ends, on stderr
    assert f"report: evaluating original (1/3) on {d / 'test.npz'}" in res.stderr
    assert "report: int8_rowwise: AUC 0." in res.stderr and " on 1,000 samples in " in res.stderr
    res = CliRunner().invoke(main, args)  # an existing report is kept without --force
    assert res.exit_code == 1 and "exists; pass --force" in res.output
    res = CliRunner().invoke(main, args[:-2] + ["-o", str(d / "base.pt")])  # never over an input
    assert res.exit_code == 1 and (d / "base.pt").stat().st_size > 0


def test_the_plot_shows_labelled_points(models, tmp_path):
    pytest.importorskip("matplotlib")
    d, _ = models
    png = tmp_path / "r.png"
    r = report(d / "base.pt", d / "comp.safetensors", data=d / "test.npz", plot=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    h, w = matplotlib.image.imread(str(png)).shape[:2]
    assert (w, h) == (800, 500)
    assert {p[0] for p in plot_points(r)} == {"original", "compressed", "int8_rowwise"}


def test_json_of_synth_decompress_and_inspect(models, tmp_path):
    d, _ = models
    r = CliRunner().invoke(main, ["synth", "-o", str(tmp_path / "s.npz"), "-n", "10", "--json"])
    assert json.loads(r.stdout)["rows"] == 10
    r = CliRunner().invoke(main, ["decompress", str(d / "comp.safetensors"), "-o", str(tmp_path / "back.pt"),
                                  "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert r.stderr == "" and json.loads(r.stdout)["tables_rebuilt"] == ["emb_l.0.weight", "emb_l.1.weight"]


def test_differences_are_signed_and_never_minus_zero():
    from fpd_convert.reporting.tables import signed
    assert [signed(x) for x in (-0.00004, 0.0, 0.00126, -0.0012)] == ["+0.0000", "+0.0000", "+0.0013", "-0.0012"]


def test_tables_right_align_numbers_and_left_align_text():
    from fpd_convert.reporting.tables import render_table
    out = render_table(["table", "bytes", "TT"], [["a", "1.50 MB", "235x16x16 / 4x2x2 / r=5,5, exact 1,200"],
                                                  ["bb", "10.25 KB", "98x16x16 / 4x2x2 / r=24,24"],
                                                  ["c", "-", ""]]).splitlines()
    text_at = out[0].index("TT")
    assert [line[text_at:text_at + 2] for line in out[2:4]] == ["23", "98"], out  # text starts at its header
    assert out[2].index(" MB") == out[3].index(" KB"), out  # numbers end at the column's right edge
