"""One writer per run folder: the OS lock, stale locks, collision-free default names, racing processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bmrs_pyro import run_config, runs
from bmrs_pyro.cli import main
from bmrs_pyro.runlock import LOCK_FILE, RunLock, RunLockedError, create_unique_dir, lock_holder

TINY = ["--hidden", "8", "--batch-size", "256", "--epochs", "2", "--finetune-epochs", "1", "--quiet", "--no-report"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")

_HOLD = """
import sys, time
from bmrs_pyro.runlock import RunLock
lock = RunLock(sys.argv[1], sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(folder: Path, purpose: str = "run") -> subprocess.Popen:
    """A separate process that takes the folder's lock and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder), purpose], env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.held
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["purpose"] == "run"
        assert lock_holder(tmp_path)["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=rf"in use by another bmrs run \(PID {os.getpid()},"):
            RunLock(tmp_path, "report").acquire()
    assert not lock.held and lock_holder(tmp_path) is None
    with RunLock(tmp_path, "report") as again:  # released on exit: free for the next writer
        assert again.held and again.stale is None


def test_lock_of_a_killed_process_is_stale_and_taken_over(tmp_path):
    proc = _holder(tmp_path)
    try:
        assert lock_holder(tmp_path)["pid"] == proc.pid
        with pytest.raises(RunLockedError, match=f"PID {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid  # the record outlives the process
    assert lock_holder(tmp_path) is None  # ... but the kernel released the lock
    with RunLock(tmp_path) as lock:
        assert lock.stale["pid"] == proc.pid


def test_run_report_and_resume_refuse_a_locked_folder_at_once(tmp_path, capsys):
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(runs.RunConfig(name="busy", output=str(tmp_path)).to_dict()))
    (folder / "metrics.json").write_text("{}")
    (folder / "checkpoint.pt").write_bytes(b"x")
    proc = _holder(folder)
    try:
        for argv in (["report", str(folder)], ["run", "--resume", str(folder), "--quiet"],
                     ["run", *TINY, "--output", str(tmp_path), "--name", "busy"]):
            t0 = time.perf_counter()
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert f"PID {proc.pid}" in err and "in use by another bmrs run" in err, err
            assert time.perf_counter() - t0 < 10  # refused at once, no training
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (folder / "checkpoint.pt").read_bytes() == b"x"


def test_unique_dir_under_racing_threads(tmp_path):
    made, errors = [], []

    def make():
        try:
            made.append(create_unique_dir(tmp_path, "same"))
        except Exception as err:  # pragma: no cover - reported by the assert
            errors.append(err)

    threads = [threading.Thread(target=make) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(made) == 12 and len({p.name for p in made}) == 12
    assert sorted(p.name for p in made) == sorted(["same"] + [f"same-{i}" for i in range(2, 13)])


def test_default_names_in_the_same_second_get_a_suffix(tmp_path, capsys, monkeypatch):
    import datetime as dt

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(run_config._dt, "datetime", Frozen)
    for seed in ("0", "1"):
        assert main(["run", *TINY, "--output", str(tmp_path), "--seed", seed]) == 0
    printed = capsys.readouterr().out
    first, second = tmp_path / "digits-mlp-bmrs_n-20300102-030405", tmp_path / "digits-mlp-bmrs_n-20300102-030405-2"
    for folder, seed in ((first, 0), (second, 1)):
        config = json.loads((folder / "config.json").read_text())
        assert config["seed"] == seed and config["name"] == folder.name
        assert (folder / "metrics.json").is_file() and str(folder) in printed
        assert torch.load(folder / "final.pt", weights_only=False)["config"]["seed"] == seed


def _race(argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([sys.executable, "-m", "bmrs_pyro.cli", *argv], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv in argvs]
    out = []
    for proc, argv in zip(procs, argvs):
        stdout, stderr = proc.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_two_processes_racing_on_one_name_and_on_default_names(tmp_path):
    """Two runs into one --name: one wins, the other is refused, the folder holds one run whole.
    Two default-named runs started together: both finish in folders of their own."""
    named = tmp_path / "named"
    a, b = _race([["run", *TINY, "--output", str(named), "--name", "X", "--method", "bmrs_n"],
                  ["run", *TINY, "--output", str(named), "--name", "X", "--method", "l2", "--fraction", "0.5"]])
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (a.stderr, b.stderr)
    loser = a if a.returncode == 2 else b
    assert re.search(r"in use by another bmrs run \(PID \d+|already holds a run", loser.stderr), loser.stderr
    assert "Traceback" not in loser.stderr
    folder = named / "X"
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    final = torch.load(folder / "final.pt", weights_only=False)
    winner_method = "bmrs_n" if (a if a.returncode == 0 else b) is a else "l2"
    assert config["method"] == metrics["method"] == final["config"]["method"] == winner_method
    assert [p.name for p in named.iterdir()] == ["X"]

    default = tmp_path / "default"
    c, d = _race([["run", *TINY, "--output", str(default), "--seed", "0"],
                  ["run", *TINY, "--output", str(default), "--seed", "1"]])
    assert c.returncode == 0 and d.returncode == 0, (c.stderr, d.stderr)
    folders = sorted(default.iterdir())
    assert len(folders) == 2
    seeds = sorted(json.loads((f / "config.json").read_text())["seed"] for f in folders)
    assert seeds == [0, 1]
    for f in folders:
        seed = json.loads((f / "config.json").read_text())["seed"]
        assert torch.load(f / "final.pt", weights_only=False)["config"]["seed"] == seed
        assert (f / "metrics.json").is_file()
    printed = {line.split("->")[-1].strip() for r in (c, d) for line in r.stdout.splitlines() if "->" in line}
    assert printed == {str(f) for f in folders}


def test_compare_refuses_a_folder_another_compare_holds(tmp_path, capsys):
    folder = tmp_path / "c"
    folder.mkdir()
    with RunLock(folder, "compare"):
        assert main(["compare", "--quick", "--methods", "bmrs_n", "--seeds", "1", "--hidden", "8", "--quiet",
                     "--output", str(tmp_path), "--name", "c"]) == 2
    err = capsys.readouterr().err
    assert f"in use by another bmrs compare (PID {os.getpid()}" in err
    assert not (folder / "partial.jsonl").exists()
