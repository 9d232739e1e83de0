"""One training epoch of the Pyro model against a plain-PyTorch twin of the same network.

Both train the 64-100-100-10 tanh MLP with per-example multiplicative noise on scikit-learn
digits (training split), batch 128, Adam, the same initialisation and the same loss
-(N/B) sum log p(y|x, theta) + sum KL(q || p). Prints one JSON line with the median epoch time of
each and their ratio (Pyro / plain). Never asserts on time: the machines are shared.

    python benchmarks/svi_speed.py [--repeats 7] [--batch-size 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import pyro
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from bmrs_pyro.distributions import LogUniform, TruncatedLogNormal
from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import fit
from bmrs_pyro.nn import MultiplicativeNoise


class PyroMLP(pyro.nn.PyroModule):
    def __init__(self, sizes=(64, 100, 100, 10)):
        super().__init__()
        self.fc1 = torch.nn.Linear(sizes[0], sizes[1])
        self.noise1 = MultiplicativeNoise(sizes[1])
        self.fc2 = torch.nn.Linear(sizes[1], sizes[2])
        self.noise2 = MultiplicativeNoise(sizes[2])
        self.out = torch.nn.Linear(sizes[2], sizes[3])

    def forward(self, x, y=None):
        h = self.noise1(torch.tanh(self.fc1(x)))
        h = self.noise2(torch.tanh(self.fc2(h)))
        logits = self.out(h)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", pyro.distributions.Categorical(logits=logits), obs=y)
        return logits


class PlainMLP(torch.nn.Module):
    """The same network and loss written directly in PyTorch."""

    def __init__(self, pyro_model: PyroMLP, low=-20.0, high=0.0):
        super().__init__()
        self.fc1 = copy.deepcopy(pyro_model.fc1)
        self.fc2 = copy.deepcopy(pyro_model.fc2)
        self.out = copy.deepcopy(pyro_model.out)
        self.low, self.high = low, high
        self.locs = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(d)) for d in (100, 100)])
        self.log_scales = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.full((d,), -5.0)) for d in (100, 100)]
        )

    def q(self, i):
        scale = self.log_scales[i].clamp(-20, 5).exp()
        return TruncatedLogNormal(self.locs[i], scale, self.low, self.high)

    def loss(self, x, y, n):
        b = x.shape[0]
        kl = 0.0
        h = torch.tanh(self.fc1(x))
        for i, fc in enumerate((None, self.fc2)):
            if fc is not None:
                h = torch.tanh(fc(h))
            q = self.q(i)
            h = h * q.expand((b, q.batch_shape[0])).rsample()
            kl = kl + torch.distributions.kl_divergence(q, LogUniform(self.low, self.high)).sum()
        nll = F.cross_entropy(self.out(h), y, reduction="sum")
        return (n / b) * nll + kl


def time_pyro(x, y, batch_size, epochs, seed):
    """Per-epoch wall times of ``fit`` (the first epoch also builds the guide)."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    model = PyroMLP()
    plain_init = copy.deepcopy(model)
    guide = AutoTruncatedLogNormal(model)
    history = fit(model, guide, (x, y), epochs=epochs, batch_size=batch_size, lr=1e-3, seed=seed,
                  progress=False)
    return history.seconds, plain_init


def time_plain(init, x, y, batch_size, epochs, seed):
    torch.manual_seed(seed)
    net = PlainMLP(init)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = net.loss(x[idx], y[idx], n)
            loss.backward()
            opt.step()
            loss.item()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=9, help="epochs timed per run (first dropped)")
    parser.add_argument("--runs", type=int, default=3, help="alternating runs of each")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)[:1437]
    y = torch.tensor(digits.target)[:1437]
    pyro_times, plain_times = [], []
    for r in range(args.runs):  # alternate so that machine load hits both alike
        tp, init = time_pyro(x, y, args.batch_size, args.epochs, seed=r)
        tt = time_plain(init, x, y, args.batch_size, args.epochs, seed=r)
        pyro_times += tp[1:]
        plain_times += tt[1:]
    pyro_med, plain_med = statistics.median(pyro_times), statistics.median(plain_times)
    print(json.dumps({
        "benchmark": "svi_epoch", "n_train": x.shape[0], "batch_size": args.batch_size,
        "threads": args.threads, "epochs_timed": len(pyro_times),
        "pyro_seconds_median": round(pyro_med, 5), "plain_seconds_median": round(plain_med, 5),
        "ratio": round(pyro_med / plain_med, 3),
        "steps_per_epoch": math.ceil(x.shape[0] / args.batch_size),
    }))


if __name__ == "__main__":
    main()
