"""Data-parallel SVI scaling (issue 14): epoch time on 1 and 2 processes, printed as one JSON line.

MLP 784-1000-1000-10 on ``mnist5k`` (3,200 real 28x28 MNIST training images), global batch 128,
per-example noise, the one-pass loss. One process trains with ``fit(distributed=False)``; two
processes are spawned with the gloo backend on CPU and train with the same global batch (64 per
rank). Each set-up runs ``--epochs`` SVI epochs; the median of the epochs after the first is its
epoch time. Every process uses one torch thread, so 2 processes use 2 cores: on a 2-core machine
shared with other work expect little; the point is that it runs and is measured.

    python benchmarks/ddp_scaling.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch


def _train(epochs: int, distributed) -> list:
    import pyro

    from bmrs_pyro import AutoTruncatedLogNormal, fit
    from bmrs_pyro.data import load
    from bmrs_pyro.models import build

    torch.set_num_threads(1)
    data = load("mnist5k")
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = build("mlp", data.input_shape, 10, hidden=(1000, 1000))
    guide = AutoTruncatedLogNormal(model)
    history = fit(model, guide, data.train, epochs=epochs, batch_size=128, lr=1e-3, guide_lr=0.05, seed=0,
                  progress=False, distributed=distributed)
    return list(history.seconds)


def _worker(rank: int, world: int, init_file: str, epochs: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        seconds = _train(epochs, None)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(seconds, f)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    """Measure and print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="SVI epochs per set-up (the first is not timed)")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first epoch is a warm-up)")
    import torch.multiprocessing as mp

    one = _train(args.epochs, False)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds.json")
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), args.epochs, out), nprocs=2, join=True)
        wall_two = time.perf_counter() - t0
        with open(out) as f:
            two = json.load(f)
    t1, t2 = statistics.median(one[1:]), statistics.median(two[1:])
    print(json.dumps({"benchmark": "ddp_scaling", "model": "mlp 784-1000-1000-10", "data": "mnist5k (3200 train)",
                      "global_batch": 128, "backend": "gloo", "epochs_timed": args.epochs - 1,
                      "epoch_seconds_1proc": round(t1, 3), "epoch_seconds_2proc": round(t2, 3),
                      "speedup": round(t1 / t2, 3), "spawn_and_train_wall_2proc": round(wall_two, 1),
                      "cpu_count": os.cpu_count(), "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
