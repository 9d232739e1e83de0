"""Truncated normal, truncated log-normal and log-uniform distributions for Pyro.

Parameterisation. ``TruncatedNormal(loc, scale, low, high)`` is N(loc, scale^2) restricted to
[low, high]. ``TruncatedLogNormal(loc, scale, low, high)`` is theta = exp(z) with z that truncated
normal, so ``low``/``high`` bound log theta (support [e^low, e^high]). ``LogUniform(low, high)`` is
theta = exp(u), u ~ Uniform(low, high). ``kl_divergence`` is registered in closed form for
(TruncatedLogNormal, LogUniform) and (TruncatedNormal, Uniform): log(p.high - p.low) minus the
entropy of z (KL is invariant under z -> e^z), +inf when q's bounds are not inside p's.

Parameters may be float32 or float64; everything is computed in float64 and returned in the
parameters' dtype. With alpha = (low - loc)/scale, beta = (high - loc)/scale and
Z = Phi(beta) - Phi(alpha), the numerical tricks, one line each with its reason:

- Flip (alpha, beta) -> (-beta, -alpha) when alpha + beta > 0: the mass then never sits in an
  upper tail, where 1 - Phi loses every digit.
- Offset form when loc is outside (or within one scale of) the near bound: z = bound -/+ scale v
  with v >= 0 of density ~ exp(-x v - v^2/2) on [0, W], x = distance in scales; all moments are
  of v, because z - bound (~1e-19 at loc = high + 5, scale = e^-20) is far below z's own ulp.
- Mills-ratio gap g(x) = phi(x)/Phi(-x) - x and u = 1 - x g from Laplace's continued fraction
  (x >= 6): they are ~1/x and ~2/x^2, what survives when the textbook terms (~x^2 ~ 1e19)
  cancel, so they are never formed by subtraction; E[v], Var[v] are closed forms in g, u.
- Entropy as Lambda(x) + log(1 - e^d) + x E[v] + E[v^2]/2 (Lambda(x) = log Phi(-x) + x^2/2,
  e^d = Phi(-x-W)/Phi(-x)): log Z and beta phi(beta)/Z, both ~ -x^2/2, cancel analytically.
- log(Phi(-x-v)/Phi(-x)) as -v (x + v/2 + mean of g over [x, x+v]) when small: keeps the
  relative precision of tiny offsets (cdf, icdf and the truncation mass 1 - e^d).
- Inside (beta' > 1 after the flip) Z >= 0.68, so phi(alpha)/Z and phi(beta)/Z are formed
  directly; cdf differences use erfc (torch.special.ndtr is 0 already at -8.9).
- Nearly uniform q (the log-density varies by < 1 over [low, high]): 12-point Gauss-Legendre
  in v with the exponent centred on its mean, so KL(q || uniform) ~ 1e-13 keeps its digits.
- E[theta] = exp(K(1)), K(t) = log E[e^{tz}] = t bound + M(x + t scale) - M(x) in the offset
  form, t loc + t^2 scale^2/2 + log Z(alpha - t scale, beta - t scale) - log Z inside: the
  huge parts cancel in the algebra, not in floating point.
- Var[theta] = E[theta]^2 expm1(D), D = K(2) - 2K(1) + K(0): E[theta^2] - E[theta]^2 cancels
  completely once scale^2 < eps. For scale < 0.5, D = int_0^2 min(t, 2-t) Var[z | loc +
  t scale^2] dt (Peano kernel) by Gauss-Legendre, the shift applied in standardised units so
  that it is not rounded away; the rule shrinks with scale (midpoint below 1e-8).
  signal_to_noise = expm1(D)^(-1/2).
- rsample = icdf(u). Inside: one ndtri on whichever tail probability is <= 1/2. Offset form:
  v = -x - ndtri(Phi(-x) e^T) for x <= 30; beyond, and on nearly uniform intervals, Newton on
  the concave F(v) = log(Phi(-x-v)/Phi(-x)) = T from a start with error < 2e-3 (two or three
  steps), then one Newton step with autograd on, whose gradient is exactly the
  implicit-reparameterisation gradient -(dF/dparam)/q(z), with no cancellation.
- Each regime is evaluated only on its own elements (gather/scatter), so an unused branch
  never puts inf/NaN into gradients, and no time is spent on discarded values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import broadcast_all, lazy_property

from bmrs_pyro._special import (
    LOG_SQRT_2PI,
    log1mexp_safe,
    log_diff_ndtr,
    log_ndtr,
    log_ndtr_ratio_offset,
    log_ndtr_upper_scaled,
    log_normal_pdf,
    masked_apply,
    where_apply,
    mills_gap,
    mills_gap_and_u,
    ndtr,
)

__all__ = ["TruncatedNormal", "TruncatedLogNormal", "LogUniform", "sample_sites"]

_NARROW_T, _NARROW_W = np.polynomial.legendre.leggauss(12)
_NARROW_T = tuple(float(t) for t in (_NARROW_T + 1.0) / 2.0)
_NARROW_W = tuple(float(w) for w in _NARROW_W / 2.0)
_HALF_LOG_2PIE = 0.5 * math.log(2.0 * math.pi * math.e)
_INSIDE = -1.0  # x < _INSIDE: loc is well inside the interval (beta' > 1, so Z >= 0.68)
_SMALL_SCALE = 0.5  # below it Var[theta] uses the Peano-kernel integral (see module docstring)
_NEWTON_STEPS = 2  # detached steps (+1 on narrow intervals), then one attached step
_NEWTON_FROM = 30.0  # offset-form icdf: closed form (ndtri) up to here, Newton beyond
# (scale bound, Gauss-Legendre points per half of [0, 2]) for the Peano-kernel integral of D.
_PEANO_RULES = ((1e-8, 0), (1e-4, 2), (1e-2, 4), (_SMALL_SCALE, 8))


# --------------------------------------------------------------------------------------------
# Validation and small utilities
# --------------------------------------------------------------------------------------------


def _first_bad(mask: torch.Tensor, *tensors: torch.Tensor) -> list[float]:
    index = tuple(mask.nonzero()[0].tolist()) if mask.dim() else ()
    return [float(t.detach()[index]) if t.dim() else float(t.detach()) for t in tensors]


def _check_interval(low: torch.Tensor, high: torch.Tensor) -> None:
    """Raise ValueError unless low < high everywhere (NaN counts as bad)."""
    bad = ~(low < high)
    if bool(bad.any()):
        lo, hi = _first_bad(bad, low, high)
        raise ValueError(
            f"low ({lo}) must be < high ({hi}); low and high bound the support "
            "(log theta for the log-scale distributions), pass them in increasing order"
        )


def _check_scale(scale: torch.Tensor) -> None:
    """Raise ValueError unless scale > 0 everywhere (NaN counts as bad)."""
    bad = ~(scale > 0)
    if bool(bad.any()):
        (value,) = _first_bad(bad, scale)
        raise ValueError(
            f"scale ({value}) must be > 0; parameterise it as exp(log_scale) or via "
            "a softplus to keep it positive"
        )


def _piecewise(
    mask: torch.Tensor,
    fn_true: Callable[..., tuple[torch.Tensor, ...]],
    fn_false: Callable[..., tuple[torch.Tensor, ...]],
    args: Sequence[torch.Tensor],
    n_out: int,
) -> tuple[torch.Tensor, ...]:
    """``fn_true`` where ``mask`` holds, ``fn_false`` elsewhere, each on its own elements only."""
    out = where_apply(mask, fn_true, fn_false, *args, n_out=n_out)
    return (out,) if n_out == 1 else tuple(out)


def _log_expm1(d: torch.Tensor) -> torch.Tensor:
    """log(expm1(d)) for d > 0 without overflow."""
    small = d < 30.0
    ds = torch.where(small, d, 1.0)
    dl = torch.where(small, 31.0, d)
    return torch.where(small, torch.log(torch.expm1(ds)), dl + torch.log1p(-torch.exp(-dl)))


# --------------------------------------------------------------------------------------------
# Standardised truncated-normal mathematics, in float64
# --------------------------------------------------------------------------------------------


def _is_narrow(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The log-density -x v - v^2/2 varies by less than 1 over the interval: nearly uniform."""
    return w * (x.abs() + w) <= 1.0


def _narrow_weights(x, w):
    """Gauss-Legendre nodes v and normalised weights p of the density ~ e^{-xv - v^2/2} on [0, w].

    The exponent is centred on its uniform average (h~ = h - mean h), so sums of p h~ and
    log sum w e^{-h~} are small numbers formed without cancellation against large ones.
    Also returns KL(q_v || Uniform(0, w)) = -(log S + E_q h~) >= 0, log S and mean h, where
    S = sum w_i e^{-h~_i}.
    """
    nodes = torch.tensor(_NARROW_T, dtype=x.dtype, device=x.device)
    weights = torch.tensor(_NARROW_W, dtype=x.dtype, device=x.device)
    v = w.unsqueeze(-1) * nodes
    h = v * (x.unsqueeze(-1) + 0.5 * v)
    h_bar = (weights * h).sum(-1, keepdim=True)
    h_tilde = h - h_bar
    e = weights * torch.exp(-h_tilde)
    total = e.sum(-1, keepdim=True)
    p = e / total
    log_s = torch.log(total.squeeze(-1))
    kl = -(log_s + (p * h_tilde).sum(-1))
    return v, p, torch.clamp(kl, min=0.0), log_s, h_bar.squeeze(-1)


def _narrow_stats(x, w, s, sgn, bound, width):
    """Offset form for a nearly uniform interval, by Gauss-Legendre quadrature in v."""
    v, p, kl, log_s, h_bar = _narrow_weights(x, w)
    m1 = (p * v).sum(-1)
    var = (p * (v - m1.unsqueeze(-1)) ** 2).sum(-1)
    entropy = torch.log(width) - kl
    # log Z = log int_0^w phi(-x - v) dv = -x^2/2 - log sqrt(2 pi) + log(w e^{-mean h} S).
    log_z = -0.5 * x * x - LOG_SQRT_2PI + torch.log(w) - h_bar + log_s
    return bound - sgn * s * m1, s * s * var, entropy, log_z, kl


def _wide_stats(x, w, s, sgn, bound, width):
    """Offset form, closed form through the Mills gap g and u = 1 - x g."""
    d = log_ndtr_ratio_offset(x, w)  # log(Phi(-x-w)/Phi(-x)) <= 0
    ed = torch.exp(d)
    em = -torch.expm1(d)
    g0, u0 = mills_gap_and_u(x)
    gw, uw = mills_gap_and_u(x + w)
    m1 = (g0 - (w + gw) * ed) / em
    var = (u0 - ed * (uw + 2.0 * w * gw + w * w)) / em - m1 * m1
    var = torch.clamp(var, min=0.0)
    lam = log_ndtr_upper_scaled(x)
    log1m = log1mexp_safe(d)
    entropy = torch.log(s) + lam + log1m + x * m1 + 0.5 * (var + m1 * m1) + LOG_SQRT_2PI
    log_z = lam - 0.5 * x * x + log1m
    return bound - sgn * s * m1, s * s * var, entropy, log_z, torch.log(width) - entropy


def _outside_stats(x, w, s, sgn, bound, width):
    """Offset form (x >= -1): z = bound - sgn * s * v, v on [0, w] with density ~ e^{-xv-v^2/2}.

    Returns mean, variance, entropy of z, log Z and KL(q || Uniform(low, high)).
    """
    return where_apply(
        _is_narrow(x, w), _narrow_stats, _wide_stats, x, w, s, sgn, bound, width, n_out=5
    )


def _inside_stats(a, b, s, sgn, loc, width):
    """Textbook formulas, valid because b > 1 and a <= -b give Z >= 0.68 (no tiny ratios)."""
    log_z = log_diff_ndtr(a, b)
    ra = torch.exp(log_normal_pdf(a) - log_z)
    rb = torch.exp(log_normal_pdf(b) - log_z)
    m1 = ra - rb
    ara = torch.where(ra > 0, a * ra, 0.0)  # a may be ~ -1e10 where ra underflows to 0
    brb = b * rb
    var = torch.clamp(1.0 + ara - brb - m1 * m1, min=0.0)
    entropy = torch.log(s) + log_z + _HALF_LOG_2PIE + 0.5 * (ara - brb)
    return loc + sgn * s * m1, s * s * var, entropy, log_z, torch.log(width) - entropy


def _scaled_mass(y, w):
    """M(y) = log int_0^w exp(-y v - v^2/2) dv - log sqrt(2 pi), for any real y."""

    def tail(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return log_ndtr_upper_scaled(y) + log1mexp_safe(log_ndtr_ratio_offset(y, w))

    def central(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * y * y + log_diff_ndtr(-y - w, -y)

    return where_apply(y >= _INSIDE, tail, central, y, w)


def _wide_mgf(x, w, s, sgn, bound):
    """(K(1), K(2) - 2K(1)) with K(t) = log E[exp(t z)], offset form."""
    c = sgn * s
    m0 = _scaled_mass(x, w)
    m1 = _scaled_mass(x + c, w)
    m2 = _scaled_mass(x + 2.0 * c, w)
    return bound + m1 - m0, (m2 - m1) - (m1 - m0)


def _narrow_mgf(x, w, s, sgn, bound):
    """(K(1), D) for a nearly uniform q on a short interval, by quadrature in v.

    K(t) = E[z] + log E[e^{t (z - E z)}]; the centred exponentials are summed as
    1 + sum p expm1(.), so D ~ Var[z] (tiny here) keeps its digits.
    """
    v, p, _, _, _ = _narrow_weights(x, w)
    m1 = (p * v).sum(-1)
    y = -(sgn * s).unsqueeze(-1) * (v - m1.unsqueeze(-1))  # t = 1: z - E z at the nodes
    k1c = torch.log1p((p * torch.expm1(y)).sum(-1))
    k2c = torch.log1p((p * torch.expm1(2.0 * y)).sum(-1))
    return bound - sgn * s * m1 + k1c, k2c - 2.0 * k1c


def _outside_mgf(x, w, s, sgn, bound):
    """(K(1), D) in the offset form; quadrature when q is nearly uniform on a short interval."""
    narrow = _is_narrow(x, w) & (s * w <= 0.5)
    return where_apply(narrow, _narrow_mgf, _wide_mgf, x, w, s, sgn, bound, n_out=2)


def _inside_mgf_flipped(a, b, s, sgn, loc):
    """_inside_mgf from the flipped-frame bounds (alpha, beta) = sgn * (a, b) sorted."""
    alpha = torch.where(sgn > 0, a, -b)
    beta = torch.where(sgn > 0, b, -a)
    return _inside_mgf(alpha, beta, s, loc)


def _inside_mgf(alpha, beta, s, loc):
    """(K(1), K(2) - 2K(1)) inside the interval, from h(u) = log Z(alpha - u, beta - u)."""
    h0 = log_diff_ndtr(alpha, beta)
    h1 = log_diff_ndtr(alpha - s, beta - s)
    h2 = log_diff_ndtr(alpha - 2.0 * s, beta - 2.0 * s)
    return loc + 0.5 * s * s + h1 - h0, s * s + (h2 - h1) - (h1 - h0)


def _icdf_target(d: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """log(Phi(-x-v)/Phi(-x)) at the quantile p (q = 1 - p): log(e^d + p (1 - e^d))."""
    lower = p < 0.5
    p_s = torch.where(lower, p, 0.5)
    q_s = torch.where(lower, 0.5, q)
    return torch.where(
        lower,
        torch.logaddexp(d, torch.log(p_s) + log1mexp_safe(d)),
        torch.log1p(q_s * torch.expm1(d)),
    )


def _offset_icdf_near(x, w, d, target):
    """Offset v for -1 <= x <= 30: v = -x - Phi^-1(Phi(-x) e^target); no underflow there."""
    xs = torch.special.ndtri(torch.exp(log_ndtr(-x) + target))
    return -x - xs


def _offset_icdf_newton(x, w, d, target):
    """Offset v by Newton's method on F(v) = log(Phi(-x-v)/Phi(-x)) = target.

    F is concave and decreasing. Far out (x > 30) the root of the Gaussian part
    -v (x + v/2) = target starts right of the root with relative error < 2e-3; on a nearly
    uniform interval the chord v = w target / d starts left of it with error O(w^2). Either way
    two or three steps reach 1e-16 (checked in the tests through cdf(icdf(p)) = p).
    """
    with torch.no_grad():
        xd, wd, dd, td = x.detach(), w.detach(), d.detach(), target.detach()
        narrow = _is_narrow(xd, wd)
        gaussian = -2.0 * td / (xd + torch.sqrt(xd * xd - 2.0 * td))
        v = torch.where(narrow, wd * td / torch.where(narrow, dd, -1.0), gaussian)
        v = torch.minimum(torch.clamp(v, min=0.0), wd)
        for _ in range(_NEWTON_STEPS + int(bool(narrow.any()))):
            hazard = xd + v + mills_gap(xd + v)
            v = v + (log_ndtr_ratio_offset(xd, v) - td) / hazard
            v = torch.minimum(torch.clamp(v, min=0.0), wd)
        hazard = xd + v + mills_gap(xd + v)
    # One more Newton step with autograd on: its gradient (dF/dparam - dtarget/dparam)/hazard is
    # the implicit-function derivative of the root (exact implicit reparameterisation).
    return v + (log_ndtr_ratio_offset(x, v) - target) / hazard


def _outside_icdf(x, w, s, sgn, bound, p, q):
    """Inverse cdf in the offset form; p = cdf in the flipped frame, q = 1 - p exactly."""
    d = log_ndtr_ratio_offset(x, w)
    target = _icdf_target(d, p, q)
    newton = (x > _NEWTON_FROM) | _is_narrow(x, w)
    v = where_apply(newton, _offset_icdf_newton, _offset_icdf_near, x, w, d, target)
    v = torch.minimum(torch.clamp(v, min=0.0), w)
    v = torch.where(q == 0, 0.0, torch.where(p == 0, w, v))
    return bound - sgn * s * v


def _inside_icdf(a, b, s, sgn, loc, p, q):
    """Closed-form inverse cdf inside the interval (Z >= 0.68)."""
    z_mass = torch.exp(log_diff_ndtr(a, b))
    low_cdf = ndtr(a) + p * z_mass
    up_sf = ndtr(-b) + q * z_mass
    lower = low_cdf <= 0.5
    # One ndtri on whichever tail probability is <= 1/2 (never on a value near 1).
    xs = torch.special.ndtri(torch.clamp(torch.where(lower, low_cdf, up_sf), min=1e-300))
    xs = torch.where(lower, xs, -xs)
    xs = torch.minimum(torch.maximum(xs, a), b)
    xs = torch.where(p == 0, a, torch.where(q == 0, b, xs))
    return loc + sgn * s * xs


def _outside_cdf(x, w, s, sgn, bound, z):
    """(P, Q) in the offset form: P = cdf of the flipped variable at z, Q = 1 - P."""
    v = torch.minimum(torch.clamp(sgn * (bound - z) / s, min=0.0), w)
    d = log_ndtr_ratio_offset(x, w)
    em = -torch.expm1(d)
    f = log_ndtr_ratio_offset(x, v)
    # P = (e^f - e^d) / (1 - e^d), Q = (1 - e^f) / (1 - e^d).
    p = torch.exp(f) * -torch.expm1(torch.clamp(d - f, max=0.0)) / em
    q = -torch.expm1(f) / em
    return p, q


def _outside_log_prob(x, w, s, sgn, bound, z):
    """log density in the offset form: log phi(-x-v) - log Z with the two ~x^2/2 terms
    cancelled analytically."""
    v = torch.minimum(torch.clamp(sgn * (bound - z) / s, min=0.0), w)
    d = log_ndtr_ratio_offset(x, w)
    lp = -v * (x + 0.5 * v) - log_ndtr_upper_scaled(x) - log1mexp_safe(d) - LOG_SQRT_2PI
    return lp - torch.log(s)


def _inside_cdf(a, b, s, sgn, loc, z):
    """(P, Q) inside the interval; P, Q refer to the flipped variable."""
    xs = torch.minimum(torch.maximum(sgn * (z - loc) / s, a), b)
    log_z = log_diff_ndtr(a, b)

    def mass(lo: torch.Tensor, hi: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
        return torch.exp(log_diff_ndtr(lo, hi) - log_z)

    def nothing(lo: torch.Tensor, hi: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(lo)

    # At an endpoint the mass is exactly 0 (and log_diff_ndtr would see an empty interval).
    p = where_apply(xs > a, mass, nothing, a, xs, log_z)
    q = where_apply(xs < b, mass, nothing, xs, b, log_z)
    return p, q


def _inside_log_prob(a, b, s, sgn, loc, z):
    """Log density inside the interval (Z >= 0.68: the textbook form is exact)."""
    xs = (z - loc) / s
    return log_normal_pdf(xs) - log_diff_ndtr(a, b) - torch.log(s)


def _peano_rule(n: int) -> Callable[..., torch.Tensor]:
    """int_0^2 min(t, 2-t) Var[z | shift t*scale] dt with n GL points per half (0: midpoint)."""
    if n == 0:
        pairs = [(1.0, 1.0)]
    else:
        nodes, weights = np.polynomial.legendre.leggauss(n)
        pairs = []
        for node, weight in zip((nodes + 1.0) / 2.0, weights / 2.0):
            node, weight = float(node), float(weight)
            pairs += [(node, weight * node), (1.0 + node, weight * (1.0 - node))]

    def rule(loc, s, low, high):
        total = torch.zeros_like(loc)
        for t, weight in pairs:
            total = total + weight * _Core(loc, s, low, high, shift=t * s).stats[1]
        return total

    return rule


class _Core:
    """Float64 geometry of a truncated normal plus its lazily computed statistics."""

    def __init__(self, loc, scale, low, high, shift: torch.Tensor | float = 0.0):
        # ``shift`` moves loc by shift * scale, applied in standardised units so that a shift
        # far below loc's ulp (t scale^2 with scale = e^-20) is not rounded away.
        self.loc, self.scale, self.low, self.high = broadcast_all(loc, scale, low, high)
        loc, s, low, high = self.loc, self.scale, self.low, self.high
        alpha = (low - loc) / s - shift
        beta = (high - loc) / s - shift
        self.loc = loc = loc + shift * s
        self.alpha, self.beta = alpha, beta
        # Flip so the mass sits in the lower tail of the standardised variable (if at all).
        self.flip = (alpha + beta) > 0
        self.sgn = torch.where(self.flip, -1.0, 1.0).to(loc)
        self.a = torch.where(self.flip, -beta, alpha)
        self.b = torch.where(self.flip, -alpha, beta)
        self.bound = torch.where(self.flip, low, high)
        self.x = -self.b
        self.w = (high - low) / s
        self.outside = self.x >= _INSIDE

    def _split(self, fn_out, fn_in, n_results, extra_out=(), extra_in=(), shape=None):
        """Offset form on the elements with loc outside (x >= -1), textbook form elsewhere."""
        shape = self.outside.shape if shape is None else shape
        args = (self.x, self.w, self.scale, self.sgn, self.bound, self.a, self.b, self.loc)
        args = tuple(t.expand(shape) for t in args + tuple(extra_out) + tuple(extra_in))
        k_out, k_in = len(extra_out), len(extra_in)

        def f_out(x, w, s, sgn, bound, a, b, loc, *extra):
            return fn_out(x, w, s, sgn, bound, *extra[:k_out])

        def f_in(x, w, s, sgn, bound, a, b, loc, *extra):
            return fn_in(a, b, s, sgn, loc, *extra[k_out : k_out + k_in])

        return _piecewise(self.outside.expand(shape), f_out, f_in, args, n_results)

    @lazy_property
    def stats(self) -> tuple[torch.Tensor, ...]:
        """(mean, variance, entropy, log Z, KL to the uniform on [low, high]) of z."""
        width = self.high - self.low
        mean, *rest = self._split(_outside_stats, _inside_stats, 5, (width,), (width,))
        return (torch.minimum(torch.maximum(mean, self.low), self.high), *rest)

    @lazy_property
    def mgf(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K(1), D) with K(t) = log E[e^{tz}] and D = K(2) - 2K(1) + K(0)."""
        k1, d_direct = self._split(_outside_mgf, _inside_mgf_flipped, 2)
        small = self.scale < _SMALL_SCALE
        if bool(small.any()):
            d_small = self._peano_d(small)
            d_direct = torch.where(small, d_small, d_direct)
        # E[theta] lies in [e^low, e^high]; rounding must not push it outside the support.
        k1 = torch.minimum(torch.maximum(k1, self.low), self.high)
        return k1, torch.clamp(d_direct, min=0.0)

    def _peano_d(self, small: torch.Tensor) -> torch.Tensor:
        """D = int_0^2 min(t, 2-t) Var[z; loc + t scale^2] dt on the elements in ``small``.

        The integrand varies with t only through the shift t * scale in standardised units,
        so an n-point Gauss-Legendre rule per half errs by ~scale^(2n): the rule is chosen per
        element from the scale (a single midpoint evaluation suffices below 1e-8).
        """
        out = torch.zeros(small.shape, dtype=self.loc.dtype, device=self.loc.device)
        lower = 0.0
        for upper, n in _PEANO_RULES:
            band = small & (self.scale >= lower) & (self.scale < upper)
            lower = upper
            if not bool(band.any()):
                continue
            args = (self.loc, self.scale, self.low, self.high)
            out = torch.where(band, masked_apply(band, _peano_rule(n), *args), out)
        return out

    def flipped_probs(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cdf value p in the original frame -> (p', 1 - p') in the flipped frame, both exact."""
        one_minus = 1.0 - p
        return torch.where(self.flip, one_minus, p), torch.where(self.flip, p, one_minus)

    def icdf(self, p: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(p.shape, self.loc.shape)
        pf, qf = self.flipped_probs(p)
        (z,) = self._split(_outside_icdf, _inside_icdf, 1, (pf, qf), (pf, qf), shape=shape)
        return torch.minimum(torch.maximum(z, self.low), self.high)

    def cdf(self, z: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(z.shape, self.loc.shape)
        zc = torch.minimum(torch.maximum(z, self.low), self.high)
        p, q = self._split(_outside_cdf, _inside_cdf, 2, (zc,), (zc,), shape=shape)
        cdf = torch.where(self.flip, q, p)
        return torch.where(z < self.low, 0.0, torch.where(z > self.high, 1.0, cdf))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(z.shape, self.loc.shape)
        zc = torch.minimum(torch.maximum(z, self.low), self.high)
        (lp,) = self._split(_outside_log_prob, _inside_log_prob, 1, (zc,), (zc,), shape=shape)
        return torch.where((z < self.low) | (z > self.high), -math.inf, lp)


# --------------------------------------------------------------------------------------------
# Public distributions
# --------------------------------------------------------------------------------------------


class TruncatedNormal(TorchDistribution):
    """Normal(loc, scale^2) restricted to [low, high], exact in every tail.

    ``low``/``high`` may be floats or tensors; all parameters broadcast to the batch shape.
    Computation is in float64 and results are returned in the parameters' dtype. ``rsample`` is
    reparameterised (gradients reach loc and scale, exact implicit-reparameterisation values).
    Raises ``ValueError`` if low >= high or scale <= 0, whatever the validation setting.
    """

    arg_constraints = {
        "loc": constraints.real,
        "scale": constraints.positive,
        "low": constraints.real,
        "high": constraints.real,
    }
    has_rsample = True

    def __init__(self, loc, scale, low=-20.0, high=0.0, validate_args=None):
        self.loc, self.scale, self.low, self.high = broadcast_all(loc, scale, low, high)
        _check_interval(self.low, self.high)
        _check_scale(self.scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """The same distribution with parameters broadcast to ``batch_shape``."""
        new = self._get_checked_instance(TruncatedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        for name in ("loc", "scale", "low", "high"):
            setattr(new, name, getattr(self, name).expand(batch_shape))
        # Remember the parameters before a leading-dims expansion (per-example noise expands
        # (S,) to (B, S)) so that sampling computes per-structure constants once, not B times.
        compact = self.__dict__.get("_compact_params")
        if compact is None and batch_shape[len(batch_shape) - len(self.batch_shape):] == self.batch_shape:
            compact = (self.loc, self.scale, self.low, self.high)
        new._compact_params = compact
        super(TruncatedNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        """The interval [low, high]."""
        return constraints.interval(self.low, self.high)

    @lazy_property
    def _core(self) -> _Core:
        return _Core(self.loc.double(), self.scale.double(), self.low.double(), self.high.double())

    def _out(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self.loc.dtype)

    @property
    def log_normalizer(self) -> torch.Tensor:
        """log Z = log(Phi(beta) - Phi(alpha))."""
        return self._out(self._core.stats[3])

    @property
    def mean(self) -> torch.Tensor:
        """E[z]."""
        return self._out(self._core.stats[0])

    @property
    def variance(self) -> torch.Tensor:
        """Var[z]."""
        return self._out(self._core.stats[1])

    def entropy(self) -> torch.Tensor:
        """Differential entropy of z."""
        return self._out(self._core.stats[2])

    def _rsample64(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self._draw(sample_shape, exp=False, low_precision=False)

    def _draw(self, sample_shape=torch.Size(), *, exp: bool, low_precision: bool = True) -> torch.Tensor:
        """z = icdf(u) (or theta = e^z with ``exp``), u ~ U(0, 1), with gradients.

        Per-structure constants are always float64. Where the standardised far bound of the
        flipped frame is >= -_FAST_SAMPLE_X the textbook inverse cdf is exact, and its
        per-element work (one ndtri per draw) runs in the parameters' dtype when
        ``low_precision`` (float32 models: no float64 per element, see :func:`_fast_icdf`);
        the offset-form inverse (float64, float64 uniforms) is kept for the tail structures.
        Without ``low_precision`` the result is float64.
        """
        params = self.__dict__.get("_compact_params") or (self.loc, self.scale, self.low, self.high)
        loc, scale, low, high = (t.double() for t in broadcast_all(*params))
        dtype = self.loc.dtype if low_precision else torch.float64
        fast = _fast_sample_ok(loc, scale, low, high)
        shape = self._extended_shape(sample_shape)
        u = _uniform(shape, dtype if bool(fast.all()) else torch.float64, loc.device)
        return _icdf_draw(loc, scale, low, high, u, fast, dtype, exp)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Reparameterised sample icdf(u), u ~ U(0, 1); gradients reach every parameter."""
        return self._out(self._draw(sample_shape, exp=False))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Sample without gradient."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    def _log_prob64(self, value64: torch.Tensor) -> torch.Tensor:
        return self._core.log_prob(value64)

    def log_prob(self, value):
        """log density of z (-inf outside [low, high] when validation is off)."""
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        return self._out(self._log_prob64(value.double()))

    def cdf(self, value):
        """P(z <= value)."""
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        return self._out(self._core.cdf(value.double()))

    def icdf(self, value):
        """Quantile function; icdf(0) = low, icdf(1) = high."""
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        return self._out(self._core.icdf(value.double()))


_FAST_SAMPLE_X = 5.0  # flipped-frame far bound b >= -5: Phi(b) >= 2.9e-7, no tail trouble


def _flipped_bounds(loc, scale, low, high):
    alpha, beta = (low - loc) / scale, (high - loc) / scale
    flip = (alpha + beta) > 0
    return flip, torch.where(flip, -beta, alpha), torch.where(flip, -alpha, beta)


def _fast_sample_ok(loc, scale, low, high) -> torch.Tensor:
    return _flipped_bounds(loc, scale, low, high)[2] >= -_FAST_SAMPLE_X


def _uniform(shape, dtype, device) -> torch.Tensor:
    """u ~ U(0, 1) kept off 0 (torch.rand never returns 1)."""
    u = torch.rand(shape, dtype=dtype, device=device)
    return torch.clamp(u, min=2.0**-60 if dtype == torch.float64 else torch.finfo(dtype).tiny)


def _finish64(z, low, high, dtype, exp):
    """A float64 draw z as z or e^z in ``dtype``, inside the support after rounding."""
    if not exp:
        return z.to(dtype)
    theta = torch.exp(z).to(dtype)
    return torch.minimum(torch.maximum(theta, _exp_bound(low).to(dtype)), _exp_bound(high).to(dtype))


def _fast_icdf(loc, scale, low, high, u, *, dtype=None, exp=False):
    """Draws loc + scale * Phi^-1(Phi(a) + u Z) in the flipped frame (mass in the lower tail).

    Sampling in the flipped frame with u itself (rather than 1 - u) is the same distribution
    and avoids forming 1 - u. One ndtri per draw on whichever tail probability is <= 1/2.

    The per-structure constants (a, b, Phi(a), Phi(-b), Z) are float64; the per-element work
    runs in ``dtype`` (default: u's). In float32 that is exact to float32 precision here: with
    b >= -5 the probabilities Phi(a) + u Z and Phi(-b) + (1 - u) Z are sums of non-negative
    float32 numbers (relative error ~eps), ndtri of the smaller tail keeps that relative error,
    so the standardised draw is off by ~eps * max(1, 1/|x|) and z by ~eps (|z| + scale), the
    size of z's own rounding when scale is no larger than the support's scale
    (tested against the float64 inverse at the same u). With ``exp`` it returns theta = e^z,
    kept inside [e^low, e^high] as rounded in ``dtype``.
    """
    dtype = u.dtype if dtype is None else dtype
    with torch.no_grad():
        flip, a, b = _flipped_bounds(loc, scale, low, high)
        cdf_a, sf_b = ndtr(a), ndtr(-b)
        if dtype != torch.float64 and bool((b - a >= 1e-6).all()):
            # Z = Phi(b) - Phi(a) directly: with b >= -5 (flipped frame) and b - a >= 1e-6 it
            # keeps a relative error below 1e-10, far below the float32 draws it feeds.
            z_mass = ndtr(b) - cdf_a
        else:
            z_mass = torch.exp(log_diff_ndtr(a, b))
        ea, eb = torch.exp(-0.5 * a * a), torch.exp(-0.5 * b * b)  # sqrt(2 pi) phi(a), phi(b)
        ea_a = torch.where(ea > 0, a * ea, 0.0)
        eb_b = torch.where(eb > 0, b * eb, 0.0)
        consts = (cdf_a, sf_b, z_mass, torch.where(flip, -1.0, 1.0), ea, eb - ea, ea_a, eb_b - ea_a)
        consts = tuple(t.to(dtype) for t in consts)
        if exp:
            lo, hi = _exp_bound(low).to(dtype), _exp_bound(high).to(dtype)
        else:
            lo, hi = low.to(dtype), high.to(dtype)
    return _FastIcdf.apply(loc.to(dtype), scale.to(dtype), u.to(dtype), consts, lo, hi, exp)


_ERFINV_FROM = 1.0 / 16.0  # ndtri through erfinv from here to 1/2, the exact ndtri below


def _ndtri_small(p: torch.Tensor) -> torch.Tensor:
    """Phi^-1(p) for 0 <= p <= 1/2 (0 is taken as the smallest normal number).

    On a CPU ``torch.special.ndtri`` is several times slower than ``erfinv``; there
    Phi^-1(p) = sqrt2 erfinv(2p - 1) is used for p >= 1/16, where 2p - 1 is off by at most
    half an ulp of numbers in [1/2, 1) (2^-25 in float32) and erfinv's slope there turns that
    into < 1.2e-7 in Phi^-1 (about one float32 eps); the tail p < 1/16, where 2p - 1 would lose
    p's digits, keeps ndtri. On other devices ndtri everywhere.
    """
    p = torch.clamp(p, min=1e-300 if p.dtype == torch.float64 else torch.finfo(p.dtype).tiny)
    if p.device.type != "cpu":
        return torch.special.ndtri(p)
    xi = torch.erfinv(p.mul(2.0).sub_(1.0)).mul_(math.sqrt(2.0))
    tail = (p < _ERFINV_FROM).reshape(-1).nonzero().squeeze(-1)
    if tail.numel():
        flat = xi.reshape(-1)
        flat.index_copy_(0, tail, torch.special.ndtri(p.reshape(-1).index_select(0, tail)))
    return xi


class _FastIcdf(torch.autograd.Function):
    """The textbook inverse cdf per element, with the implicit-reparameterisation gradient.

    Forward (flipped frame, mass in the lower tail): both tail probabilities
    Phi(a) + u Z and Phi(-b) + (1 - u) Z, one Phi^-1 on the smaller, z = loc + sign scale xi,
    clamped onto the support (rounding only). Backward, per element, the exact derivatives of
    the root of F(z; loc, scale) = u (F the cdf; the flip maps onto itself):

        dz/dloc   = 1 - ((1 - u) phi(a) + u phi(b)) / phi(xi)
        dz/dscale = sign (xi - ((1 - u) a phi(a) + u b phi(b)) / phi(xi))

    as 1/phi(xi) = sqrt(2 pi) e^{xi^2/2} times per-structure constants: |xi| <= 13.2 (Phi^-1 of
    the smallest normal number), so e^{xi^2/2} < 5e37 never overflows float32, and a
    constant that underflows to 0 (a far bound) gives 0, not NaN. Relative error
    ~eps (1 + xi^2/2). Analytic, so autograd stores no per-element graph: a dozen element-wise
    operations in the backward.
    """

    @staticmethod
    def forward(ctx, loc, scale, u, consts, lo, hi, exp):
        cdf_a, sf_b, z_mass, sign, n1, d1, n2, d2 = consts
        low_cdf = torch.addcmul(cdf_a, u, z_mass)
        up_sf = torch.addcmul(sf_b, 1.0 - u, z_mass)
        xi = _ndtri_small(torch.minimum(low_cdf, up_sf))  # <= 0
        xi = xi.copysign_(low_cdf - up_sf)  # -xi where the upper tail was inverted
        out = torch.addcmul(loc, sign * scale, xi)
        if exp:
            out = torch.exp(out)
        out = torch.clamp(out, min=lo, max=hi)
        ctx.save_for_backward(u, xi, out if exp else None, sign, n1, d1, n2, d2)
        ctx.shapes = (loc.shape, scale.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        u, xi, theta, sign, n1, d1, n2, d2 = ctx.saved_tensors
        if theta is not None:
            grad = grad * theta
        inv_pdf = torch.exp(xi * xi * 0.5)  # sqrt(2 pi) phi(xi) = 1 / inv_pdf
        # (1 - u) A + u B = A + u (B - A), with A, B the sqrt(2 pi)-scaled phi(a), phi(b) (n1,
        # d1 = B - A) and a phi(a), b phi(b) (n2, d2).
        dloc = 1.0 - inv_pdf * torch.addcmul(n1, u, d1)
        dscale = torch.addcmul(xi, inv_pdf, torch.addcmul(n2, u, d2), value=-1.0)
        grad_loc = (grad * dloc).sum_to_size(ctx.shapes[0])
        grad_scale = ((grad * dscale).sum_to_size(sign.shape) * sign).sum_to_size(ctx.shapes[1])
        return grad_loc, grad_scale, None, None, None, None, None


def _icdf_draw(loc, scale, low, high, u, fast, dtype, exp):
    """icdf(u) (e^icdf(u) with ``exp``) in ``dtype``: the textbook inverse on the structures in
    ``fast`` (per-element work in ``dtype``), the float64 offset form on the others."""
    if bool(fast.all()):
        return _fast_icdf(loc, scale, low, high, u, dtype=dtype, exp=exp)
    u = u.double()
    if not bool(fast.any()) or loc.dim() != 1:
        return _finish64(_Core(loc, scale, low, high).icdf(u), low, high, dtype, exp)
    idx_fast, idx_slow = fast.nonzero().squeeze(-1), (~fast).nonzero().squeeze(-1)
    z_fast = _fast_icdf(loc[idx_fast], scale[idx_fast], low[idx_fast], high[idx_fast],
                        u[..., idx_fast].to(dtype), dtype=dtype, exp=exp)
    z_slow = _Core(loc[idx_slow], scale[idx_slow], low[idx_slow], high[idx_slow]).icdf(u[..., idx_slow])
    z_slow = _finish64(z_slow, low[idx_slow], high[idx_slow], dtype, exp)
    order = torch.argsort(torch.cat([idx_fast, idx_slow]))
    return torch.cat([z_fast, z_slow], dim=-1)[..., order]


def sample_sites(loc, scale, low, high, sizes: Sequence[int], batch: int) -> torch.Tensor:
    """theta of shape (batch, sum(sizes)) for several noise sites at once.

    ``loc``, ``scale``, ``low``, ``high`` are the sites' (S_i,) parameters concatenated. The
    uniforms are drawn site by site exactly as ``TruncatedLogNormal(...).expand((batch, S_i))
    .rsample()`` draws them, and the values are the same; only the per-structure constants and
    the per-element work are computed once for all sites (fewer, larger tensor operations).
    """
    dtype = loc.dtype
    loc, scale, low, high = (t.double() for t in broadcast_all(loc, scale, low, high))
    fast = _fast_sample_ok(loc, scale, low, high)
    us = [_uniform((batch, n), dtype if bool(f.all()) else torch.float64, loc.device)
          for f, n in zip(fast.split(list(sizes)), sizes)]
    if len({u.dtype for u in us}) > 1:
        us = [u.double() for u in us]
    u = us[0] if len(us) == 1 else torch.cat(us, dim=-1)
    return _icdf_draw(loc, scale, low, high, u, fast, dtype, exp=True)


def _exp_bound(bound: torch.Tensor) -> torch.Tensor:
    """e^bound computed in float64 then rounded, exactly as samples are, so they stay inside."""
    return torch.exp(bound.double()).to(bound.dtype)


class TruncatedLogNormal(TorchDistribution):
    """theta = exp(z), z ~ TruncatedNormal(loc, scale, low, high); support [e^low, e^high].

    ``low``/``high`` bound log theta. Besides the usual methods it offers ``signal_to_noise``
    (E[theta]/SD[theta]), ``log_theta`` (the truncated normal of z) and ``log_normalizer``.
    """

    arg_constraints = TruncatedNormal.arg_constraints
    has_rsample = True

    def __init__(self, loc, scale, low=-20.0, high=0.0, validate_args=None):
        self._tn = TruncatedNormal(loc, scale, low, high, validate_args=validate_args)
        super().__init__(self._tn.batch_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """The same distribution with parameters broadcast to ``batch_shape``."""
        new = self._get_checked_instance(TruncatedLogNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new._tn = self._tn.expand(batch_shape)
        super(TruncatedLogNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    loc = property(lambda self: self._tn.loc, doc="Location of log theta before truncation.")
    scale = property(lambda self: self._tn.scale, doc="Scale of log theta before truncation.")
    low = property(lambda self: self._tn.low, doc="Lower bound of log theta.")
    high = property(lambda self: self._tn.high, doc="Upper bound of log theta.")

    @property
    def log_theta(self) -> TruncatedNormal:
        """The distribution of z = log theta."""
        return self._tn

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        """The interval [e^low, e^high]."""
        return constraints.interval(_exp_bound(self.low), _exp_bound(self.high))

    @property
    def log_normalizer(self) -> torch.Tensor:
        """log Z = log(Phi(beta) - Phi(alpha)) of the underlying truncated normal."""
        return self._tn.log_normalizer

    @lazy_property
    def _mgf(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tn._core.mgf

    @property
    def mean(self) -> torch.Tensor:
        """E[theta] = exp(K(1)), K the cumulant generating function of z."""
        return self._tn._out(torch.exp(self._mgf[0]))

    @property
    def variance(self) -> torch.Tensor:
        """Var[theta] = E[theta]^2 expm1(D), D = K(2) - 2 K(1)."""
        k1, d = self._mgf
        return self._tn._out(torch.exp(2.0 * k1 + _log_expm1(torch.clamp(d, min=1e-300))))

    @property
    def signal_to_noise(self) -> torch.Tensor:
        """E[theta] / SD[theta] = expm1(D)^(-1/2), D = log E[theta^2] - 2 log E[theta]."""
        d = self._mgf[1]
        return self._tn._out(torch.exp(-0.5 * _log_expm1(torch.clamp(d, min=1e-300))))

    def entropy(self) -> torch.Tensor:
        """Differential entropy of theta: H[z] + E[z]."""
        mean_z, _, entropy_z = self._tn._core.stats[:3]
        return self._tn._out(entropy_z + mean_z)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Reparameterised sample exp(z), z from the truncated normal's rsample."""
        return self._tn._out(self._tn._draw(sample_shape, exp=True))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Sample without gradient."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    def _log_theta64(self, value) -> torch.Tensor:
        """log theta in float64, snapping values within rounding of a bound onto it."""
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        z = torch.log(value.double())
        tol = 4.0 * torch.finfo(value.dtype).eps
        low, high = self.low.double(), self.high.double()
        z = torch.where((z < low) & (z >= low - tol * torch.clamp(low.abs(), min=1.0)), low, z)
        z = torch.where((z > high) & (z <= high + tol * torch.clamp(high.abs(), min=1.0)), high, z)
        return z

    def log_prob(self, value):
        """log density of theta: log q_z(log theta) - log theta."""
        if self._validate_args:
            self._validate_sample(value)
        z = self._log_theta64(value)
        return self._tn._out(self._tn._log_prob64(z) - z)

    def cdf(self, value):
        """P(theta <= value)."""
        if self._validate_args:
            self._validate_sample(value)
        z = self._log_theta64(value)
        return self._tn._out(self._tn._core.cdf(z))

    def icdf(self, value):
        """Quantile function of theta."""
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        return self._tn._out(torch.exp(self._tn._core.icdf(value.double())))


class LogUniform(TorchDistribution):
    """theta = exp(u), u ~ Uniform(low, high): the scale-invariant prior on [e^low, e^high]."""

    arg_constraints = {"low": constraints.real, "high": constraints.real}
    has_rsample = True

    def __init__(self, low=-20.0, high=0.0, validate_args=None):
        self.low, self.high = broadcast_all(low, high)
        _check_interval(self.low, self.high)
        super().__init__(self.low.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        """The same distribution with parameters broadcast to ``batch_shape``."""
        new = self._get_checked_instance(LogUniform, _instance)
        batch_shape = torch.Size(batch_shape)
        new.low = self.low.expand(batch_shape)
        new.high = self.high.expand(batch_shape)
        super(LogUniform, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        """The interval [e^low, e^high]."""
        return constraints.interval(_exp_bound(self.low), _exp_bound(self.high))

    def _out(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self.low.dtype)

    @property
    def mean(self) -> torch.Tensor:
        """E[theta] = e^low expm1(w)/w, w = high - low."""
        lo, hi = self.low.double(), self.high.double()
        w = hi - lo
        return self._out(torch.exp(lo) * torch.expm1(w) / w)

    @property
    def variance(self) -> torch.Tensor:
        """Var[theta], without the cancellation of E[theta^2] - E[theta]^2 on short intervals."""
        # Var = e^{2 mid} (2 sinh(h)/w) (cosh h - sinh(h)/h), h = w/2; the last factor is the
        # cancellation-free series sum_k h^{2k} 2k/(2k+1)! for small h.
        lo, hi = self.low.double(), self.high.double()
        h = 0.5 * (hi - lo)
        mid = 0.5 * (hi + lo)
        hs = torch.clamp(h, max=1.0)
        series = torch.zeros_like(hs)
        term = torch.ones_like(hs)
        for k in range(1, 12):
            term = term * hs * hs / ((2 * k) * (2 * k + 1))
            series = series + term * (2 * k)
        hl = torch.clamp(h, min=1.0)
        direct = torch.cosh(hl) - torch.sinh(hl) / hl
        second = torch.where(h < 1.0, series, direct)
        log_var = 2.0 * mid + torch.log(torch.sinh(h) / h) + torch.log(second)
        return self._out(torch.exp(log_var))

    def entropy(self) -> torch.Tensor:
        """Differential entropy of theta: log(high - low) + (low + high)/2."""
        lo, hi = self.low.double(), self.high.double()
        return self._out(torch.log(hi - lo) + 0.5 * (lo + hi))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Reparameterised sample exp(low + u (high - low))."""
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=torch.float64, device=self.low.device)
        lo, hi = self.low.double(), self.high.double()
        return self._out(torch.exp(torch.minimum(lo + u * (hi - lo), hi)))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Sample without gradient."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value):
        """log density -log(high - low) - log theta on the support."""
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self.low.dtype, device=self.low.device)
        z = torch.log(value.double())
        lo, hi = self.low.double(), self.high.double()
        magnitude = torch.clamp(torch.maximum(lo.abs(), hi.abs()), min=1.0)
        tol = 4.0 * torch.finfo(value.dtype).eps * magnitude
        inside = (z >= lo - tol) & (z <= hi + tol)
        lp = torch.where(inside, -torch.log(hi - lo) - z, -math.inf)
        return self._out(lp)

    def cdf(self, value):
        """P(theta <= value) = (log value - low)/(high - low)."""
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self.low.dtype, device=self.low.device)
        lo, hi = self.low.double(), self.high.double()
        return self._out(torch.clamp((torch.log(value.double()) - lo) / (hi - lo), 0.0, 1.0))

    def icdf(self, value):
        """Quantile function exp(low + p (high - low))."""
        value = torch.as_tensor(value, dtype=self.low.dtype, device=self.low.device)
        lo, hi = self.low.double(), self.high.double()
        return self._out(torch.exp(lo + value.double() * (hi - lo)))


# --------------------------------------------------------------------------------------------
# KL divergences
# --------------------------------------------------------------------------------------------


_FAST_KL_MIN_W = 1.0  # textbook KL only on intervals at least 1 scale wide (see below)


def _kl_textbook(a, b, s, width):
    """log(width) - H for the truncated normal with flipped-frame bounds a < b, in float64.

    H = log s + log Z + log sqrt(2 pi e) + (a phi(a) - b phi(b)) / (2 Z), Z = Phi(b) - Phi(a).
    Exact where :func:`_fast_kl_ok` holds: with b >= -5 and b - a >= 1, Phi(a)/Phi(b) <= 0.45
    so Z keeps its digits, b phi(b)/Z <= 13 so the cancellation against log Z costs about one
    digit, and the KL is >= 6e-4 (the O(1) terms lose at most ~3 more digits to it): relative
    error < 2e-12, gradients < 4e-12 (tested against the careful statistics on the grid).
    """
    z_mass = ndtr(b) - ndtr(a)
    pa = torch.exp(-0.5 * a * a) * (a / math.sqrt(2.0 * math.pi))
    pb = torch.exp(-0.5 * b * b) * (b / math.sqrt(2.0 * math.pi))
    entropy = torch.log(s * z_mass) + _HALF_LOG_2PIE + 0.5 * (pa - pb) / z_mass
    return torch.log(width) - entropy


def _fast_kl_ok(a, b, w) -> torch.Tensor:
    return (b >= -_FAST_SAMPLE_X) & (w >= _FAST_KL_MIN_W)


def _kl_own_uniform(q: "TruncatedNormal") -> torch.Tensor:
    """KL(q || Uniform(q.low, q.high)) in float64, by regime, each on its own elements:

    - the textbook entropy where it is exact (:func:`_fast_kl_ok`: the near bound within 5
      scales, the interval at least 1 scale wide), where training spends most steps;
    - nearly uniform q (the offset form's narrow case): the careful code's own Gauss-Legendre
      value, called directly;
    - the careful statistics everywhere else (the tails).
    """
    return kl_to_own_bounds(*(t.double() for t in (q.loc, q.scale, q.low, q.high)), core=q._core)


def kl_to_own_bounds(loc, s, low, high, core: "_Core | None" = None) -> torch.Tensor:
    """KL(TruncatedNormal(loc, s, low, high) || Uniform(low, high)), float64 tensors in and out
    (see :func:`_kl_own_uniform`; the same KL as for the log-scale pair on [e^low, e^high])."""
    _, a, b = _flipped_bounds(loc, s, low, high)
    width = high - low
    w = width / s
    fast = _fast_kl_ok(a, b, w)
    narrow = (-b >= _INSIDE) & _is_narrow(-b, w) & ~fast
    cheap = fast | narrow
    if not bool(cheap.any()):
        return (core if core is not None else _Core(loc, s, low, high)).stats[4]
    # Both cheap regimes on every element, each fed harmless stand-ins where it is not used (so
    # no inf/NaN reaches the gradients through torch.where), then selected: a few more small
    # operations than gathering each regime's elements, but far fewer than the gather/scatter.
    kl_fast = _kl_textbook(torch.where(fast, a, -1.0), torch.where(fast, b, 1.0),
                           torch.where(fast, s, 1.0), width)
    if bool(narrow.any()):
        kl_narrow = _narrow_weights(torch.where(narrow, -b, 0.0), torch.where(narrow, w, 0.5))[2]
        kl = torch.where(fast, kl_fast, kl_narrow)
    else:
        kl = kl_fast
    if bool(cheap.all()):
        return kl
    careful = masked_apply(~cheap, lambda loc, s, low, high: _Core(loc, s, low, high).stats[4],
                           loc, s, low, high)
    return torch.where(cheap, kl, careful)


def _kl_tn_uniform_bounds(q: TruncatedNormal, p_low: torch.Tensor, p_high: torch.Tensor) -> torch.Tensor:
    """KL(q || Uniform(p_low, p_high)) on z = log(p_high - p_low) - H(q).

    +inf unless q's support [q.low, q.high] lies inside [p_low, p_high] (q then has mass where
    p has none). Bounds that agree to a few ulps of the coarser dtype (e.g. -0.01 given once
    as float32 and once as float64) are taken as equal.
    """
    p_low, p_high = torch.as_tensor(p_low), torch.as_tensor(p_high)
    eps = max(torch.finfo(p_low.dtype).eps, torch.finfo(q.low.dtype).eps)
    q_low, q_high = q.low.double(), q.high.double()
    p_low, p_high = p_low.double(), p_high.double()
    def same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs() <= 4 * eps * b.abs().clamp(min=1.0)

    p_low = torch.where(same(p_low, q_low), q_low, p_low)
    p_high = torch.where(same(p_high, q_high), q_high, p_high)
    # KL(q || U(q.low, q.high)) comes straight from the statistics (for a nearly uniform q it
    # is a tiny positive number formed without cancellation); a wider p adds log(width ratio).
    kl = _kl_own_uniform(q) + (torch.log(p_high - p_low) - torch.log(q_high - q_low))
    inside = (q_low >= p_low) & (q_high <= p_high)
    return q._out(torch.where(inside, kl, math.inf))


@register_kl(TruncatedNormal, torch.distributions.Uniform)
def _kl_truncated_normal_uniform(q: TruncatedNormal, p: torch.distributions.Uniform) -> torch.Tensor:
    return _kl_tn_uniform_bounds(q, p.low, p.high)


@register_kl(TruncatedLogNormal, LogUniform)
def _kl_truncated_log_normal_log_uniform(q: TruncatedLogNormal, p: LogUniform) -> torch.Tensor:
    # KL is invariant under the bijection z -> e^z, so the z-space value is the answer.
    return _kl_tn_uniform_bounds(q._tn, p.low, p.high)
