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

import numpy as np
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
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable for all real arguments (and its gradient).

    Both in the upper tail: use the symmetry Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi).
    Both in the lower tail (after the flip): log Phi(hi) + log(1 - Phi(lo)/Phi(hi)), the log
    ratio taken in offset form (``log_ndtr_ratio_offset``), which stays exact for short
    intervals and for arguments ~1e10. Straddling zero: ``log1p(-Phi(lo) - Phi(-hi))`` when
    the mass is large (keeps the digits of a result near 1), else the sum of two erf terms of
    the same sign (no subtraction, so a short interval around 0 keeps its digits).
    Every branch gets inputs that are valid for it, so unused branches never put NaN into
    gradients.
    """
    lo, hi = torch.broadcast_tensors(torch.as_tensor(lo), torch.as_tensor(hi))
    flip = lo > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    same_side = b <= 0
    # Same-sign branch (b <= 0): x = -b >= 0, offset w = b - a >= 0.
    b_neg = torch.where(same_side, b, -1.0)
    w = torch.where(same_side, b - a, 1.0)
    same = log_ndtr(b_neg) + log1mexp_safe(log_ndtr_ratio_offset(-b_neg, w))
    # Straddling branch (a < 0 < b).
    a_s = torch.where(same_side, -1.0, a)
    b_s = torch.where(same_side, 1.0, b)
    tails = torch.special.ndtr(a_s) + torch.special.ndtr(-b_s)
    wide = tails < 0.5
    tails_w = torch.where(wide, tails, 0.25)
    erf_sum = torch.special.erf(b_s * SQRT_HALF) + torch.special.erf(-a_s * SQRT_HALF)
    erf_sum = torch.where(wide, 1.0, erf_sum)
    straddle = torch.where(wide, torch.log1p(-tails_w), torch.log(0.5 * erf_sum))
    return torch.where(same_side, same, straddle)


def mills_ratio(x: torch.Tensor) -> torch.Tensor:
    """phi(x) / Phi(x), exact for x <= 0 (and accurate up to x ~ 25)."""
    return SQRT_2_OVER_PI / torch.special.erfcx(-x * SQRT_HALF)


# --------------------------------------------------------------------------------------------
# Upper-tail helpers in the offset form used by the truncated distributions.
#
# For y >= 0 the quantities phi(y) / Phi(-y) ~ y and log Phi(-y) ~ -y^2 / 2 are huge when y is
# (up to ~1e10 on the project's grid), and everything the distributions need is a small
# difference of them. We therefore compute the small parts directly:
#   g(y) = phi(y) / Phi(-y) - y           (Mills-ratio gap, ~ 1/y)
#   u(y) = 1 - y g(y)                     (~ 2/y^2)
#   Lambda(y) = log Phi(-y) + y^2 / 2     (~ -log y)
# For y >= _CF_SWITCH they come from Laplace's continued fraction
#   Phi(-y) / phi(y) = 1 / (y + 1 / (y + 2 / (y + 3 / (y + ...)))),
# so g = 1 / (y + t) and u = t g with t = 2 / (y + 3 / (y + ...)): no subtraction of large
# numbers anywhere, and autograd through it is stable too (torch's own erfcx backward forms
# y - sqrt(2/pi)/erfcx(y/sqrt2) and loses every digit at large y).
# --------------------------------------------------------------------------------------------

_CF_SWITCH = 4.0
_CF_DEPTH = 40  # relative error < 1e-16 for y >= 4 (checked against mpmath in the tests)
_NEG_SWITCH = -5.0  # below this erfcx(-y/sqrt2) approaches overflow; use the log form

# 8-point Gauss-Legendre rule on [0, 1] (nodes, weights), for smooth averages over short ranges.
_GL8_NODES, _GL8_WEIGHTS = (
    tuple(float(v) for v in arr)
    for arr in ((lambda n, w: ((n + 1.0) / 2.0, w / 2.0))(*np.polynomial.legendre.leggauss(8)))
)


def mills_gap_and_u(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(g, u)`` with g(y) = phi(y)/Phi(-y) - y and u(y) = 1 - y g(y), for any real y.

    Both are positive. For large y they are ~1/y and ~2/y^2 and are evaluated without
    cancellation (continued fraction); elsewhere directly through erfcx or log_ndtr.
    """
    y = torch.as_tensor(y)
    # Continued-fraction branch on y >= 4 (inputs clamped so the unused branch stays finite and
    # its gradient is zero rather than NaN).
    yc = torch.clamp(y, min=_CF_SWITCH)
    t = torch.zeros_like(yc)
    for k in range(_CF_DEPTH, 1, -1):
        t = k / (yc + t)
    g_cf = 1.0 / (yc + t)
    u_cf = t * g_cf
    # Moderate branch: r = phi(y)/Phi(-y) = sqrt(2/pi) / erfcx(y/sqrt2).
    ym = torch.clamp(y, min=_NEG_SWITCH, max=_CF_SWITCH)
    r_m = SQRT_2_OVER_PI / torch.special.erfcx(ym * SQRT_HALF)
    # Very negative branch: r = exp(log phi(y) - log Phi(-y)), with Phi(-y) ~ 1.
    yn = torch.clamp(y, max=_NEG_SWITCH)
    r_n = torch.exp(log_normal_pdf(yn) - log_ndtr(-yn))
    r = torch.where(y < _NEG_SWITCH, r_n, r_m)
    g_d = r - torch.where(y < _NEG_SWITCH, yn, ym)
    u_d = 1.0 - torch.where(y < _NEG_SWITCH, yn, ym) * g_d
    big = y >= _CF_SWITCH
    return torch.where(big, g_cf, g_d), torch.where(big, u_cf, u_d)


def mills_gap(y: torch.Tensor) -> torch.Tensor:
    """g(y) = phi(y)/Phi(-y) - y (the hazard of the normal minus y), accurate for all y."""
    return mills_gap_and_u(y)[0]


def log_ndtr_upper_scaled(y: torch.Tensor) -> torch.Tensor:
    """Lambda(y) = log Phi(-y) + y^2/2, accurate for all real y (O(log y) for large y).

    For y >= 4 it is -log(y + g(y)) - log sqrt(2 pi), whose gradient -(1 + g')/(y + g) = -g(y)
    autograd evaluates without cancellation.
    """
    y = torch.as_tensor(y)
    yc = torch.clamp(y, min=_CF_SWITCH)
    g = mills_gap(yc)
    big_branch = -torch.log(yc) - torch.log1p(g / yc) - LOG_SQRT_2PI
    ys = torch.clamp(y, max=_CF_SWITCH)
    small_branch = log_ndtr(-ys) + 0.5 * ys * ys
    return torch.where(y >= _CF_SWITCH, big_branch, small_branch)


def log_ndtr_ratio_offset(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F(v; x) = log(Phi(-x - v) / Phi(-x)) for v >= 0 and x >= -1 (valid, less sharp, below).

    This is the log survival of the normal tail beyond x, at offset v. For v <= 1 it is written
    as the product -v (x + v/2 + mean of g over [x, x+v]) (the mean by 8-point Gauss-Legendre),
    so that it keeps full relative accuracy even when v is tiny and x ~ 1e10; for v > 1 it is
    Lambda(x+v) - Lambda(x) - v (x + v/2), whose magnitude is then large enough that absolute
    rounding of the Lambda terms does not matter.
    """
    x, v = torch.broadcast_tensors(torch.as_tensor(x), torch.as_tensor(v))
    vs = torch.clamp(v, max=1.0)
    gbar = torch.zeros_like(vs)
    for node, weight in zip(_GL8_NODES, _GL8_WEIGHTS):
        gbar = gbar + weight * mills_gap(x + node * vs)
    short = -vs * (x + 0.5 * vs + gbar)
    vl = torch.clamp(v, min=1.0)
    long = log_ndtr_upper_scaled(x + vl) - log_ndtr_upper_scaled(x) - vl * (x + 0.5 * vl)
    return torch.where(v <= 1.0, short, long)


def log1mexp_safe(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 whose gradient is finite wherever the value is."""
    return log1mexp(torch.clamp(x, max=-1e-300))
