"""Low precision: the per-step sampler and KL of :mod:`bmrs_pyro._fast_paths` in the model's dtype,
off the CPU (issue 15).

On a GPU float64 runs at a small fraction of float32's throughput, so there the one-pass loss
keeps everything of a training step in the model's dtype (float32). The CPU keeps float64
per-structure constants (:mod:`bmrs_pyro._fast_paths`, and :mod:`bmrs_pyro._fused_step` for
float32 models); ``_forced_low_precision()`` makes the CPU take this path so that the tests can check it where no
GPU is lent. The registered ``kl_divergence`` and the whole reduction stay float64 everywhere.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.distributions.utils import broadcast_all

from bmrs_pyro._fast_paths import _FAST_SAMPLE_X, _FORCED_LOW, _FastIcdf, _flipped_bounds, _uniform
from bmrs_pyro._special import LOG_SQRT_2PI, log_ndtr_ratio_offset, mills_gap, ndtr
from bmrs_pyro._truncnorm import _HALF_LOG_2PIE


@contextlib.contextmanager
def _forced_low_precision():
    """(Private, for tests.) Inside it the CPU takes the off-CPU low-precision path."""
    before = _FORCED_LOW[0]
    _FORCED_LOW[0] = True
    try:
        yield
    finally:
        _FORCED_LOW[0] = before


def _low_precision(t: torch.Tensor) -> bool:
    """Whether the per-step sampler and KL run in ``t``'s dtype: float32 (or half) parameters
    off the CPU, or on the CPU under :func:`_forced_low_precision`; never for float64."""
    return t.dtype != torch.float64 and (_FORCED_LOW[0] or t.device.type != "cpu")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Gauss-Legendre on [0, 1]: 8 points for the sampler's Z on intervals at most 1 scale wide, 20
# for the KL of posteriors whose log density varies by at most _LP_QUAD_V over the interval.
def _gl01(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return tuple(float(t) for t in (nodes + 1.0) / 2.0), tuple(float(w) for w in weights / 2.0)


_GL8 = _gl01(8)
_GL20 = _gl01(20)
_LP_QUAD_V = 8.0
# The centred exponent at the nodes is y_i = w (x c1_i + w c2_i), c1 = T - 1/2, c2 = (T^2 - 1/3)/2:
# GL means of c1 and c2 are 0 (to the rounding of the constants; the KL below is invariant
# under a constant shift of y, so that rounding costs nothing to first order).
_GL20_C1 = tuple(t - 0.5 for t in _GL20[0])
_GL20_C2 = tuple(0.5 * (t * t - 1.0 / 3.0) for t in _GL20[0])
_LP_CF_DEPTH = 40  # Laplace's continued fraction for y >= 2: relative error < 1e-9 there
_LP_TAIL_X = 2.0  # the KL's offset form from here (the textbook's gradient cancels ~x^4-fold)
_LP_NEWTON = 4  # detached Newton steps of the float32 tail inverse (start error < 4 %)


_CONSTS: dict = {}


def _const(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a tensor of like's dtype and device (cached: no copy to a GPU per step)."""
    key = (values, like.dtype, like.device)
    found = _CONSTS.get(key)
    if found is None:
        if len(_CONSTS) > 64:
            _CONSTS.clear()
        with torch.inference_mode(False):  # an ordinary tensor even if first met under inference_mode
            found = _CONSTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return found


def _lp_exp_bounds(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[e^low, e^high] in low's dtype, nudged two ulps inwards (e^0 = 1 is exact), more than
    the error of a float32 exp (<= 2 ulps on CUDA), so that a draw clamped onto them also lies
    inside the support as the distribution states it (e^bound rounded from float64)."""
    up, down = torch.full_like(low, math.inf), torch.zeros_like(high)
    lo = torch.nextafter(torch.nextafter(torch.exp(low), up), up)
    e_high = torch.exp(high)
    hi = torch.where(high == 0, e_high, torch.nextafter(torch.nextafter(e_high, down), down))
    return lo, hi


def _lp_fast_consts(a: torch.Tensor, b: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:class:`_FastIcdf`'s per-structure constants in a's dtype (flipped frame, b >= -5).

    Phi(a) and Phi(-b) through erfc keep their relative precision in the lower tail; Z is
    Phi(b) - Phi(a), and on intervals at most one scale wide (where that difference can
    cancel) 8-point Gauss-Legendre of phi over [a, b], whose log varies by <= 6.5 there
    (b >= -5, a + b <= 0): relative error < 1e-9, below float32's rounding.
    """
    cdf_a, sf_b = ndtr(a), ndtr(-b)
    width = b - a
    narrow = width <= 1.0
    wq = torch.where(narrow, width, 1.0)
    aq = torch.where(narrow, a, 0.0)
    t = aq.unsqueeze(-1) + wq.unsqueeze(-1) * _const(_GL8[0], a)
    quad = wq * (torch.exp(-0.5 * t * t) * _const(_GL8[1], a)).sum(-1) * (1.0 / math.sqrt(2.0 * math.pi))
    z_mass = torch.where(narrow, quad, ndtr(b) - cdf_a)
    ea, eb = torch.exp(-0.5 * a * a), torch.exp(-0.5 * b * b)
    ea_a = torch.where(ea > 0, a * ea, 0.0)
    eb_b = torch.where(eb > 0, b * eb, 0.0)
    sign = 1.0 - 2.0 * flip.to(a.dtype)  # not where(flip, -1.0, 1.0): that is in the default dtype
    return cdf_a, sf_b, z_mass, sign, ea, eb - ea, ea_a, eb_b - ea_a


def _lp_fast_icdf(loc, scale, low, high, u, exp, flipped):
    """:func:`_fast_icdf` with the per-structure constants in the parameters' dtype too."""
    with torch.no_grad():
        flip, a, b = (t.detach() for t in flipped)
        consts = _lp_fast_consts(a, b, flip)
        lo, hi = _lp_exp_bounds(low, high) if exp else (low, high)
    return _FastIcdf.apply(loc, scale, u, consts, lo, hi, exp)


def _lp_log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - e^d) for d < 0 in d's dtype (clamped below 0 so the gradient stays finite)."""
    d = torch.clamp(d, max=-torch.finfo(d.dtype).tiny)
    return torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def _lp_tail_icdf(loc, scale, low, high, u, exp, flipped):
    """Draws of the tail structures (flipped-frame near bound b < -5) in the parameters' dtype.

    Offset form z = bound - sign scale v, v in [0, w] with density ~ e^{-x v - v^2/2}, x = -b > 5:
    v solves F(v) = log(Phi(-x-v)/Phi(-x)) = T(u) (F through
    :func:`bmrs_pyro._special.log_ndtr_ratio_offset`, accurate to ~eps relative for small
    offsets and ~eps log x absolute otherwise, in any dtype). Newton from the Gaussian root
    -v (x + v/2) = T, which lies right of the root by a relative ~1/x^2 <= 4 %; F is concave, so
    the steps decrease monotonically onto the root (4 detached steps), then one step with
    autograd on, whose gradient is the exact implicit-reparameterisation gradient.
    """
    flip, _, b = flipped
    sgn = 1.0 - 2.0 * flip.to(loc.dtype)
    bound = torch.where(flip, low, high)
    x = -b
    w = (high - low) / scale
    d = log_ndtr_ratio_offset(x, w)  # log(Phi(-x-w)/Phi(-x)) < 0, per structure
    p, q = u, 1.0 - u  # flipped-frame cdf (u itself, as in the fast path: same distribution)

    def target(d, p, q):
        lower = p < 0.5
        p_s = torch.where(lower, p, 0.5)
        q_s = torch.where(lower, 0.5, q)
        return torch.where(lower, torch.logaddexp(d, torch.log(p_s) + _lp_log1mexp(d)),
                           torch.log1p(q_s * torch.expm1(d)))

    with torch.no_grad():
        xd, wd, td = x.detach(), w.detach(), target(d.detach(), p, q)
        v = -2.0 * td / (xd + torch.sqrt(xd * xd - 2.0 * td))
        v = torch.minimum(torch.clamp(v, min=0.0), wd)
        for _ in range(_LP_NEWTON):
            hazard = xd + v + mills_gap(xd + v)
            v = v + (log_ndtr_ratio_offset(xd.expand_as(v), v) - td) / hazard
            v = torch.minimum(torch.clamp(v, min=0.0), wd)
        hazard = xd + v + mills_gap(xd + v)
    v = v + (log_ndtr_ratio_offset(x.expand_as(v), v) - target(d, p, q)) / hazard
    v = torch.minimum(torch.clamp(v, min=0.0), w)
    z = bound - sgn * scale * v
    if exp:
        with torch.no_grad():
            low, high = _lp_exp_bounds(low, high)
        z = torch.exp(z)
    # Onto the support (rounding only) with torch.where, not minimum/maximum: z - bound is often
    # below z's ulp, so z ties with the bound, and a tie would halve the gradient.
    return torch.where(z < low, low, torch.where(z > high, high, z))


def _icdf_draw_lp(loc, scale, low, high, u, exp, flipped=None):
    """icdf(u) (e^icdf(u) with ``exp``) with every tensor in the parameters' dtype.

    ``loc``, ``scale``, ``low``, ``high``: broadcast per-structure parameters (shape P), ``u``:
    uniforms of shape (..., *P) in the same dtype. Structures whose flipped-frame near bound is
    within 5 scales take :func:`_lp_fast_icdf`, the others :func:`_lp_tail_icdf`.
    """
    shape = loc.shape
    if loc.dim() != 1:
        loc, scale, low, high = (t.reshape(-1) for t in (loc, scale, low, high))
        u = u.reshape(u.shape[: u.dim() - len(shape)] + (-1,))
        flipped = None if flipped is None else tuple(t.reshape(-1) for t in flipped)
    if flipped is None:
        flipped = _flipped_bounds(loc, scale, low, high)
    fast = flipped[2] >= -_FAST_SAMPLE_X
    if bool(fast.all()):
        out = _lp_fast_icdf(loc, scale, low, high, u, exp, flipped)
    elif not bool(fast.any()):
        out = _lp_tail_icdf(loc, scale, low, high, u, exp, flipped)
    else:
        idx_fast, idx_slow = fast.nonzero().squeeze(-1), (~fast).nonzero().squeeze(-1)
        pick = lambda idx: [t.index_select(0, idx) for t in (loc, scale, low, high)]  # noqa: E731
        pick_f = lambda idx: tuple(t.index_select(0, idx) for t in flipped)  # noqa: E731
        out_fast = _lp_fast_icdf(*pick(idx_fast), u.index_select(-1, idx_fast), exp, pick_f(idx_fast))
        out_slow = _lp_tail_icdf(*pick(idx_slow), u.index_select(-1, idx_slow), exp, pick_f(idx_slow))
        order = torch.argsort(torch.cat([idx_fast, idx_slow]))
        out = torch.cat([out_fast, out_slow], dim=-1).index_select(-1, order)
    return out.reshape(out.shape[: out.dim() - 1] + shape) if len(shape) != 1 else out


def sample_sites_lp(loc, scale, low, high, sizes: Sequence[int], batch: int, *, flipped=None) -> torch.Tensor:
    """:func:`sample_sites` with every tensor in the parameters' dtype (the off-CPU path)."""
    dtype = loc.dtype
    cdt = _compute_dtype(dtype)
    loc, scale, low, high = (t.to(cdt) for t in broadcast_all(loc, scale, low, high))
    us = [_uniform((batch, n), cdt, loc.device) for n in sizes]
    u = us[0] if len(us) == 1 else torch.cat(us, dim=-1)
    return _icdf_draw_lp(loc, scale, low, high, u, True, flipped).to(dtype)


def _lp_gap_cf(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mills gap g(y) = phi(y)/Phi(-y) - y and u = 1 - y g for y >= 2, by Laplace's continued
    fraction (no cancellation, also in autograd; erfcx's form loses ~y^2 ulps in g and more in
    u in float32)."""
    t = torch.zeros_like(y)
    for k in range(_LP_CF_DEPTH, 1, -1):
        t = torch.reciprocal(y + t) * float(k)
    g = torch.reciprocal(y + t)
    return g, t * g


def _lp_kl_quad(x, w):
    """KL(q || uniform) by 20-point Gauss-Legendre in the offset v, for V <= 8 (any x).

    With y_i the centred exponent at the nodes (q ~ e^{-y}), S = sum l_i e^{-y_i} and the GL
    mean of y equal to 0, KL = E_q[-y] - log S = N / (1 + R) - log1p(R), where
    N = sum l_i (-y_i) expm1(-y_i) >= 0 and R = sum l_i (e^{-y_i} - 1 + y_i) >= 0: the O(y)
    parts, which cancel, are dropped analytically, so every sum has terms of one sign and the
    KL (~E y^2 / 2 when small) keeps float32's relative precision. Quadrature error < 2e-12
    for V <= 8 (checked against scipy).
    """
    y = w.unsqueeze(-1) * (x.unsqueeze(-1) * _const(_GL20_C1, x) + w.unsqueeze(-1) * _const(_GL20_C2, x))
    lam = _const(_GL20[1], x)
    m = torch.expm1(-y)
    small = y.abs() <= 0.5
    ys = torch.where(small, y, 0.0)
    series = torch.zeros_like(ys)
    for k in range(12, 1, -1):  # r(y) = sum_{k>=2} (-y)^k / k!, Horner in -y
        series = (series + 1.0 / math.factorial(k)) * (-ys)
    series = series * (-ys)
    r = torch.where(small, series, m + y)
    n_sum = (lam * (-y) * m).sum(-1)
    r_sum = (lam * r).sum(-1)
    return torch.clamp(n_sum / (1.0 + r_sum) - torch.log1p(r_sum), min=0.0)


def _lp_kl_textbook(a, b, w):
    """log w - log Z - log sqrt(2 pi e) - (a phi(a) - b phi(b)) / (2 Z), flipped frame, for
    b > -2 and V > 8: there Z >= 0.48 Phi(b) (no cancellation), KL >= 0.6, and the gradient's
    terms (~b^2 phi(b)/Z) cancel at most ~25-fold."""
    z_mass = ndtr(b) - ndtr(a)
    pa = torch.exp(-0.5 * a * a) * (a / math.sqrt(2.0 * math.pi))
    pb = torch.exp(-0.5 * b * b) * (b / math.sqrt(2.0 * math.pi))
    return torch.log(w) - torch.log(z_mass) - _HALF_LOG_2PIE - 0.5 * (pa - pb) / z_mass


def _lp_kl_tail(x, w):
    """KL in the offset form for x >= 2 and V > 8: log w - Lambda(x) - log(1 - e^d) - x E[v]
    - E[v^2]/2 - log sqrt(2 pi), the moments of v from the Mills gap (continued fraction): all
    terms O(1) or O(log), so value and gradient keep float32's relative precision."""
    d = log_ndtr_ratio_offset(x, w)
    ed, em = torch.exp(d), -torch.expm1(d)
    g, u = _lp_gap_cf(torch.stack([x, x + w]))
    g0, gw, u0, uw = g[0], g[1], u[0], u[1]
    m1 = (g0 - (w + gw) * ed) / em
    ev2 = (u0 - ed * (uw + 2.0 * w * gw + w * w)) / em
    lam = -torch.log(x) - torch.log1p(g0 / x) - LOG_SQRT_2PI
    return torch.log(w) - lam - _lp_log1mexp(d) - x * m1 - 0.5 * ev2 - LOG_SQRT_2PI


def kl_to_own_bounds_lp(loc, s, low, high, *, flipped=None) -> torch.Tensor:
    """KL(TruncatedNormal(loc, s, low, high) || Uniform(low, high)) in the parameters' dtype.

    By regime, on V = the variation of the log density over the interval (flipped frame,
    V = (a^2 - max(b, 0)^2) / 2): V <= 8 Gauss-Legendre (:func:`_lp_kl_quad`, every regime of
    loc: nearly uniform, inside, far tails), else the textbook entropy when the near bound is
    within 2 scales or inside (:func:`_lp_kl_textbook`), else the offset form
    (:func:`_lp_kl_tail`).
    Each branch sees harmless stand-ins where it is not used, so no inf/NaN reaches gradients.
    """
    dtype = loc.dtype
    cdt = _compute_dtype(dtype)
    loc, s, low, high = (t.to(cdt) for t in broadcast_all(loc, s, low, high))
    if flipped is None:
        flipped = _flipped_bounds(loc, s, low, high)
    _, a, b = (t.to(cdt) for t in flipped)
    x = -b
    w = (high - low) / s
    var_v = w * (x + 0.5 * w) + torch.where(x < 0, 0.5 * x * x, 0.0)
    quad = var_v <= _LP_QUAD_V
    text = ~quad & (b > -_LP_TAIL_X)
    tail = ~quad & ~text
    kl = _lp_kl_quad(torch.where(quad, x, 0.0), torch.where(quad, w, 1.0))
    kl = torch.where(text, _lp_kl_textbook(torch.where(text, a, -5.0), torch.where(text, b, 5.0),
                                           torch.where(text, w, 10.0)), kl)
    if bool(tail.any()):
        kl = torch.where(tail, _lp_kl_tail(torch.where(tail, x, 6.0), torch.where(tail, w, 2.0)), kl)
    return kl.to(dtype)
