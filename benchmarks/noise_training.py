"""Why the SVI-trained noise networks lose accuracy against their deterministic twins (issue 11).

Trains, on one task (default MNIST-1D, MLP 40-100-100-10 tanh, batch 64, the ``make results``
budget of 80 epochs), the deterministic twin of the noise MLP (noise layers ``"off"``, theta = 1,
the mean cross-entropy by Adam, as the deterministic baselines train) and the noise MLP by
:func:`bmrs_pyro.fit` under a list of variants, each changing one thing from the setting the
noise criteria of ``make results`` used before the fix (lr 1e-3, guide_lr 0.05, kl_weight 1,
per-example noise, posterior init loc 0 / scale e^-5, constant learning rate, SVI from the start):

    base, lr3e-3, lr1e-2, guide_lr1e-2, guide_lr=lr, global_noise, init_scale_e-8, init_loc-2,
    kl0.1, kl0, cosine (cosine decay of every learning rate to 0), epochs_x2, warm25/50/75 (% of
    the epochs trained deterministically first, ``fit(warm_start_epochs=...)``), combinations, and
    the chosen recipe (``recipe``: a warm start of ``WARM_START_FRACTION`` = 25 % of the
    epochs and the weights' learning-rate anneal over the last ``ANNEAL_FRACTION`` = 10 %,
    everything else as before; ``warm25`` is the recipe without the anneal, ``anneal10`` the
    anneal alone). ``--norm batch`` puts a BatchNorm before each activation (the ``make results``
    networks).

Every run prints one JSON line: the variant, seed, final train / validation / test accuracy
(noise networks: E_q[theta] * mask, ``evaluate(mode="mean")``), the epochs and wall seconds; with
``--curves`` also the per-epoch train and validation accuracy. Nothing here asserts on time.

    python benchmarks/noise_training.py --quick           # ~1 min: few variants, 12 epochs
    python benchmarks/noise_training.py --seeds 0 1 --curves
    python benchmarks/noise_training.py --variants det base recipe --data digits
    python benchmarks/noise_training.py --norm batch --variants det recipe warm25 --curves
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyro  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bmrs_pyro.data import load  # noqa: E402
from bmrs_pyro.guides import AutoTruncatedLogNormal  # noqa: E402
from bmrs_pyro.infer import (ANNEAL_FRACTION, WARM_START_FRACTION, anneal_epochs_for, evaluate, fit,  # noqa: E402
                             warm_start_epochs_for)
from bmrs_pyro.models import build  # noqa: E402
from bmrs_pyro.nn import noise_mode  # noqa: E402

#: The setting the noise criteria trained with before issue 11.
BASE = {"lr": 1e-3, "guide_lr": 0.05, "kl_weight": 1.0, "noise": "example", "init_loc": 0.0,
        "init_scale": math.exp(-5.0), "schedule": "constant", "epochs_factor": 1.0, "warm": 0.0, "anneal": 0.0}

#: Each variant: the changes from BASE. "det*" variants train the deterministic twin instead.
VARIANTS = {
    "det": {"lr": 3e-3},  # what IAP/AIAP/ILP/RNI use (budget.lr_or(3e-3))
    "det_lr1e-3": {"lr": 1e-3},
    "base": {},
    "lr3e-3": {"lr": 3e-3},
    "lr1e-2": {"lr": 1e-2},
    "guide_lr1e-2": {"guide_lr": 1e-2},
    "guide_lr=lr": {"guide_lr": 1e-3},
    "global_noise": {"noise": "global"},
    "init_scale_e-8": {"init_scale": math.exp(-8.0)},
    "init_loc-2": {"init_loc": -2.0},
    "kl0.1": {"kl_weight": 0.1},
    "kl0": {"kl_weight": 0.0},
    "cosine": {"schedule": "cosine"},
    "epochs_x2": {"epochs_factor": 2.0},
    "warm25": {"warm": 0.25},
    "warm50": {"warm": 0.5},
    "warm75": {"warm": 0.75},
    "lr3e-3_cosine": {"lr": 3e-3, "schedule": "cosine"},
    "lr3e-3_kl0": {"lr": 3e-3, "kl_weight": 0.0},
    "warm50_lr3e-3": {"warm": 0.5, "lr": 3e-3},
    "warm50_lr3e-3_cosine": {"warm": 0.5, "lr": 3e-3, "schedule": "cosine"},
    "warm50_cosine": {"warm": 0.5, "schedule": "cosine"},
    "warm50_guide_lr1e-2": {"warm": 0.5, "guide_lr": 1e-2},
    "warm50_lr3e-3_guide_lr1e-2": {"warm": 0.5, "lr": 3e-3, "guide_lr": 1e-2},
    "warm50_lr3e-3_cosine_guide_lr1e-2": {"warm": 0.5, "lr": 3e-3, "schedule": "cosine", "guide_lr": 1e-2},
    "anneal10": {"anneal": ANNEAL_FRACTION},
    # the chosen recipe: the warm start and the anneal of fit, nothing else changed
    "recipe": {"warm": WARM_START_FRACTION, "anneal": ANNEAL_FRACTION},
}
QUICK = ("det", "det_lr1e-3", "base", "kl0.1", "recipe")


def task(name: str, model: str = "mlp", norm: str = "none"):
    """Data splits and a builder of the task's noise network (MLP hidden 100-100 tanh, teacher-student
    100; or the zoo's LeNet-5), with ``norm`` as the zoo takes it."""
    options = {"num_samples": 8000} if name == "teacher_student" else {}
    splits = load(name, **options)
    if model != "mlp":
        def build_zoo(noise: str = "example"):
            return build(model, input_shape=splits.input_shape, num_classes=splits.num_classes, noise=noise,
                         norm=norm)
        return splits, build_zoo
    hidden = (100,) if name == "teacher_student" else (100, 100)
    in_dim = int(torch.tensor(splits.input_shape).prod())

    def builder(noise: str = "example"):
        from bmrs_pyro.models import mlp
        return mlp(in_dim, splits.num_classes, hidden=hidden, noise=noise, norm=norm)

    return splits, builder


def _accuracy_off(model, data) -> float:
    x, y = data
    was_training = model.training
    model.eval()  # BatchNorm: running statistics, and leave them untouched
    try:
        with torch.no_grad(), noise_mode(model, "off"):
            return float((model.logits(x).argmax(-1) == y).float().mean())
    finally:
        model.train(was_training)


def _set_lr(optimizer, base_lrs, factor: float) -> None:
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor


def _cosine(epoch: int, epochs: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def run_deterministic(splits, builder, cfg: dict, epochs: int, batch_size: int, seed: int, curves: bool) -> dict:
    """The deterministic twin: theta = 1, mean cross-entropy, Adam at cfg['lr'] (as the baselines train)."""
    pyro.set_rng_seed(seed)
    model = builder()
    x, y = splits.train
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    generator = torch.Generator().manual_seed(seed)
    train_curve, val_curve = [], []
    with noise_mode(model, "off"):
        for epoch in range(epochs):
            if cfg["schedule"] == "cosine":
                _set_lr(optimizer, [cfg["lr"]], _cosine(epoch, epochs))
            order = torch.randperm(x.shape[0], generator=generator)
            for start in range(0, x.shape[0], batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(model.logits(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if curves:
                train_curve.append(_accuracy_off(model, splits.train))
                val_curve.append(_accuracy_off(model, splits.val))
    out = {"train": _accuracy_off(model, splits.train), "val": _accuracy_off(model, splits.val),
           "test": _accuracy_off(model, splits.test)}
    if curves:
        out.update(train_curve=train_curve, val_curve=val_curve)
    return out


def run_noise(splits, builder, cfg: dict, epochs: int, batch_size: int, seed: int, curves: bool) -> dict:
    """The noise MLP by fit(), E_q[theta] * mask at test time."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = builder(cfg["noise"])
    guide = AutoTruncatedLogNormal(model, init_loc=cfg["init_loc"], init_scale=cfg["init_scale"])
    with torch.no_grad():
        guide(splits.train[0][:2])
    groups = [{"params": list(model.parameters()), "lr": cfg["lr"]},
              {"params": list(guide.parameters()), "lr": cfg["guide_lr"]}]
    optimizer = torch.optim.Adam(groups)
    base_lrs = [g["lr"] for g in groups]
    warm = warm_start_epochs_for(epochs, cfg["warm"])
    train_curve, val_curve = [], []

    def callback(epoch, history, model, guide):
        if cfg["schedule"] == "cosine":  # the factor for the next epoch
            _set_lr(optimizer, base_lrs, _cosine(epoch + 1, epochs))
        if curves:
            if epoch < warm:
                train_curve.append(_accuracy_off(model, splits.train))
                val_curve.append(_accuracy_off(model, splits.val))
            else:
                train_curve.append(evaluate(model, guide, splits.train)["accuracy"])
                val_curve.append(evaluate(model, guide, splits.val)["accuracy"])
        return False

    fit(model, guide, splits.train, epochs=epochs, batch_size=batch_size, lr=cfg["lr"], guide_lr=cfg["guide_lr"],
        kl_weight=cfg["kl_weight"], seed=seed, progress=False, optimizer=optimizer, callbacks=(callback,),
        warm_start_epochs=warm, anneal_epochs=min(anneal_epochs_for(epochs, cfg["anneal"]), epochs - warm))
    out = {"train": evaluate(model, guide, splits.train)["accuracy"], "val": evaluate(model, guide, splits.val)["accuracy"],
           "test": evaluate(model, guide, splits.test)["accuracy"], "warm_start_epochs": warm}
    # Where the posteriors of log theta ended: median loc and scale over all structures.
    locs = torch.cat([_param(guide.locs, s) for s in guide.site_names])
    log_scales = torch.cat([_param(guide.log_scales, s) for s in guide.site_names])
    out.update(median_loc=round(float(locs.median()), 3), median_scale=round(float(log_scales.exp().median()), 4))
    if curves:
        out.update(train_curve=train_curve, val_curve=val_curve)
    return out


def _param(store, site: str) -> torch.Tensor:
    from bmrs_pyro.guides import deep_getattr
    return deep_getattr(store, site).detach().flatten()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist1d", choices=("mnist1d", "digits", "teacher_student"))
    p.add_argument("--model", default="mlp", choices=("mlp", "lenet5"))
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--norm", default="none", choices=("none", "batch"), help="the zoo's norm option")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=None, choices=tuple(VARIANTS))
    p.add_argument("--curves", action="store_true", help="also print per-epoch train/val accuracy")
    p.add_argument("--quick", action="store_true", help=f"variants {QUICK}, 12 epochs, one seed (~1 min)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    variants = args.variants or (list(QUICK) if args.quick else list(VARIANTS))
    epochs = 12 if args.quick else args.epochs
    splits, builder = task(args.data, args.model, args.norm)
    for seed in args.seeds:
        for name in variants:
            cfg = dict(BASE, **VARIANTS[name])
            n_epochs = int(round(epochs * cfg["epochs_factor"]))
            t0 = time.perf_counter()
            runner = run_deterministic if name.startswith("det") else run_noise
            out = runner(splits, builder, cfg, n_epochs, args.batch_size, seed, args.curves)
            record = {"data": args.data, "model": args.model, "norm": args.norm, "variant": name, "seed": seed, "epochs": n_epochs,
                      **{k: v for k, v in cfg.items() if k != "epochs_factor"}, **out,
                      "seconds": round(time.perf_counter() - t0, 2)}
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
