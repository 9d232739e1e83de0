"""Fraction of non-finite values of the textbook formulas vs bmrs_pyro.distributions.

The "naive" column evaluates the formulas of docs/design.md literally, as the public reference code does:
Z = Phi(beta) - Phi(alpha) with plain cdf differences, in float32. The grid is the project's
loc in [low-5, high+5] x log scale in [-20, 5] with low=-20, high=0 (1001 x 1001 by default).
Prints JSON. Usage: python benchmarks/naive_numerics.py [n]
"""

from __future__ import annotations

import json
import math
import sys

import torch

from bmrs_pyro.distributions import LogUniform, TruncatedLogNormal


def naive(loc: torch.Tensor, scale: torch.Tensor, low: float, high: float) -> dict[str, torch.Tensor]:
    """The closed forms exactly as written, with torch.special.ndtr differences."""
    phi = lambda x: torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = torch.special.ndtr
    alpha, beta = (low - loc) / scale, (high - loc) / scale
    z = cdf(beta) - cdf(alpha)
    kl = (
        math.log(high - low) - torch.log(scale) - torch.log(z) - 0.5 * math.log(2 * math.pi * math.e)
        - (alpha * phi(alpha) - beta * phi(beta)) / (2 * z)
    )
    e1 = torch.exp(loc + scale**2 / 2) * (cdf(beta - scale) - cdf(alpha - scale)) / z
    e2 = torch.exp(2 * loc + 2 * scale**2) * (cdf(beta - 2 * scale) - cdf(alpha - 2 * scale)) / z
    snr = e1 / torch.sqrt(e2 - e1**2)
    return {"kl": kl, "e_theta": e1, "snr": snr}


def main(n: int = 1001, low: float = -20.0, high: float = 0.0) -> dict:
    torch.set_num_threads(1)
    loc = torch.linspace(low - 5.0, high + 5.0, n)
    log_scale = torch.linspace(-20.0, 5.0, n)
    loc, log_scale = torch.meshgrid(loc, log_scale, indexing="ij")
    scale = log_scale.exp()
    def fraction(value: torch.Tensor) -> float:
        return round(float((~torch.isfinite(value)).float().mean()), 4)

    result: dict = {"grid": f"{n}x{n}", "dtype": "float32"}
    result["naive_nonfinite_fraction"] = {k: fraction(v) for k, v in naive(loc, scale, low, high).items()}
    result["naive_float64_nonfinite_fraction"] = {
        k: fraction(v) for k, v in naive(loc.double(), scale.double(), low, high).items()
    }
    q = TruncatedLogNormal(loc, scale, low, high)
    ours = {
        "kl": torch.distributions.kl_divergence(q, LogUniform(low, high)),
        "e_theta": q.mean,
        "snr": q.signal_to_noise,
    }
    result["ours_nonfinite_fraction"] = {k: fraction(v) for k, v in ours.items()}
    return result


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1001), indent=2))
