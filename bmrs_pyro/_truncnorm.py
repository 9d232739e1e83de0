"""The truncated normal's numerics, exact in every tail: the statistics, cdf, icdf and
log density of :class:`bmrs_pyro.distributions.TruncatedNormal` (class ``_Core``).

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


def _is_narrow(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The log-density -x v - v^2/2 varies by less than 1 over the interval: nearly uniform."""
    return w * (x.abs() + w) <= 1.0


def _narrow_weights(x, w, rule=None):
    """Gauss-Legendre nodes v and normalised weights p of the density ~ e^{-xv - v^2/2} on [0, w].

    The exponent is centred on its uniform average (h~ = h - mean h), so sums of p h~ and
    log sum w e^{-h~} are small numbers formed without cancellation against large ones.
    Also returns KL(q_v || Uniform(0, w)) = -(log S + E_q h~) >= 0, log S and mean h, where
    S = sum w_i e^{-h~_i}. ``rule``: (nodes, weights) on [0, 1], default the 12-point rule
    (exact to rounding while the exponent varies by < 1 over [0, w]).
    """
    nodes, weights = rule if rule is not None else (_NARROW_T, _NARROW_W)
    nodes = torch.tensor(nodes, dtype=x.dtype, device=x.device)
    weights = torch.tensor(weights, dtype=x.dtype, device=x.device)
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


