"""Launching ``bmrs run`` on several processes: ``--nproc N`` starts torchrun's own machinery,
and under torchrun rank 0 runs the whole run while the other ranks follow it without writing.

The data-parallel training itself lives in :mod:`bmrs_pyro.distributed`; this module is the
command line's side of it and sits above :mod:`bmrs_pyro.runs`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint
from .distributed import init_from_env
from .runs import CHECKPOINT_FILE, build_experiment, final_reduction, finetune, train

__all__ = ["launch", "strip_nproc", "run_hook", "follow_run", "torchrun_available"]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """``bmrs run --nproc N``: run ``python -m torch.distributed.run --standalone --nproc-per-node N
    -m bmrs_pyro <argv>`` (torchrun's own machinery, one node) and return its exit code."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "bmrs_pyro", *argv]
    return subprocess.call(cmd)


def strip_nproc(argv: Sequence[str]) -> list:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (what each torchrun worker is given)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def run_hook(config, argv: Sequence[str], resume_dir=None) -> Optional[int]:
    """The ``bmrs run`` hook: with ``--nproc N`` > 1 outside torchrun, launch N workers through
    torchrun and return their exit code; under torchrun, initialise the process group and, on
    ranks > 0, take part in the run without writing (:func:`follow_run`) and return 0; return
    None when the caller (rank 0, or a single process) should run as usual. ValueError if a
    resumed run was trained on another number of ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "WORLD_SIZE" not in os.environ:
        if config.nproc > 1:
            # torchrun's parser would take --nproc for its --nproc-per-node: the workers get the
            # number from WORLD_SIZE instead (and a resumed run from its config.json).
            return launch(config.nproc, ["run", *strip_nproc(argv)])
        return None
    if resume_dir is not None and config.nproc != world:
        raise ValueError(f"the run in {resume_dir} was trained on {config.nproc} rank(s); resume it with the same "
                         f"number (--nproc {config.nproc}, or torchrun --nproc-per-node {config.nproc}), not {world}")
    if config.nproc != world:
        raise ValueError(f"--nproc {config.nproc} disagrees with the {world} processes torchrun started; "
                         "leave --nproc out under torchrun")
    if world > 1:
        init_from_env(config.device)
    if dist.is_initialized() and dist.get_rank() > 0:
        follow_run(config, resume_dir=resume_dir)
        return 0
    return None


def follow_run(config, *, resume_dir=None, progress: bool = False) -> None:
    """What a rank > 0 does in ``bmrs run``: build the same experiment (and load the checkpoint
    when resuming), then take part in training, the final reduction and fine-tuning. It writes
    nothing: rank 0 runs :func:`bmrs_pyro.runs.execute`, which owns the run folder."""
    config = config.resolved().validate()
    if config.device == "cpu":
        torch.set_num_threads(config.threads)
    exp = build_experiment(config)
    start = 0
    if resume_dir is not None:
        state = load_checkpoint(Path(resume_dir) / CHECKPOINT_FILE, exp.model, exp.guide, optimizer=exp.optimizer)
        exp.history = state["history"]
        exp.rng_state = state.get("rng_state")
        start = int(state["epoch"] or 0)
    if start < config.epochs:
        train(exp, start_epoch=start, checkpoint=None, progress=progress)
    final_reduction(exp)
    finetune(exp, progress=progress)


def torchrun_available() -> bool:
    """Whether ``torchrun`` is on PATH (``python -m torch.distributed.run`` always works)."""
    return shutil.which("torchrun") is not None
