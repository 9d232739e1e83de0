"""Exact resume: a run stopped at an epoch boundary and resumed ends bit-identical to the uninterrupted run.

The settings make continuous pruning actually remove structures (kl_weight 10, guide_lr 0.3,
pruning every 4 epochs), so masks, frozen posteriors and the optimizer state all matter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pytest
import torch

import bmrs_pyro.checkpoint as checkpoint_module
from bmrs_pyro.cli import main

EPOCHS = 12
ARGS = ["--hidden", "48", "--batch-size", "128", "--epochs", str(EPOCHS), "--finetune-epochs", "2",
        "--warm-start-epochs", "2", "--prune-every", "4", "--prune-start", "4", "--reference-code",
        "--kl-weight", "10", "--guide-lr", "0.3", "--quiet", "--no-report"]
#: metrics that measure time, or say that the run was resumed: everything else must match exactly.
TIMING_KEYS = {"seconds", "train_seconds", "latency_ms", "epochs"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    pyro.clear_param_store()
    assert main(["run", *ARGS, "--output", str(out), "--name", "full"]) == 0
    return out / "full"


def _final(run: Path) -> dict:
    return torch.load(run / "final.pt", weights_only=False)


def _assert_identical(a: Path, b: Path) -> None:
    fa, fb = _final(a), _final(b)
    for part in ("model_state", "guide_state"):
        assert fa[part].keys() == fb[part].keys()
        for key in fa[part]:
            assert torch.equal(fa[part][key], fb[part][key]), f"{part}.{key} differs"
    masks = [k for k in fa["model_state"] if k.endswith("mask")]
    assert masks and any(float(fa["model_state"][k].sum()) < fa["model_state"][k].numel() for k in masks), \
        "the settings should prune during training"
    keep_a, keep_b = fa["extra"]["reduction"]["keep"], fb["extra"]["reduction"]["keep"]
    assert all(torch.equal(keep_a[s], keep_b[s]) for s in keep_a)
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    def same(m):  # any "seconds..." key is a wall time
        return {k: v for k, v in m.items() if k not in TIMING_KEYS and "seconds" not in k}

    assert same(ma) == same(mb)


def _stop_after(monkeypatch, epoch: int) -> None:
    """Raise KeyboardInterrupt right after the checkpoint of ``epoch`` is written (an interrupted run)."""
    real = checkpoint_module.save_checkpoint

    def save_then_stop(path, *args, epoch=None, **kwargs):
        result = real(path, *args, epoch=epoch, **kwargs)
        if epoch == stop_at and Path(path).name == "checkpoint.pt":
            raise KeyboardInterrupt
        return result

    stop_at = epoch
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_stop)


@pytest.mark.slow
# On a pruning boundary, between two, and after the last training epoch (a crash during the final
# reduction or fine-tuning, which have no checkpoint of their own: they are redone).
@pytest.mark.parametrize("stop", [4, 6, EPOCHS])
def test_stopped_and_resumed_run_is_bit_identical(uninterrupted, tmp_path, monkeypatch, capsys, stop):
    _stop_after(monkeypatch, stop)
    assert main(["run", *ARGS, "--output", str(tmp_path), "--name", "cut"]) == 130
    monkeypatch.undo()
    run = tmp_path / "cut"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == stop
    pyro.clear_param_store()
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    assert main(["run", "--resume", str(run), "--quiet", "--no-report"]) == 0
    _assert_identical(uninterrupted, run)
    assert json.loads((run / "metrics.json").read_text())["epochs"]["resumed_from"] == stop


@pytest.mark.slow
def test_resume_without_the_saved_random_state_differs(uninterrupted, tmp_path, monkeypatch):
    """The check above can fail: drop the random state from the checkpoint and the result changes."""
    _stop_after(monkeypatch, 6)
    assert main(["run", *ARGS, "--output", str(tmp_path), "--name", "cut"]) == 130
    monkeypatch.undo()
    run = tmp_path / "cut"
    payload = torch.load(run / "checkpoint.pt", weights_only=False)
    payload["rng_state"] = None
    torch.save(payload, run / "checkpoint.pt")
    pyro.clear_param_store()
    assert main(["run", "--resume", str(run), "--quiet", "--no-report"]) == 0
    fa, fb = _final(uninterrupted), _final(run)
    assert any(not torch.equal(fa["guide_state"][k], fb["guide_state"][k]) for k in fa["guide_state"])


_SLOW_EPOCHS = """
import sys, time
import bmrs_pyro.runs as runs
real = runs._checkpoint_callback
def slow(exp, path):
    callback = real(exp, path)
    def wrapped(*args):
        out = callback(*args)
        time.sleep(0.4)  # time for the test to kill us between two epochs; changes no number
        return out
    return wrapped
runs._checkpoint_callback = slow
from bmrs_pyro.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(uninterrupted, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_EPOCHS, "run", *ARGS, "--output", str(tmp_path),
                             "--name", "killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "killed"
    ckpt = run / "checkpoint.pt"
    epoch, deadline = 0, time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.is_file():
                epoch = torch.load(ckpt, weights_only=False)["epoch"]
                if epoch >= 5:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final.pt").exists() and not (run / "metrics.json").exists()
    saved = torch.load(ckpt, weights_only=False)["epoch"]
    assert 5 <= saved < EPOCHS
    # The killed process's lock is stale: its PID is still in the lock file, but the lock is free.
    from bmrs_pyro.runlock import lock_holder

    assert json.loads((run / ".lock").read_text())["pid"] == proc.pid
    assert lock_holder(run) is None
    pyro.clear_param_store()
    assert main(["run", "--resume", str(run), "--quiet", "--no-report"]) == 0
    _assert_identical(uninterrupted, run)
    assert json.loads((run / "metrics.json").read_text())["epochs"]["resumed_from"] == saved
