"""The README's code blocks run as written, on the files `fpd-convert demo` makes."""
import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _blocks(lang):
    return [b for kind, b in re.findall(r"```(\w+)\n(.*?)```", README, re.S) if kind == lang]


def test_the_readme_has_two_set_up_commands_and_the_demo():
    setup, demo = _blocks("bash")[:2]
    assert [line for line in setup.splitlines() if line.strip()] == [
        'python3 -m pip install torch==2.13.0 -e ".[test]"', "python3 -m pytest -q"]
    assert demo.strip() == "fpd-convert demo"
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci  # CI calls the README's test command


def test_the_readme_commands_and_python_run_as_written(tmp_path):
    fpd = [sys.executable, "-m", "fpd_convert"]
    done = subprocess.run(fpd + ["demo", "-o", "fpd-demo", "--train-rows", "20000"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wide = [line for line in (done.stdout + done.stderr).splitlines() if len(line) > 100]
    assert wide == [], wide  # the demo's output fits 100 columns
    assert done.stderr.splitlines()[0].startswith("threads: ")  # the thread choice comes first
    walk = _blocks("bash")[2].replace("fpd-convert ", f"{sys.executable} -m fpd_convert ")
    done = subprocess.run(["bash", "-e", "-c", walk], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("model.tt.safetensors", "model.ft.safetensors", "model.ft.control.safetensors", "report.png",
                 "model.onnx", "model.dense.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    done = subprocess.run([sys.executable, "-c", _blocks("python")[0]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.Size([8, 1])" in done.stdout and "torch.Size([2, 64])" in done.stdout
