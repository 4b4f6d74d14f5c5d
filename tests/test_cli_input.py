"""Bad numeric options and devices: a clear message and a non-zero exit, before any work (no traceback)."""
import pytest
import torch
from click.testing import CliRunner

from fpd_convert.cli import main
from fpd_convert.devices import resolve_device


@pytest.mark.parametrize("args,message", [
    (["--rows", "0"], "'--rows': 0 is not in the range x>=1"),
    (["--batch", "0"], "'--batch': 0 is not in the range x>=1"),
    (["--pooling", "0"], "'--pooling': 0 is not in the range x>=1"),
    (["--reps", "0"], "'--reps': 0 is not in the range x>=1"),
    (["--zipf", "-1"], "'--zipf': -1.0 is not in the range x>=0"),
    (["--dim", "0"], "'--dim': 0 is not in the range x>=1"),
    (["--device", "gpu7"], "--device should be auto, cpu, cuda or cuda:N but got 'gpu7'"),
    (["--device", "meta"], "--device should be auto, cpu, cuda or cuda:N but got 'meta'"),
    (["--svd", "--rows", "0"], "'--rows': 0 is not in the range x>=1"),
])
def test_bench_refuses_bad_options_with_a_message(args, message):
    r = CliRunner().invoke(main, ["bench", *args])
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_on_cuda_without_a_gpu_says_so():
    r = CliRunner().invoke(main, ["bench", "--device", "cuda", "--rows", "1000"])
    assert r.exit_code == 1 and "--device cuda was asked for but this machine has no CUDA device" in r.output
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:0")


def test_resolve_device_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("args,message", [
    (["finetune", "in.safetensors", "--train", "t.npz", "-o", "o.safetensors", "--batch-size", "0"],
     "'--batch-size': 0 is not in the range x>=1"),
    (["finetune", "in.safetensors", "--train", "t.npz", "-o", "o.safetensors", "--max-steps", "0"],
     "'--max-steps': 0 is not in the range x>=1"),
    (["finetune", "in.safetensors", "--train", "t.npz", "-o", "o.safetensors", "--tt-lr", "-1"],
     "'--tt-lr': -1.0 is not in the range x>=0"),
    (["train", "--train", "t.npz", "-o", "o.pt", "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
    (["synth", "-o", "o.npz", "--rows", "0"], "'--rows': 0 is not in the range x>=1"),
    (["report", "a.pt", "b.safetensors", "--max-rows", "0"], "'--max-rows': 0 is not in the range x>=1"),
    (["demo", "--train-rows", "0"], "'--train-rows': 0 is not in the range x>=1"),
    (["compress", "m.pt", "-o", "o.safetensors", "--min-rows", "-5"], "'--min-rows': -5 is not in the range x>=1"),
    (["compress", "m.pt", "-o", "o.safetensors", "--num-largest", "0"], "'--num-largest': 0 is not in the range x>=1"),
    (["compress", "m.pt", "-o", "o.safetensors", "--data-rows", "0"], "'--data-rows': 0 is not in the range x>=1"),
])
def test_other_commands_refuse_bad_numbers_before_reading_anything(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # nothing may be written here
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and message in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_help_and_the_package_import_do_not_load_torch():
    # the package's names are imported on first use: `fpd-convert --help` answers in ~0.1 s, not 2 s
    import subprocess
    import sys
    code = ("import sys, fpd_convert, fpd_convert.cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(fpd_convert.cli.main, ['compress', '--help']); "
            "assert r.exit_code == 0 and 'Usage' in r.output, r.output; "
            "assert 'torch' not in sys.modules and 'tensorly' not in sys.modules, 'loaded'; "
            "assert fpd_convert.TTEmbeddingBag.__name__ == 'TTEmbeddingBag' and 'torch' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
