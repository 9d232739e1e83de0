"""Numerically careful special functions, written once and reused.

Everything the truncated distributions and the model reduction need reduces to the log of a
difference of standard normal cdfs, ``log(Phi(hi) - Phi(lo))``, and to ratios of the normal pdf
to such differences. Forming ``Phi(hi) - Phi(lo)`` directly underflows (both ~0) or cancels
(both ~1) in the tails, so we work with ``log_ndtr`` and, where both arguments lie in the same
tail, with ``erfcx`` (the scaled complementary error function), which keeps the ratio of two
tiny cdfs exact without forming either of them.

Far in a tail (arguments up to ~1e10 on the project's grid) the distributions need the *small*
parts that remain after huge terms cancel; these are computed directly: the Mills-ratio gap
``mills_gap_and_u`` (continued fraction), ``log_ndtr_upper_scaled`` = log Phi(-y) + y^2/2, and
``log_ndtr_ratio_offset`` = log(Phi(-x-v)/Phi(-x)), exact for tiny offsets v. ``masked_apply`` /
``where_apply`` evaluate a branch only on its own elements, so an unused branch never puts
inf/NaN into gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
SQRT_HALF = math.sqrt(0.5)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def log_ndtr(x: torch.Tensor) -> torch.Tensor:
    """log Phi(x), accurate in both tails."""
    return torch.special.log_ndtr(x)


def ndtr(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) = erfc(-x/sqrt2)/2, with full relative accuracy in the lower tail.

    ``torch.special.ndtr`` forms (1 + erf(x/sqrt2))/2, which loses relative accuracy for x < 0
    and returns 0 already at x = -8.9 (true value 2.8e-19); erfc keeps the lower tail exact,
    and near 1 it is as exact as a double near 1 can be.
    """
    return 0.5 * torch.special.erfc(-torch.as_tensor(x) * SQRT_HALF)


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
    return where_apply(same_side, _log_diff_same_side, _log_diff_straddle, a, b)


def _log_diff_same_side(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a <= b <= 0: log Phi(b) + log(1 - Phi(a)/Phi(b)), the ratio in offset form.
    return log_ndtr(b) + log1mexp_safe(log_ndtr_ratio_offset(-b, b - a))


def _log_diff_straddle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a < 0 < b.
    tails = ndtr(a) + ndtr(-b)
    wide = tails < 0.5
    tails_w = torch.where(wide, tails, 0.25)
    erf_sum = torch.special.erf(b * SQRT_HALF) + torch.special.erf(-a * SQRT_HALF)
    erf_sum = torch.where(wide, 1.0, erf_sum)
    return torch.where(wide, torch.log1p(-tails_w), torch.log(0.5 * erf_sum))


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

_CF_SWITCH = 6.0
# (smallest argument, depth): relative truncation error < 2e-16 (checked against mpmath).
_CF_DEPTHS = ((30.0, 8), (15.0, 12), (10.0, 16), (_CF_SWITCH, 24))
_NEG_SWITCH = -5.0  # below this erfcx(-y/sqrt2) approaches overflow; use the log form

# Gauss-Legendre rules on [0, 1] for the mean of g over [x, x + v] in the short form of
# log_ndtr_ratio_offset. There v (x + v/2) <= 1, so for larger x the interval is shorter
# relative to g's scale of variation and fewer points reach 1e-16 (checked against mpmath):
# (smallest x, number of points).
_GL_RULES = ((30.0, 3), (6.0, 4), (-math.inf, 8))
_GL = {
    n: (tuple(float(t) for t in (nodes + 1.0) / 2.0), tuple(float(w) for w in weights / 2.0))
    for n, (nodes, weights) in ((n, np.polynomial.legendre.leggauss(n)) for _, n in _GL_RULES)
}


def masked_apply(
    mask: torch.Tensor,
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    *args: torch.Tensor,
    fill: float = 0.0,
    n_out: int = 1,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Evaluate ``fn`` only on the elements where ``mask`` holds; ``fill`` elsewhere.

    ``args`` must broadcast to ``mask.shape``; ``fn`` returns one tensor, or ``n_out`` of them.
    Compared with evaluating every branch everywhere and selecting with ``torch.where``, a
    branch never sees inputs outside its domain (so it cannot put inf/NaN into gradients), no
    work is spent on discarded values, and an empty branch costs nothing.
    """
    shape = mask.shape
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    ref = torch.as_tensor(args[0])
    if idx.numel() == 0:
        outs = [torch.full(shape, fill, dtype=ref.dtype, device=ref.device) for _ in range(n_out)]
        return outs[0] if n_out == 1 else tuple(outs)
    if idx.numel() == mask.numel():  # every element: no gather/scatter needed
        outs = fn(*(torch.as_tensor(a).expand(shape) for a in args))
        if isinstance(outs, torch.Tensor):
            return outs
        return tuple(outs)
    sub = [torch.as_tensor(a).expand(shape).reshape(-1)[idx] for a in args]
    outs = fn(*sub)
    single = isinstance(outs, torch.Tensor)
    if single != (n_out == 1) or (not single and len(outs) != n_out):
        raise TypeError(f"masked_apply: {fn.__name__} must return {n_out} tensor(s)")
    results = []
    for out in (outs,) if single else outs:
        full = torch.full((mask.numel(),), fill, dtype=out.dtype, device=out.device)
        results.append(full.index_put((idx,), out).reshape(shape))
    return results[0] if single else tuple(results)


def where_apply(
    mask: torch.Tensor,
    fn_true: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    fn_false: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    *args: torch.Tensor,
    n_out: int = 1,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``fn_true`` where ``mask`` holds and ``fn_false`` elsewhere, each on its own elements.

    When one branch covers every element it is called directly (no gather, scatter or select).
    """
    args = torch.broadcast_tensors(*(torch.as_tensor(a) for a in args))
    mask = mask.expand(args[0].shape)
    if bool(mask.all()):
        return fn_true(*args)
    if not bool(mask.any()):
        return fn_false(*args)
    outs_t = masked_apply(mask, fn_true, *args, n_out=n_out, fill=0.5)
    outs_f = masked_apply(~mask, fn_false, *args, n_out=n_out, fill=0.5)
    if n_out == 1:
        return torch.where(mask, outs_t, outs_f)
    return tuple(torch.where(mask, t, f) for t, f in zip(outs_t, outs_f))


def _gap_cf(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The continued fraction converges faster for larger y: pick the depth from the smallest
    # argument (depths checked against mpmath in the tests).
    y_min = float(y.detach().min()) if y.numel() else _CF_SWITCH
    depth = next(n for bound, n in _CF_DEPTHS if y_min >= bound)
    t = torch.zeros_like(y)
    for k in range(depth, 1, -1):
        t = torch.reciprocal(y + t) * float(k)
    g = torch.reciprocal(y + t)
    return g, t * g


def _gap_moderate(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # r = phi(y)/Phi(-y) = sqrt(2/pi) / erfcx(y/sqrt2); mild cancellation in r - y for y < 6.
    g = SQRT_2_OVER_PI / torch.special.erfcx(y * SQRT_HALF) - y
    return g, 1.0 - y * g


def _gap_negative(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # erfcx(-y/sqrt2) would overflow; Phi(-y) ~ 1 so the log form is exact.
    g = torch.exp(log_normal_pdf(y) - log_ndtr(-y)) - y
    return g, 1.0 - y * g


def mills_gap_and_u(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(g, u)`` with g(y) = phi(y)/Phi(-y) - y and u(y) = 1 - y g(y), for any real y.

    Both are positive. For large y they are ~1/y and ~2/y^2 and are evaluated without
    cancellation (continued fraction); elsewhere directly through erfcx or log_ndtr.
    """
    y = torch.as_tensor(y)
    big = y >= _CF_SWITCH

    def rest(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return where_apply(y < _NEG_SWITCH, _gap_negative, _gap_moderate, y, n_out=2)

    return where_apply(big, _gap_cf, rest, y, n_out=2)


def mills_gap(y: torch.Tensor) -> torch.Tensor:
    """g(y) = phi(y)/Phi(-y) - y (the hazard of the normal minus y), accurate for all y."""
    return mills_gap_and_u(y)[0]


def _lambda_big(y: torch.Tensor) -> torch.Tensor:
    return -torch.log(y) - torch.log1p(_gap_cf(y)[0] / y) - LOG_SQRT_2PI


def _lambda_small(y: torch.Tensor) -> torch.Tensor:
    return log_ndtr(-y) + 0.5 * y * y


def log_ndtr_upper_scaled(y: torch.Tensor) -> torch.Tensor:
    """Lambda(y) = log Phi(-y) + y^2/2, accurate for all real y (O(log y) for large y).

    For y >= 6 it is -log(y + g(y)) - log sqrt(2 pi), whose gradient -(1 + g')/(y + g) = -g(y)
    autograd evaluates without cancellation.
    """
    y = torch.as_tensor(y)
    big = y >= _CF_SWITCH
    return where_apply(big, _lambda_big, _lambda_small, y)


def _offset_short(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    x_min = float(x.detach().min()) if x.numel() else 0.0
    n = next(n for bound, n in _GL_RULES if x_min >= bound)
    nodes = torch.tensor(_GL[n][0], dtype=v.dtype, device=v.device).reshape((-1,) + (1,) * v.dim())
    weights = torch.tensor(_GL[n][1], dtype=v.dtype, device=v.device)
    gaps = mills_gap(x + nodes * v)  # all nodes in one call: (n, *shape)
    gbar = torch.tensordot(weights, gaps, dims=1)
    return -v * (x + 0.5 * v + gbar)


def _offset_long(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return log_ndtr_upper_scaled(x + v) - log_ndtr_upper_scaled(x) - v * (x + 0.5 * v)


def log_ndtr_ratio_offset(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F(v; x) = log(Phi(-x - v) / Phi(-x)) for v >= 0 and x >= -1 (valid, less sharp, below).

    This is the log survival of the normal tail beyond x, at offset v. When |F| is below ~1
    it is written as the product -v (x + v/2 + mean of g over [x, x+v]) (the mean by 8-point
    Gauss-Legendre), so it keeps full relative accuracy even when v is tiny and x ~ 1e10;
    otherwise as Lambda(x+v) - Lambda(x) - v (x + v/2), whose absolute rounding (~eps log x)
    is then negligible against |F|.
    """
    x, v = torch.broadcast_tensors(torch.as_tensor(x), torch.as_tensor(v))
    short = (v <= 1.0) & (v * (x + 0.5 * v) <= 1.0)
    return where_apply(short, _offset_short, _offset_long, x, v)


def log1mexp_safe(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 whose gradient is finite wherever the value is."""
    return log1mexp(torch.clamp(x, max=-1e-300))


# ---------------------------------------------------------------- scaled log mass (the reduction's hot path)

# Beyond this x, erfc(x) nears the subnormal range (erfc(26.5) ~ 2e-307): switch to erfcx.
_ERFC_SAFE = 25.0
_FAR = _ERFC_SAFE / SQRT_HALF
_ERFC_CAP = 26.0
# Floor for 2 x mass before its log: far below any mass the erfc branch is used for (>= 1e-273),
# far above the subnormals that send log down its slow path.
_TINY = 1e-300



def scaled_log_diff_ndtr(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``R = log(Phi(hi) - Phi(lo)) + e^2 / 2`` with ``e = max(lo, -hi, 0)``, for ``lo < hi``.

    ``e`` is the distance of ``[lo, hi]`` from zero; removing ``-e^2/2`` leaves a remainder of order
    ``log e`` that stays exact however far in the tail the interval lies, so callers can cancel the
    quadratic parts of several normalisers exactly (see the module docstring). Inputs are 1-D or
    0-d and broadcast.

    Written for speed on millions of entries: only the vectorised ``erfc`` and ``log`` run on every
    entry (the scalar ``erfcx`` only on those deep in a tail), there are no data-dependent branches
    (``torch.where`` is slow on unpredictable masks), and no transcendental sees a zero, negative or
    underflowing argument (their slow paths).
    """
    s_lo = torch.sign(lo)
    s_hi = torch.sign(hi)
    # erfc(|x|/sqrt 2) = 2 Phi(-|x|), capped at 26 where erfc nears the subnormal range: that
    # changes only values < 1e-295, negligible beside the terms they meet (far tails: see below).
    e_lo = torch.erfc(lo.abs().mul_(SQRT_HALF).clamp_(max=_ERFC_CAP))
    e_hi = torch.erfc(hi.abs().mul_(SQRT_HALF).clamp_(max=_ERFC_CAP))
    # 2 (Phi(hi) - Phi(lo)) = erf(hi/sqrt2) - erf(lo/sqrt2) with erf(x/sqrt2) = sign(x)(1 - e_x):
    # (s_hi - s_lo) + (s_lo e_lo - s_hi e_hi). On one side of zero the first bracket is exactly 0
    # and the second a difference of two tails, exact relative to itself; straddling zero it is
    # 2 - e_lo - e_hi with both tails <= 1, so nothing cancels.
    twice_mass = (s_hi - s_lo).add_(s_lo * e_lo).sub_(s_hi * e_hi)
    e = lo.clamp(min=0.0).sub_(hi.clamp(max=0.0))  # distance from zero (at most one term is not 0)
    out = torch.log(twice_mass.clamp_(min=_TINY).mul_(0.5))
    out += (e * e).mul_(0.5)
    far = e > _FAR
    if out.dim() == 0:
        if bool(far):
            out = _far_tail(torch.maximum(lo.abs(), hi.abs()) * SQRT_HALF, e * SQRT_HALF, hi - lo)
    elif bool(far.any()):
        idx = far.nonzero().squeeze(1)
        lo, hi = lo[idx], hi[idx]
        x_far = torch.maximum(lo.abs(), hi.abs()).mul_(SQRT_HALF)
        out[idx] = _far_tail(x_far, e[idx].mul_(SQRT_HALF), hi - lo)
    return out


def _far_tail(xa: torch.Tensor, xb: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """The same-side remainder through erfcx, for ends at ``|x| = sqrt 2 xa`` (far) and
    ``sqrt 2 xb`` (near) with ``xa >= xb > 25``, and ``width = hi - lo``.

    With the near end mirrored to ``b = -sqrt 2 xb <= 0``: ``Phi(b) e^{b^2/2} = erfcx(xb) / 2`` and
    ``Phi(a)/Phi(b) = erfcx(xa)/erfcx(xb) e^{-(xa-xb)(xa+xb)}``, with ``xa - xb = width / sqrt 2``
    taken from the width so that narrow intervals keep their digits.
    """
    cb = torch.special.erfcx(xb)
    log_ratio = torch.log(torch.special.erfcx(xa) / cb) - (width * SQRT_HALF) * (xa + xb)
    # Below -50 the correction log(1 - e^x) is < 1e-21; clamping skips expm1's underflow path.
    log_ratio.clamp_(min=-50.0)
    return torch.log(cb * 0.5) + torch.log(-torch.expm1(log_ratio))
