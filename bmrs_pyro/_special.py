"""Numerically careful special functions, written once and reused.

Everything the truncated distributions and the model reduction need reduces to the log of a
difference of standard normal cdfs, ``log(Phi(hi) - Phi(lo))``, and to ratios of the normal pdf
to such differences. Forming ``Phi(hi) - Phi(lo)`` directly underflows (both ~0) or cancels
(both ~1) in the tails, so we work with ``log_ndtr`` and, where both arguments lie in the same
tail, with ``erfcx`` (the scaled complementary error function), which keeps the ratio of two
tiny cdfs exact without forming either of them.
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
SQRT_HALF = math.sqrt(0.5)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def log_ndtr(x: torch.Tensor) -> torch.Tensor:
    """log Phi(x), accurate in both tails."""
    return torch.special.log_ndtr(x)


def log_normal_pdf(x: torch.Tensor) -> torch.Tensor:
    """log phi(x) for the standard normal."""
    return -0.5 * x * x - LOG_SQRT_2PI


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0 (Maechler's two-branch rule)."""
    return torch.where(
        x > -math.log(2.0),
        torch.log(-torch.expm1(x)),
        torch.log1p(-torch.exp(x)),
    )


def log_erfcx_ratio_lower(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(lo) / Phi(hi)) for lo <= hi <= 0, without forming either cdf.

    Phi(x) = erfcx(-x / sqrt 2) exp(-x^2 / 2) / 2 for x <= 0, so the ratio is
    erfcx(-lo/sqrt2) / erfcx(-hi/sqrt2) * exp(-(lo - hi)(lo + hi) / 2): the quadratic terms are
    combined as a product, which does not cancel even when |lo|, |hi| ~ 1e9.
    """
    return (
        torch.log(torch.special.erfcx(-lo * SQRT_HALF))
        - torch.log(torch.special.erfcx(-hi * SQRT_HALF))
        - 0.5 * (lo - hi) * (lo + hi)
    )


def log_diff_ndtr(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable for all real arguments.

    Both in the upper tail: use the symmetry Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi).
    Both in the lower tail (after the flip): log Phi(hi) + log(1 - Phi(lo)/Phi(hi)), the ratio
    taken through erfcx. Straddling zero: the mass is at least that of one side, and
    ``1 - Phi(lo) - Phi(-hi)`` is formed with log1p so that a result near 1 keeps its digits.
    """
    lo, hi = torch.broadcast_tensors(torch.as_tensor(lo), torch.as_tensor(hi))
    flip = lo > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    # Same-sign branch (b <= 0). Clamp b so that the unused branch stays finite.
    b_neg = torch.clamp(b, max=0.0)
    a_neg = torch.minimum(a, b_neg)
    same = log_ndtr(b_neg) + log1mexp(torch.clamp(log_erfcx_ratio_lower(a_neg, b_neg), max=0.0))
    # Straddling branch (a < 0 < b).
    tails = torch.special.ndtr(a) + torch.special.ndtr(-b)
    straddle = torch.where(
        tails < 0.5,
        torch.log1p(-tails),
        torch.log(torch.special.ndtr(b) - torch.special.ndtr(a)),
    )
    return torch.where(b <= 0, same, straddle)


def mills_ratio(x: torch.Tensor) -> torch.Tensor:
    """phi(x) / Phi(x), exact for x <= 0 (and accurate up to x ~ 25)."""
    return SQRT_2_OVER_PI / torch.special.erfcx(-x * SQRT_HALF)
