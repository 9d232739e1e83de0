"""Where the time of one ``fit`` epoch goes, per configuration of ``svi_speed.py``.

Trains each configuration for ``--warmup`` epochs (the CLI's learning rates, so posteriors
have moved), then profiles the next epoch with cProfile (progress bar on, as users run it) and
prints one JSON object: per configuration the epoch's wall time under the profiler and the
cumulative seconds of each part (parts nest: the sampler, KL and guide parameters are inside
the model pass; Pyro's own Python is counted wherever it runs):

- ``model_pass``: the loss's forward pass (``MeanFieldNoiseELBO.differentiable_loss``);
- ``step_constants``: the CPU float32 step's KL and theta together (``step_kl_and_theta``: the
  shared per-structure constants, the sampler and the KL below);
- ``sampler``: drawing theta (``sample_sites``, ``_fast_icdf`` / ``rsample``);
- ``kl``: ``kl_divergence`` and the per-step KL (``kl_to_own_bounds``, the fused step's KL);
- ``guide_params``: reading loc/scale from the guide (``PyroModule`` attribute access);
- ``pyro_python``: time spent inside Pyro's own modules (tracing, messengers, PyroModule);
- ``backward``, ``optimizer`` (``step`` and ``zero_grad``), ``data_slicing``
  (``iterate_batches``), ``progress_bar`` (tqdm).

cProfile inflates Python-heavy parts; read the shares, not the seconds.

    python benchmarks/svi_profile.py [--configs mlp6x50,mlp100,lenet5] [--warmup 4]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

import pyro
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from svi_speed import CONFIGS, GUIDE_LR, LR  # noqa: E402

from bmrs_pyro import data as bmrs_data  # noqa: E402
from bmrs_pyro.guides import AutoTruncatedLogNormal  # noqa: E402
from bmrs_pyro.infer import fit  # noqa: E402
from bmrs_pyro.models.registry import build  # noqa: E402

# part -> [(file suffix, function names)]; cumulative time of the outermost matching calls.
PARTS = {
    "model_pass": [("bmrs_pyro/elbo.py", ("differentiable_loss",))],
    "sampler": [("bmrs_pyro/_fast_paths.py", ("sample_sites", "_icdf_draw", "_fast_icdf")),
                ("bmrs_pyro/distributions.py", ("rsample",))],
    "kl": [("torch/distributions/kl.py", ("kl_divergence",)), ("bmrs_pyro/_fast_paths.py", ("kl_to_own_bounds",)),
           ("bmrs_pyro/_fused_step.py", ("forward", "_quadrature_kl"))],
    "step_constants": [("bmrs_pyro/_fused_step.py", ("step_kl_and_theta",))],
    "guide_params": [("bmrs_pyro/guides.py", ("loc_scale", "_raw_loc_log_scale"))],
    "backward": [("torch/_tensor.py", ("backward",))],
    "optimizer": [("torch/optim/optimizer.py", ("wrapper", "zero_grad"))],
    "data_slicing": [("bmrs_pyro/batching.py", ("iterate_batches",))],
    "progress_bar": [("tqdm/std.py", ("update", "set_postfix", "refresh", "close", "__init__"))],
}


def _matches(filename: str, func: str, specs) -> bool:
    filename = filename.replace("\\", "/")
    return any(filename.endswith(suffix) and func in names for suffix, names in specs)


def profile_config(name: str, x, y, warmup: int) -> dict:
    arch, options, batch_size = CONFIGS[name]
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = build(arch, tuple(x.shape[1:]), 10, **options)
    guide = AutoTruncatedLogNormal(model)
    profiler = cProfile.Profile()
    marks = {}

    def switch(epoch, history, model, guide):  # profile exactly the epoch after the warm-up
        if epoch == warmup - 1:
            marks["start"] = time.perf_counter()
            profiler.enable()
        elif epoch == warmup:
            profiler.disable()
            marks["end"] = time.perf_counter()

    fit(model, guide, (x, y), epochs=warmup + 1, batch_size=batch_size, lr=LR, guide_lr=GUIDE_LR,
        callbacks=(switch,), progress=True)
    wall = marks["end"] - marks["start"]
    stats = pstats.Stats(profiler).stats
    parts = {}
    for part, specs in PARTS.items():
        total = 0.0
        for (filename, _, func), (_, _, _, cumtime, callers) in stats.items():
            if not _matches(filename, func, specs):
                continue
            # outermost calls only: skip calls made from another function of the same part
            inner = sum(c[3] for (cf, _, cfn), c in callers.items() if _matches(cf, cfn, specs))
            total += cumtime - inner
        parts[part] = round(total, 4)
    parts["pyro_python"] = round(sum(v[2] for (f, _, _), v in stats.items() if "/pyro/" in f.replace("\\", "/")), 4)
    return {"batch_size": batch_size, "epoch_seconds_profiled": round(wall, 4), "parts_seconds": parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = bmrs_data.load("digits").train
    out = {"benchmark": "svi_epoch_profile", "threads": args.threads, "load_average": list(os.getloadavg()),
           "configs": {name: profile_config(name, x, y, args.warmup) for name in args.configs.split(",")}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
