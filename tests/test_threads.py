"""Threads that fit the machine (fpd_convert.threads) and the options every command shares."""
import os
import stat
import subprocess
import sys

import click
import pytest

from fpd_convert.cli import main
from fpd_convert.threads import ThreadChoice, busy_cpus, usable_cpus

LONG_COMMANDS = ("compress", "decompress", "export", "train", "finetune", "report", "demo", "bench")


def test_every_option_of_every_command_has_help_text():
    missing = [f"{name} {p.opts[-1]}" for name, cmd in main.commands.items() for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert missing == []


@pytest.mark.parametrize("name", LONG_COMMANDS)
def test_long_commands_take_threads(name):
    assert "--threads" in [o for p in main.commands[name].params for o in p.opts]


def test_usable_cpus_follow_the_affinity_and_torchrun(monkeypatch):
    mine = len(os.sched_getaffinity(0))
    assert 1 <= usable_cpus() <= mine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(mine * 4))  # more processes than CPUs: one thread each
    assert usable_cpus() == 1


def test_busy_cpus_counts_other_runnable_work():
    usable = usable_cpus()
    assert 0 <= busy_cpus(usable) <= usable
    from fpd_convert.threads import host_cpus
    burner = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(host_cpus())]
    try:
        import time
        time.sleep(0.5)
        # every CPU of the host has a spinning process beside this one: most usable ones are seen busy
        assert busy_cpus(usable, samples=9) >= max(1, usable // 2)
    finally:
        for p in burner:
            p.kill()
            p.wait()


def _first_line(env_extra, args):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env.update(env_extra)
    code = ("import sys, torch, threadpoolctl; from fpd_convert.threads import fit_threads; c = fit_threads(*sys.argv[1:2] "
            "and [int(sys.argv[1])]); print(c.describe()); print(torch.get_num_threads(), max(p['num_threads'] for p in "
            "threadpoolctl.threadpool_info() if p['user_api'] == 'blas'))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_the_choice_sets_both_pools_and_the_user_wins():
    line, pools = _first_line({}, [])
    torch_threads, blas = map(int, pools.split())
    assert line.startswith(f"threads: {torch_threads} (BLAS 1;") and blas == 1 and torch_threads >= 1
    line, pools = _first_line({}, ["3"])
    assert line == "threads: 3 (BLAS 3; as --threads says)" and pools == "3 3"
    line, _ = _first_line({"OMP_NUM_THREADS": "1"}, [])
    assert line.endswith("as OMP_NUM_THREADS says)")


def test_a_command_states_its_threads_first_and_writes_files_by_the_umask(tmp_path):
    data, model = tmp_path / "d.npz", tmp_path / "m.pt"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "fpd_convert", *a], capture_output=True, text=True,
                                    env=env, cwd=tmp_path)
    assert run("synth", "-o", str(data), "-n", "600").returncode == 0
    old = os.umask(0o022)
    try:
        out = run("train", "--train", str(data), "-o", str(model), "--max-steps", "2", "--threads", "1")
    finally:
        os.umask(old)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines()[0] == "threads: 1 (BLAS 1; as --threads says)"
    assert stat.S_IMODE(model.stat().st_mode) == 0o644


def test_thread_choice_describes_itself():
    c = ThreadChoice(1, 1, 2, 1, "chosen")
    assert c.describe() == "threads: 1 (BLAS 1; 2 CPU(s) usable, 1 busy with other work; --threads N to choose)"
    assert c.to_dict()["busy_cpus"] == 1


@pytest.mark.parametrize("args, message", [
    (["compress", "m.pt", "-o", "c.st", "--tables", "0,1", "--min-rows", "1000", "--threads", "1"],
     "--tables and --min-rows cannot"),
    (["report", "a.pt", "b.st", "--json", "--markdown", "--threads", "1"], "--json and --markdown cannot be used together"),
])
def test_options_that_exclude_each_other_are_refused_by_their_flags(tmp_path, args, message):
    from click.testing import CliRunner
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
