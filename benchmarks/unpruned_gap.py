"""Unpruned accuracy of the noise networks against the deterministic methods, at the make-results budget.

A cheap stand-in for ``make results`` (issue 11, point 3): for each of its four tasks and each
seed, the same code paths as ``make results`` (``compare._load_data`` / ``_builder``, the task's
:class:`~bmrs_pyro.baselines.Budget`), but only

* the deterministic methods ``rni`` and ``iap`` (their full runs: unpruned accuracy and stop);
* the noise model of the noise criteria, trained once by ``NoiseCriterionMethod.fit_noise_model``
  (via :func:`bmrs_pyro.compare.iter_noise_methods`) under the recipe ``new`` (the current
  defaults) and/or ``old`` (before issue 11: SVI from the start, ``lr`` 1e-3), then ``bmrs_n`` and
  ``bmrs_n_ref`` at their own stopping points (a one-point sweep, ``fractions=[0]``, so the stop
  is the only extra cost).

Prints one JSON line per (task, seed, method or recipe); nothing asserts on time.

    python benchmarks/unpruned_gap.py --seeds 0 1 --recipes old new
    python benchmarks/unpruned_gap.py --tasks digits-mlp --epochs 10 --seeds 0   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyro  # noqa: E402
import torch  # noqa: E402

from bmrs_pyro.baselines import METHODS  # noqa: E402
from bmrs_pyro.baselines.common import seed_all  # noqa: E402
from bmrs_pyro.compare import iter_noise_methods  # noqa: E402
from bmrs_pyro.compare.config import _builder, _load_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: The noise-model training before issue 11, as options over the current defaults.
OLD = {"options": {"warm_start": 0.0, "guide_lr": 0.05}, "lr": 1e-3}
RECIPES = {"old": OLD, "new": {"options": {}, "lr": None}}


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", ROOT / "scripts" / "make_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_results"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    mr = _make_results()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=[t.key for t in mr.TASKS], choices=[t.key for t in mr.TASKS])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--recipes", nargs="+", default=["old", "new"], choices=tuple(RECIPES))
    p.add_argument("--deterministic", nargs="*", default=["rni", "iap"])
    p.add_argument("--epochs", type=int, default=None, help="override the budget's epochs (default: make results')")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    configs = {c.name: c for c in mr.configs_for(mr.TASKS, seeds=1, out=Path("/tmp/unused"))}
    for key in args.tasks:
        config = configs[key]
        if args.epochs is not None:
            config.epochs = args.epochs
        for seed in args.seeds:
            data = _load_data(config, seed)
            builder = _builder(config, data)
            budget = config.budget()
            for name in args.deterministic:
                t0 = time.perf_counter()
                with pyro.get_param_store().scope():
                    seed_all(seed)
                    result = METHODS[name].run(builder, data, seed=seed, budget=budget, **config.method_options(name))
                print(json.dumps({"task": key, "seed": seed, "method": name, "unpruned": result.unpruned_accuracy,
                                  "stop": None if result.stop is None else result.stop.accuracy,
                                  "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
            for recipe in args.recipes:
                spec = RECIPES[recipe]
                b = dataclasses.replace(budget, lr=spec["lr"]) if spec["lr"] is not None else budget
                options = {m: {"fractions": [0.0], **spec["options"]} for m in ("bmrs_n", "bmrs_n_ref")}
                t0 = time.perf_counter()
                record = {"task": key, "seed": seed, "method": f"noise[{recipe}]"}
                for result in iter_noise_methods(["bmrs_n", "bmrs_n_ref"], builder, data, seed=seed, budget=b,
                                                 options=options):
                    record["unpruned"] = result.unpruned_accuracy
                    record[f"{result.method}_stop"] = result.stop.accuracy
                    record[f"{result.method}_stop_structures_removed"] = round(result.stop.structures_removed, 1)
                    record["fit_seconds"] = round(result.wall_time, 1)
                record["seconds"] = round(time.perf_counter() - t0, 1)
                print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
