"""The per-step hot path of the truncated (log-)normal: the sampler in the model's dtype with a
float64 fallback for tail structures, and the KL to the prior by regime (textbook where exact,
quadrature when nearly uniform, the careful statistics of :mod:`bmrs_pyro._truncnorm` in the
tails). The distributions in :mod:`bmrs_pyro.distributions` and the one-pass loss use them.

Off the CPU (a GPU), where float64 is slow, the section "Low precision" at the end replaces
them for float32 models with forms that make no float64 tensor; the CPU keeps the float64 ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.distributions.utils import broadcast_all

from bmrs_pyro._special import (
    LOG_SQRT_2PI,
    log_diff_ndtr,
    log_ndtr_ratio_offset,
    masked_apply,
    mills_gap,
    ndtr,
)
from bmrs_pyro._truncnorm import _HALF_LOG_2PIE, _INSIDE, _Core, _is_narrow, _narrow_weights

if TYPE_CHECKING:  # annotations only: distributions.py builds on this module
    from bmrs_pyro.distributions import TruncatedNormal

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


def _fast_icdf(loc, scale, low, high, u, *, dtype=None, exp=False, flipped=None):
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
    kept inside [e^low, e^high] as rounded in ``dtype``. ``flipped``: :func:`_flipped_bounds` of
    these parameters when the caller has it already.
    """
    dtype = u.dtype if dtype is None else dtype
    with torch.no_grad():
        flip, a, b = _flipped_bounds(loc, scale, low, high) if flipped is None else flipped
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


def _icdf_draw(loc, scale, low, high, u, fast, dtype, exp, flipped=None):
    """icdf(u) (e^icdf(u) with ``exp``) in ``dtype``: the textbook inverse on the structures in
    ``fast`` (per-element work in ``dtype``), the float64 offset form on the others."""
    if bool(fast.all()):
        return _fast_icdf(loc, scale, low, high, u, dtype=dtype, exp=exp, flipped=flipped)
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


def sample_sites(loc, scale, low, high, sizes: Sequence[int], batch: int, *, flipped=None) -> torch.Tensor:
    """theta of shape (batch, sum(sizes)) for several noise sites at once.

    ``loc``, ``scale``, ``low``, ``high`` are the sites' (S_i,) parameters concatenated. The
    uniforms are drawn site by site exactly as ``TruncatedLogNormal(...).expand((batch, S_i))
    .rsample()`` draws them, and the values are the same; only the per-structure constants and
    the per-element work are computed once for all sites (fewer, larger tensor operations).
    ``flipped``: :func:`_flipped_bounds` of the float64 parameters, when the caller has it.
    """
    dtype = loc.dtype
    loc, scale, low, high = (t.double() for t in broadcast_all(loc, scale, low, high))
    if flipped is None:
        flipped = _flipped_bounds(loc, scale, low, high)
    fast = flipped[2] >= -_FAST_SAMPLE_X
    us = [_uniform((batch, n), dtype if bool(f.all()) else torch.float64, loc.device)
          for f, n in zip(fast.split(list(sizes)), sizes)]
    if len({u.dtype for u in us}) > 1:
        us = [u.double() for u in us]
    u = us[0] if len(us) == 1 else torch.cat(us, dim=-1)
    return _icdf_draw(loc, scale, low, high, u, fast, dtype, exp=True, flipped=flipped)


def _exp_bound(bound: torch.Tensor) -> torch.Tensor:
    """e^bound computed in float64 then rounded, exactly as samples are, so they stay inside."""
    return torch.exp(bound.double()).to(bound.dtype)


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


def kl_to_own_bounds(loc, s, low, high, core: "_Core | None" = None, *, flipped=None) -> torch.Tensor:
    """KL(TruncatedNormal(loc, s, low, high) || Uniform(low, high)), float64 tensors in and out
    (see :func:`_kl_own_uniform`; the same KL as for the log-scale pair on [e^low, e^high])."""
    _, a, b = _flipped_bounds(loc, s, low, high) if flipped is None else flipped
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


# --------------------------------------------------------------------------------------------
# Low precision: the per-step sampler and KL in the model's dtype, off the CPU (issue 15).
#
# On a GPU float64 runs at a small fraction of float32's throughput, so there the one-pass loss
# keeps everything of a training step in the model's dtype (float32). The CPU keeps the float64
# forms above (bit for bit what it computed before); ``_forced_low_precision()`` makes the CPU
# take the low-precision path so that the tests can check it where no GPU is lent. The
# registered ``kl_divergence`` and the whole reduction stay float64 everywhere.
# --------------------------------------------------------------------------------------------

_FORCED_LOW = [False]


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
