"""One ``fit`` epoch against one epoch of a reference-style plain-PyTorch training loop.

The reference-style loop is written here the way the BMRS authors' public code trains (it is
not their code): float32 throughout, the same network with a learnable (loc, log scale) per
structure, one uniform draw per element of the (batch, structures) noise pushed through the
truncated normal's textbook inverse cdf, ``loc + scale * sqrt(2) * erfinv(2 p - 1)`` with
``p = Phi(alpha) + u (Phi(beta) - Phi(alpha))``, theta = exp of that, the textbook float32
entropy for the KL to the log-uniform prior, loss = mean cross-entropy + the layers' mean KL,
one ``torch.optim.Adam`` (PyTorch's default settings), ``loss.item()`` every step. It has none of
the library's tail handling: far-tail posteriors get a clamped, inexact sample there.

Configurations (the library's digits split, ``bmrs_pyro.data.load("digits")``, 1150 training
rows; the networks come from the model zoo, the reference copies their weights):

- ``mlp6x50``: 64 -> 6 hidden layers of 50 tanh units with noise -> 10, batch 32 (the
  authors' default network);
- ``mlp100``: 64-100-100-10 tanh, batch 128 (the library's default);
- ``lenet5``: the zoo's LeNet-5 on 8x8 digits (padding 2), batch 64.

Timing: one ``fit`` call per configuration whose callback runs one reference epoch after each
of ``fit``'s epochs, so the two alternate epoch by epoch under the same machine load. Our epoch
is the wall time from the end of one callback to the start of the next (all of ``fit``'s work
for that epoch: batching, progress bar, loss, backward, Adam); the first epoch of each side
(guide set-up, warm-up) is dropped. ``fit`` runs with its defaults (progress bar on, written to
stderr) and the CLI's learning rates (1e-2, guide 0.05), the reference with the same two rates.

Prints one JSON object: per configuration the median epoch seconds of ours and of the
reference, their ratio (ours / reference; < 1 means we are faster) and the per-epoch ratios'
median, plus the thread count and the load average. Never asserts on time.

    python benchmarks/svi_speed.py [--configs mlp6x50,mlp100,lenet5] [--epochs 13] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time

import pyro
import torch
import torch.nn.functional as F
from torch import nn

from bmrs_pyro import data as bmrs_data
from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import fit
from bmrs_pyro.models.registry import build
from bmrs_pyro.nn import MultiplicativeNoise

CONFIGS = {
    "mlp6x50": ("mlp", {"hidden": (50,) * 6, "activation": "tanh"}, 32),
    "mlp100": ("mlp", {"hidden": (100, 100), "activation": "tanh"}, 128),
    "lenet5": ("lenet5", {}, 64),
}
LR, GUIDE_LR = 1e-2, 0.05
SQRT2 = math.sqrt(2.0)
HALF_LOG_2PIE = 0.5 * math.log(2.0 * math.pi * math.e)


class ReferenceNoise(nn.Module):
    """A noise layer the way the reference code writes it: float32 textbook formulas."""

    def __init__(self, layer: MultiplicativeNoise, init_loc: float = 0.0, init_log_scale: float = -5.0):
        super().__init__()
        num = layer.num_structures
        self.channel_dim, self.low, self.high = layer.channel_dim, layer.low, layer.high
        self.loc = nn.Parameter(torch.full((num,), init_loc))
        self.log_scale = nn.Parameter(torch.full((num,), init_log_scale))
        self.kl = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.log_scale.clamp(-20.0, 5.0).exp()
        alpha = (self.low - self.loc) / scale
        beta = (self.high - self.loc) / scale
        cdf_a = 0.5 * (1.0 + torch.erf(alpha / SQRT2))
        cdf_b = 0.5 * (1.0 + torch.erf(beta / SQRT2))
        mass = cdf_b - cdf_a
        u = torch.rand(x.shape[0], self.loc.shape[0])
        p = cdf_a + u * mass
        eps = torch.finfo(p.dtype).eps
        z = self.loc + scale * SQRT2 * torch.erfinv((2.0 * p - 1.0).clamp(-1.0 + eps, 1.0 - eps))
        theta = z.clamp(self.low, self.high).exp()
        # KL(q || log-uniform) = log(high - low) - H[z], H the truncated normal's entropy.
        mass = mass.clamp(min=1e-30)
        pdf_a = torch.exp(-0.5 * alpha * alpha) / math.sqrt(2.0 * math.pi)
        pdf_b = torch.exp(-0.5 * beta * beta) / math.sqrt(2.0 * math.pi)
        entropy = torch.log(scale * mass) + HALF_LOG_2PIE + (alpha * pdf_a - beta * pdf_b) / (2.0 * mass)
        self.kl = math.log(self.high - self.low) - entropy
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        shape[self.channel_dim] = theta.shape[1]
        return x * theta.reshape(shape)


def reference_net(model: nn.Module) -> nn.Sequential:
    """A plain copy of the zoo model's backbone with every noise layer replaced."""
    net = copy.deepcopy(model.net)
    for i, module in enumerate(net):
        if isinstance(module, MultiplicativeNoise):
            net[i] = ReferenceNoise(module)
    return net


def reference_epoch(net, optimizer, x, y, batch_size, generator) -> None:
    """One epoch: mean cross-entropy + the layers' mean KL, one Adam step per batch."""
    noises = [m for m in net if isinstance(m, ReferenceNoise)]
    order = torch.randperm(x.shape[0], generator=generator)
    for start in range(0, x.shape[0], batch_size):
        idx = order[start : start + batch_size]
        optimizer.zero_grad()
        logits = net(x[idx])
        kl = sum(m.kl.mean() for m in noises) / len(noises)
        loss = F.cross_entropy(logits, y[idx]) + kl
        loss.backward()
        optimizer.step()
        loss.item()


def run_config(name: str, x, y, epochs: int, seed: int, progress: bool) -> dict:
    arch, options, batch_size = CONFIGS[name]
    pyro.clear_param_store()
    torch.manual_seed(seed)
    model = build(arch, tuple(x.shape[1:]), 10, **options)
    net = reference_net(model)
    noises = [m for m in net if isinstance(m, ReferenceNoise)]
    variational = {id(p) for m in noises for p in m.parameters()}
    ref_opt = torch.optim.Adam([
        {"params": [p for p in net.parameters() if id(p) not in variational], "lr": LR},
        {"params": [p for p in net.parameters() if id(p) in variational], "lr": GUIDE_LR},
    ])
    guide = AutoTruncatedLogNormal(model)
    generator = torch.Generator().manual_seed(seed)
    ours, reference = [], []
    mark = [time.perf_counter()]

    def alternate(epoch, history, model, guide):
        t0 = time.perf_counter()
        ours.append(t0 - mark[0])
        reference_epoch(net, ref_opt, x, y, batch_size, generator)
        t1 = time.perf_counter()
        reference.append(t1 - t0)
        mark[0] = time.perf_counter()

    fit(model, guide, (x, y), epochs=epochs, batch_size=batch_size, lr=LR, guide_lr=GUIDE_LR,
        seed=seed, callbacks=(alternate,), progress=progress)
    ours, reference = ours[1:], reference[1:]
    ratios = [a / b for a, b in zip(ours, reference)]
    ours_med, ref_med = statistics.median(ours), statistics.median(reference)
    return {
        "batch_size": batch_size,
        "steps_per_epoch": math.ceil(x.shape[0] / batch_size),
        "epochs_timed": len(ours),
        "ours_seconds_median": round(ours_med, 5),
        "reference_seconds_median": round(ref_med, 5),
        "ratio": round(ours_med / ref_med, 3),
        "ratio_per_epoch_median": round(statistics.median(ratios), 3),
        "ours_seconds": [round(t, 5) for t in ours],
        "reference_seconds": [round(t, 5) for t in reference],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--epochs", type=int, default=13, help="epochs per side (the first is dropped)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="run fit without its progress bar")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = bmrs_data.load("digits").train
    result = {"benchmark": "svi_epoch_vs_reference", "threads": args.threads, "n_train": x.shape[0],
              "progress_bar": not args.no_progress, "load_average": list(os.getloadavg()), "configs": {}}
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise SystemExit(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
        result["configs"][name] = run_config(name, x, y, args.epochs, args.seed, not args.no_progress)
    result["load_average_after"] = list(os.getloadavg())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
