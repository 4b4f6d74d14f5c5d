"""``finetune --control``: the original fine-tuned with the same schedule, and ``report --control``."""
import json

import pytest
import torch
from click.testing import CliRunner

import fpd_convert
from fpd_convert.checkpoints import CheckpointError
from fpd_convert.cli import main
from fpd_convert.reporting.report import report
from fpd_convert.training.finetune import control_output_for, finetune
from fpd_convert.training.train import train

from tiny import ROWS, tiny_model



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("control")
    f = {n: d / n for n in ("train.npz", "val.npz", "base.pt", "other.pt", "comp.safetensors")}
    tiny_model(d, train_rows=4000, held_out_rows=1500, steps=6, tables=("0", "1"))
    train(f["train.npz"], f["other.pt"], table_rows=ROWS, max_steps=6, progress=False, seed=3)
    return d, f


def test_the_control_is_the_original_trained_on_the_same_schedule(files, tmp_path):
    d, f = files
    out = tmp_path / "ft.safetensors"
    r = finetune(f["comp.safetensors"], f["train.npz"], out, f["val.npz"], device="cpu", max_steps=5,
                 eval_every=5, progress=False, control=f["base.pt"])
    ctl_path = control_output_for(out)
    assert ctl_path.name == "ft.control.safetensors" and r["control"]["output"] == str(ctl_path)
    assert r["control"]["steps"] == r["steps"] == 5
    control = fpd_convert.load(ctl_path)
    base = fpd_convert.load(f["base.pt"])
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, control.state_dict()[k])]
    best = r["control"]["best"]
    # trained (when a step beat the start) or kept (when none did): never something else
    assert (moved != []) == (best["step"] > 0)
    # the same training of the original, by hand: the same weights
    from fpd_convert.data import CriteoData
    from fpd_convert.training.loop import fit
    from fpd_convert.training.optim import make_optimizer
    torch.manual_seed(0)
    model = fpd_convert.load(f["base.pt"]).train()
    res = fit(model, CriteoData(f["train.npz"], ROWS, 512), CriteoData(f["val.npz"], ROWS, 8192),
              make_optimizer(model, "adagrad", 0.0001, 0.01), max_steps=5, eval_every=5, eval_at_start=True)
    for k, v in res.best_state.items():
        assert torch.equal(v, control.state_dict()[k]), k

    rep = report(f["base.pt"], f["comp.safetensors"], out, data=f["val.npz"], control=ctl_path)
    ft, ctl = rep["models"]["finetuned"], rep["models"]["control"]
    assert rep["finetuned_vs_control"]["auc_diff"] == pytest.approx(ft["auc"] - ctl["auc"])
    assert ctl["bytes"] == rep["models"]["original"]["bytes"]
    assert not any("under-trained" in w for w in rep["warnings"])  # the control answers that question


def test_the_cli_runs_the_control_and_report_compares(files, tmp_path):
    d, f = files
    out, ctl = tmp_path / "ft.safetensors", tmp_path / "ctl.safetensors"
    r = CliRunner().invoke(main, ["finetune", str(f["comp.safetensors"]), "--train", str(f["train.npz"]), "--val",
                                  str(f["val.npz"]), "-o", str(out), "--max-steps", "3", "--control", str(f["base.pt"]),
                                  "--control-output", str(ctl), "--threads", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"control: wrote {ctl}: 3 steps" in r.stdout
    assert "control: 3 steps planned" not in r.stderr  # (details only with -v)
    r = CliRunner().invoke(main, ["report", str(f["base.pt"]), str(f["comp.safetensors"]), str(out), "--control",
                                  str(ctl), "--data", str(f["val.npz"]), "--json", "--threads", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep["models"]) == {"original", "compressed", "finetuned", "control", "int8_rowwise"}
    r = CliRunner().invoke(main, ["report", str(f["base.pt"]), str(f["comp.safetensors"]), str(out), "--control",
                                  str(ctl), "--data", str(f["val.npz"]), "--threads", "1"])
    assert "finetuned against the control" in r.stdout


def test_a_wrong_control_is_refused_before_any_work(files, tmp_path):
    d, f = files
    out = tmp_path / "ft.safetensors"
    with pytest.raises(CheckpointError, match="is not the original"):
        finetune(f["comp.safetensors"], f["train.npz"], out, device="cpu", max_steps=2, progress=False,
                 control=f["other.pt"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="not a control written by"):
        report(f["base.pt"], f["comp.safetensors"], f["comp.safetensors"], control=f["comp.safetensors"])
    with pytest.raises(ValueError, match="give FINETUNED too"):
        report(f["base.pt"], f["comp.safetensors"], control=f["comp.safetensors"])
