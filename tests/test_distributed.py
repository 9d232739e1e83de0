"""Data-parallel SVI on torch.distributed (issue 14): gloo on CPU, 2 processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker  # noqa: E402

from bmrs_pyro.distributed import DataParallel, resolve  # noqa: E402
from bmrs_pyro.launch import strip_nproc  # noqa: E402


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the worker on 2 gloo ranks once; the saved states of both runs on both ranks."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker.worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return {name: [torch.load(out / f"{name}-{r}.pt") for r in range(2)] for name in ("exact", "default")}


def _params(state):
    return {k: v for k, v in state.items() if k.startswith(("model.", "guide."))}


@pytest.mark.slow
def test_two_ranks_of_64_match_one_process_of_128(two_ranks):
    torch.set_num_threads(1)
    single = _ddp_worker.train("global", False)
    for rank_state in two_ranks["exact"]:
        p, q = _params(rank_state), _params(single)
        assert p.keys() == q.keys() and len(p) > 4
        for k in q:
            assert torch.allclose(p[k].float(), q[k].float(), atol=1e-5, rtol=0), k
        assert len(rank_state["loss"]) == len(single["loss"]) == 20
        # The loss recorded is the mean over ranks, i.e. the global minibatch's loss.
        assert torch.allclose(torch.tensor(rank_state["loss"]), torch.tensor(single["loss"]), rtol=1e-5)
        # The continuous-pruning reduction after step 20 removed units, the same on every rank.
        for s, mask in single["masks"].items():
            assert torch.equal(rank_state["masks"][s], mask), s
    assert sum(int((m == 0).sum()) for m in single["masks"].values()) == 8  # a quarter of 2 x 16 units


@pytest.mark.slow
def test_independent_noise_ranks_stay_identical_and_share_masks(two_ranks):
    a, b = two_ranks["default"]
    for k, v in _params(a).items():
        assert torch.equal(v, _params(b)[k]), k  # averaged gradients: identical parameters everywhere
    for s in a["masks"]:
        assert torch.equal(a["masks"][s], b["masks"][s])
    assert sum(int((m == 0).sum()) for m in a["masks"].values()) == 8
    # Independent noise: the first-step losses of the ranks' own minibatches are averaged, so they
    # differ from the shared-stream run's (which used another noise mode anyway): only finite here.
    assert all(torch.isfinite(torch.tensor(a["loss"])))


def test_resolve_refuses_bad_values_and_detects_no_group():
    assert resolve(None) is None and resolve(False) is None
    with pytest.raises(ValueError, match="ProcessGroup"):
        resolve("gloo")
    with pytest.raises(ValueError, match="initialised process group"):
        resolve(DataParallel())


def test_strip_nproc():
    assert strip_nproc(["run", "--nproc", "2", "--epochs", "3", "--nproc=4"]) == ["run", "--epochs", "3"]


def test_resume_with_another_number_of_ranks_is_refused(monkeypatch, tmp_path):
    from bmrs_pyro.launch import run_hook
    from bmrs_pyro.runs import RunConfig

    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it; the check comes before any group exists
    with pytest.raises(ValueError, match="trained on 2 rank"):
        run_hook(RunConfig(nproc=2), [], resume_dir=tmp_path)
    with pytest.raises(ValueError, match="disagrees with the 3 processes"):
        run_hook(RunConfig(nproc=2), [])


def test_fit_refuses_a_global_batch_the_ranks_cannot_share():
    class Two(DataParallel):
        world_size = 2  # a stand-in: only the arithmetic is checked

    with pytest.raises(ValueError, match="multiple of the 2 ranks"):
        Two().local_batch(127)
    assert Two().local_batch(128) == 64


@pytest.mark.slow
def test_bmrs_run_nproc_2_writes_once_and_resumes_with_the_same_ranks(tmp_path):
    import json
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    base = [sys.executable, "-m", "bmrs_pyro", "run"]
    common = ["--output", str(tmp_path), "--quiet", "--no-report"]
    done = subprocess.run(base + ["--nproc", "2", "--epochs", "2", "--finetune-epochs", "0", "--prune-every", "1",
                                  "--name", "ddp", *common], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # one run folder: only rank 0 writes
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["nproc"] == 2 and config["batch_size"] == 128
    again = subprocess.run(base + ["--resume", str(tmp_path / "ddp"), "--epochs", "3", "--quiet", "--no-report"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["epochs"]["train"] == 3 and metrics["epochs"]["resumed_from"] == 2
