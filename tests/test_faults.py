"""Faults a real run meets: kill -9, SIGTERM, a second writer, a full disk.  Nothing is lost and nothing
is left behind."""
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fpd_convert.training.finetune import finetune

from tiny import tiny_model
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    tiny_model(d)
    return d


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fpd_convert", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, **kw)


def _wait_for(path: Path, proc, what: str, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[0]}"
        assert time.time() < end, f"no {what} after {timeout} s"
        time.sleep(0.005)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _hidden(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


FINETUNE = ["--val", "VAL", "--eval-every", "7", "--batch-size", "64", "--epochs", "30", "--max-steps", "240",
            "--checkpoint-every", "4"]


def _finetune_args(model: Path, output: Path):
    return ["finetune", model / "comp.safetensors", "--train", model / "train.npz", "-o", output,
            *[model / "val.npz" if a == "VAL" else a for a in FINETUNE]]


@pytest.mark.slow
def test_kill_9_of_finetune_then_resume_equals_an_uninterrupted_run(model, tmp_path):
    whole = _cli(*_finetune_args(model, tmp_path / "whole.safetensors"))
    out = tmp_path / "killed.safetensors"
    state = tmp_path / "killed.safetensors.resume.pt"
    run = _cli(*_finetune_args(model, out))
    _wait_for(state, run, "the first periodic checkpoint")
    time.sleep(random.uniform(0, 0.2))  # a random step after it
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not out.exists() and state.exists()
    saved_step = torch.load(state, weights_only=True)["step"]
    assert saved_step >= 4 and saved_step % 4 == 0
    resumed = _cli(*_finetune_args(model, out), "--resume")
    text = resumed.communicate()[0]
    assert resumed.returncode == 0, text
    assert not state.exists()  # removed once the output is written
    assert whole.wait() == 0, whole.communicate()[0]
    a, b = load_file(str(tmp_path / "whole.safetensors")), load_file(str(out))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit
    assert _hidden(tmp_path) == []


@pytest.mark.slow
def test_kill_9_of_compress_leaves_nothing_behind_on_the_next_run(model, tmp_path):
    out = tmp_path / "c.safetensors"
    window = 0.5
    for _ in range(8):  # a kill at a random moment of the run; one that wrote its output first is tried again, sooner
        run = _cli("compress", model / "base.pt", "-o", out, "--ratio", "6")
        _wait_for(tmp_path / ".c.safetensors.fpd-lock", run, "its lock file")
        time.sleep(random.uniform(0, window))
        run.send_signal(signal.SIGKILL)
        run.wait()
        if not out.exists():
            break
        assert load_file(str(out))  # the output appears whole (renamed into place) or not at all
        out.unlink()
        window /= 4
    else:
        pytest.fail("compress wrote its output before every kill")
    # what a run killed while writing leaves (the kill above may have left one too)
    stale = tmp_path / f".c.safetensors.{_dead_pid()}.k3x9_q.tmp"
    stale.write_bytes(b"\0" * 100_000)
    again = _cli("compress", model / "base.pt", "-o", out, "--ratio", "6")
    text = again.communicate()[0]
    assert again.returncode == 0, text
    assert f"removed {stale}" in text and "interrupted run" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


@pytest.mark.slow
def test_sigterm_during_compress_removes_its_files(model, tmp_path):
    out = tmp_path / "c.safetensors"
    run = _cli("compress", model / "base.pt", "-o", out, "--ratio", "6")
    _wait_for(tmp_path / ".c.safetensors.fpd-lock", run, "its lock file")
    run.send_signal(signal.SIGTERM)
    text = run.communicate()[0]
    if run.returncode == 0:  # it finished before the signal arrived: then the output is whole
        assert out.exists()
    else:
        assert run.returncode == 128 + signal.SIGTERM and "Traceback" not in text, text
        assert not out.exists()
    assert _hidden(tmp_path) == []


def test_two_runs_on_one_output_one_wins_the_other_says_so(model, tmp_path):
    out = tmp_path / "c.safetensors"
    # a real second writer: another process that claims OUTPUT and writes it when told to
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from fpd_convert.outputs import check_output, write_text\n"
        f"check_output({str(out)!r}); print('claimed', flush=True); sys.stdin.readline()\n"
        f"write_text({str(out)!r}, 'the first writer', force=True)")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "claimed"
    second = _cli("compress", model / "base.pt", "-o", out, "--rank", "4", "--force")
    text = second.communicate()[0]
    assert second.returncode == 1 and f"{out} is being written by another fpd-convert process" in text, text
    holder.communicate("go\n")
    assert holder.returncode == 0 and out.read_text() == "the first writer"
    assert _hidden(tmp_path) == []


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_gives_an_error_and_leaves_no_partial_file(model, tmp_path):
    out = tmp_path / "c.safetensors"
    run = _cli("compress", model / "base.pt", "-o", out, "--rank", "4", preexec_fn=_limit_file_size(20_000))
    text = run.communicate()[0]
    assert run.returncode == 1 and "Error:" in text and "Traceback" not in text, text
    assert "too large" in text.lower() or "no space" in text.lower(), text
    assert list(tmp_path.iterdir()) == []


def test_the_resume_state_survives_an_output_that_fails_to_write(model, tmp_path, monkeypatch):
    out = tmp_path / "ft.safetensors"
    state = tmp_path / "ft.safetensors.resume.pt"
    import fpd_convert.training.finetune as ft

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out))
    monkeypatch.setattr(ft, "write_compressed", full_disk)
    args = dict(batch_size=64, max_steps=6, progress=False, checkpoint_every=3)
    with pytest.raises(OSError):
        finetune(model / "comp.safetensors", model / "train.npz", out, **args)
    assert state.exists() and not out.exists()  # six steps of work kept
    assert torch.load(state, weights_only=True)["step"] == 6
    monkeypatch.undo()
    r = finetune(model / "comp.safetensors", model / "train.npz", out, resume=True, **args)
    assert r["steps"] == 6 and out.exists() and not state.exists()


def test_a_truncated_resume_state_is_named_and_not_used(model, tmp_path):
    out = tmp_path / "ft.safetensors"
    state = tmp_path / "ft.safetensors.resume.pt"
    finetune(model / "comp.safetensors", model / "train.npz", out, batch_size=64, max_steps=4, progress=False,
             interrupt_after=2)
    state.write_bytes(state.read_bytes()[:300])
    from click.testing import CliRunner
    from fpd_convert.cli import main
    r = CliRunner().invoke(main, ["finetune", str(model / "comp.safetensors"), "--train", str(model / "train.npz"),
                                  "-o", str(out), "--resume", "--batch-size", "64"])
    assert r.exit_code == 1 and "damaged zip archive" in r.output and str(state) in r.output, r.output
    assert not out.exists()
