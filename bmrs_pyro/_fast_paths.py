"""The per-step hot path of the truncated (log-)normal: the sampler in the model's dtype with a
float64 fallback for tail structures, and the KL to the prior by regime (textbook where exact,
quadrature when nearly uniform, the careful statistics of :mod:`bmrs_pyro._truncnorm` in the
tails). The distributions in :mod:`bmrs_pyro.distributions` and the one-pass loss use them.

Off the CPU (a GPU), where float64 is slow, :mod:`bmrs_pyro._low_precision` replaces them for
float32 models with forms that make no float64 tensor; the CPU keeps the float64 ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

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

# Set by bmrs_pyro._low_precision._forced_low_precision (tests): the CPU then runs the off-CPU
# path, which makes no float64 tensor.
_FORCED_LOW = [False]
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


def _fast_icdf(loc, scale, low, high, u, *, dtype=None, exp=False, flipped=None, consts=None, exp_bounds=None):
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
    these parameters when the caller has it already. ``consts`` (with ``exp_bounds``, then
    ``low``, ``high`` and ``flipped`` are not used): the eight per-structure constants below,
    float64, stacked (8, S), and [e^low, e^high] in ``dtype``, from a caller that formed them
    with other work (:mod:`bmrs_pyro._fused_step`).
    """
    dtype = u.dtype if dtype is None else dtype
    if consts is not None:
        return _FastIcdf.apply(loc.to(dtype), scale.to(dtype), u.to(dtype), consts.to(dtype).unbind(0),
                               *exp_bounds, exp)
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
_ERFINV64_FROM = 2.0**-30  # float32 tails: float64 erfinv from here to 1/16, ndtri below


def _ndtri_small(p: torch.Tensor) -> torch.Tensor:
    """Phi^-1(p) for 0 <= p <= 1/2 (0 is taken as the smallest normal number).

    On a CPU ``torch.special.ndtri`` is several times slower than ``erfinv``; there
    Phi^-1(p) = sqrt2 erfinv(2p - 1) is used for p >= 1/16, where 2p - 1 is off by at most
    half an ulp of numbers in [1/2, 1) (2^-25 in float32) and erfinv's slope there turns that
    into < 1.2e-7 in Phi^-1 (about one float32 eps). In the tail p < 1/16, where 2p - 1 would
    lose p's digits, float64 keeps ndtri; a float32 (or half) p takes the same erfinv in float64
    down to p = 2^-30: 2p - 1 is then off by at most 2^-54 absolute, 6e-8 of p relative, which
    moves Phi^-1 by < 1.2e-8 (a tenth of its float32 ulp; rounded, the result is within half an
    ulp of the exact value, against ndtri's 2 ulps in float32, at a third of its cost), and
    ndtri below. On other devices ndtri everywhere.
    """
    if p.device.type != "cpu":
        return torch.special.ndtri(torch.clamp(p, min=torch.finfo(p.dtype).tiny))
    # p < 1/16 (p = 0 included) is overwritten below, so the clamp is needed on the tail only.
    xi = torch.erfinv(p.mul(2.0).sub_(1.0)).mul_(math.sqrt(2.0))
    tail = (p < _ERFINV_FROM).reshape(-1).nonzero().squeeze(-1)
    if tail.numel():
        flat = xi.reshape(-1)
        pt = p.reshape(-1).index_select(0, tail)
        if p.dtype == torch.float64 or _FORCED_LOW[0]:
            values = torch.special.ndtri(torch.clamp(pt, min=torch.finfo(p.dtype).tiny))
        else:
            pt64 = pt.double()
            values = torch.erfinv(pt64.mul(2.0).sub_(1.0)).mul_(math.sqrt(2.0))
            if bool(pt.amin() < _ERFINV64_FROM):  # p = 0 or below 2^-30: rare
                deep = pt64 < _ERFINV64_FROM
                values = torch.where(deep, torch.special.ndtri(torch.clamp(pt64, min=torch.finfo(p.dtype).tiny)),
                                     values)
            values = values.to(p.dtype)
        flat.index_copy_(0, tail, values)
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


def _icdf_draw(loc, scale, low, high, u, fast, dtype, exp, flipped=None, consts=None, exp_bounds=None):
    """icdf(u) (e^icdf(u) with ``exp``) in ``dtype``: the textbook inverse on the structures in
    ``fast`` (per-element work in ``dtype``), the float64 offset form on the others.
    ``consts``, ``exp_bounds``: :func:`_fast_icdf`'s, for every structure (used on ``fast``)."""
    if bool(fast.all()):
        return _fast_icdf(loc, scale, low, high, u, dtype=dtype, exp=exp, flipped=flipped, consts=consts,
                          exp_bounds=exp_bounds)
    u = u.double()
    if not bool(fast.any()) or loc.dim() != 1:
        return _finish64(_Core(loc, scale, low, high).icdf(u), low, high, dtype, exp)
    idx_fast, idx_slow = fast.nonzero().squeeze(-1), (~fast).nonzero().squeeze(-1)
    extra = {} if consts is None else {"consts": consts[:, idx_fast], "exp_bounds": [b[idx_fast] for b in exp_bounds]}
    z_fast = _fast_icdf(loc[idx_fast], scale[idx_fast], low[idx_fast], high[idx_fast],
                        u[..., idx_fast].to(dtype), dtype=dtype, exp=exp, **extra)
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
    u = _site_uniforms(fast, sizes, batch, dtype, bool(fast.all()))
    return _icdf_draw(loc, scale, low, high, u, fast, dtype, exp=True, flipped=flipped)


def _site_uniforms(fast: torch.Tensor, sizes: Sequence[int], batch: int, dtype: torch.dtype,
                   all_fast: bool) -> torch.Tensor:
    """Uniforms (batch, sum(sizes)) drawn site by site as each site's own ``rsample`` draws them:
    in ``dtype`` for a site whose structures are all in the sampler's ``fast`` region, float64
    otherwise (then all are returned in float64). ``all_fast``: whether ``fast`` holds everywhere,
    when the caller knows it (no per-site check then)."""
    us = [_uniform((batch, n), dtype if all_fast or bool(f.all()) else torch.float64, fast.device)
          for f, n in zip(fast.split(list(sizes)), sizes)]
    if len({u.dtype for u in us}) > 1:
        us = [u.double() for u in us]
    return us[0] if len(us) == 1 else torch.cat(us, dim=-1)


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
