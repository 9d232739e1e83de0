"""The one-pass loss's per-step work on the CPU, for models whose dtype is not float64: the KL
and theta of every noise site from one set of float64 per-structure constants (issue 15).

The sampler's constants (Phi(a), Phi(-b), Z, phi(a), phi(b) in the flipped frame) and the
textbook KL are the same few special-function values, so they are formed once for all sites,
stacked, and handed to the sampler in one conversion. The KL is an autograd Function whose
backward is the closed-form derivative of the textbook entropy,

    H = log s + log Z + log sqrt(2 pi e) + (a phi(a) - b phi(b)) / (2 Z),
    dH/da = phi(a) (r - 1 - a^2) / (2 Z),  dH/db = phi(b) (1 + b^2 - r) / (2 Z),
    r = (a phi(a) - b phi(b)) / Z,  a, b = sign (bound - loc) / s,

so the backward pass evaluates a dozen float64 operations instead of replaying the ~30 of the
forward. Both are used only where the textbook forms are exact (:func:`_fast_kl_ok`: the near
bound within 5 scales, the interval at least one scale wide). The KL of the other structures
takes, by regime: a 20-point Gauss-Legendre rule on wide posteriors, a closed form in the Mills
gap in the far tail, the careful code of :mod:`bmrs_pyro._fast_paths` elsewhere; their draws the
float64 offset form, as before. float64 models keep :func:`kl_to_own_bounds` and
:func:`sample_sites` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from bmrs_pyro._fast_paths import (
    _FAST_SAMPLE_X,
    _fast_icdf,
    _flipped_bounds,
    _fast_kl_ok,
    _icdf_draw,
    _site_uniforms,
    kl_to_own_bounds,
)
from bmrs_pyro._special import _CF_SWITCH, SQRT_HALF, _gap_cf, _gap_moderate, masked_apply
from bmrs_pyro._truncnorm import _HALF_LOG_2PIE, _INSIDE, _narrow_weights

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class _TextbookKL(torch.autograd.Function):
    """KL(q || Uniform(low, high)) = log(width) - H(q) from precomputed float64 constants, in
    loc's dtype, with the closed-form gradient in ``loc`` and ``scale`` (module docstring).
    ``used``: None, or the structures whose value is used (the others may be inf/NaN; they get
    gradient 0)."""

    @staticmethod
    def forward(ctx, loc, scale, a, b, sign, s64, z_mass, e, ae, log_width, used):
        # e = (e^{-a^2/2}, e^{-b^2/2}) = sqrt(2 pi) (phi(a), phi(b)); ae = (a, b) * e.
        ratio = (ae[0] - ae[1]) * _INV_SQRT_2PI / z_mass  # (a phi(a) - b phi(b)) / Z
        kl = log_width - _HALF_LOG_2PIE - torch.log(s64 * z_mass) - 0.5 * ratio
        ctx.save_for_backward(a, b, sign, s64, z_mass, e, ratio, used)
        ctx.dtypes = (loc.dtype, scale.dtype)
        return kl.to(loc.dtype)

    @staticmethod
    def backward(ctx, grad):
        a, b, sign, s64, z_mass, e, ratio, used = ctx.saved_tensors
        half_over_z = (0.5 * _INV_SQRT_2PI) / z_mass
        dh_da = e[0] * (ratio - 1.0 - a * a) * half_over_z
        dh_db = e[1] * (1.0 + b * b - ratio) * half_over_z
        g = grad.double() / s64
        grad_loc = g * sign * (dh_da + dh_db)
        grad_scale = g * (a * dh_da + b * dh_db - 1.0)
        if used is not None:
            grad_loc, grad_scale = torch.where(used, grad_loc, 0.0), torch.where(used, grad_scale, 0.0)
        return grad_loc.to(ctx.dtypes[0]), grad_scale.to(ctx.dtypes[1]), *([None] * 9)


# Posteriors on intervals narrower than one scale whose log density varies by at most
# _QUAD_V over the interval: the careful code's centred Gauss-Legendre KL with 20 points instead of
# 12. The exponent is a quadratic of range <= _QUAD_V, for which the 20-point rule's error is
# ~(_QUAD_V / 2)^40 / 40! ~ 1e-24 relative; checked against the careful statistics and scipy.
_QUAD_V = 8.0
_GL20 = tuple(tuple(float(t) for t in v) for v in (
    (np.polynomial.legendre.leggauss(20)[0] + 1.0) / 2.0, np.polynomial.legendre.leggauss(20)[1] / 2.0))


def _quadrature_regime(b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Offset-form posteriors (b <= 1 in the flipped frame) whose exponent x v + v^2/2, x = -b,
    varies by at most _QUAD_V over [0, w]."""
    return (b <= -_INSIDE) & (w * (b.abs() + w) <= _QUAD_V)


def _quadrature_kl(loc, scale, low64, high64):
    """KL of the :func:`_quadrature_regime` posteriors, with autograd, in loc's dtype."""
    _, _, b = _flipped_bounds(loc.double(), scale.double(), low64, high64)
    return _narrow_weights(-b, (high64 - low64) / scale.double(), _GL20)[2].to(loc.dtype)


# Far-tail posteriors: the near bound more than 5 scales from loc (x = -b >= 5), the far one so
# far (x w >= 40) that the truncation there holds < e^-40 of the mass. Then, with the Mills gap
# g(x) = phi(x)/Phi(-x) - x and Lambda(x) = log Phi(-x) + x^2/2 = -log(x + g) - log sqrt(2 pi),
# the careful offset-form entropy reduces to H = log s - log(x + g) + 1/2 + x g / 2 (E[v] = g,
# E[v^2] = u = 1 - x g), exact to ~1e-16 absolute; the careful code spends ~1000 operations on it.
_FAR_X, _FAR_XW = 5.0, 40.0


def _far_tail_regime(b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (b <= -_FAR_X) & (-b * w >= _FAR_XW)


def _gap_and_u(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, u = 1 - x g) of :func:`bmrs_pyro._special.mills_gap_and_u` for x >= 5, every element
    at once: Laplace's continued fraction from 6 (no cancellation), erfcx below."""
    if float(x.min()) >= _CF_SWITCH:
        return _gap_cf(x)
    big = x >= _CF_SWITCH
    g_cf, u_cf = _gap_cf(torch.clamp(x, min=_CF_SWITCH))
    g_mod, u_mod = _gap_moderate(torch.clamp(x, max=_CF_SWITCH))
    return torch.where(big, g_cf, g_mod), torch.where(big, u_cf, u_mod)


class _FarTailKL(torch.autograd.Function):
    """KL = log(width) - log s + log(x + g) - 1/2 - x g / 2 on far-tail posteriors (above), in
    loc's dtype, float64 inside. Gradient in closed form: with g' = g^2 - u (no cancellation:
    about -1/x^2 against 1/x^2 and 2/x^2), dKL/dx = (1 + g')/(x + g) - g/2 - x g'/2, and
    dx/dloc = sign/s, dx/ds = -x/s. ``used``: as in :class:`_TextbookKL`."""

    @staticmethod
    def forward(ctx, loc, scale, x, sign, s64, log_width, used):
        g, u = _gap_and_u(x)
        kl = log_width - torch.log(s64) + torch.log(x + g) - 0.5 - 0.5 * x * g
        ctx.save_for_backward(x, g, u, sign, s64, used)
        ctx.dtypes = (loc.dtype, scale.dtype)
        return kl.to(loc.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, g, u, sign, s64, used = ctx.saved_tensors
        dg = g * g - u
        dkl_dx = (1.0 + dg) / (x + g) - 0.5 * g - 0.5 * x * dg
        gs = grad.double() / s64
        grad_loc = torch.where(used, gs * sign * dkl_dx, 0.0)
        grad_scale = torch.where(used, -gs * (1.0 + x * dkl_dx), 0.0)
        return grad_loc.to(ctx.dtypes[0]), grad_scale.to(ctx.dtypes[1]), None, None, None, None, None


def step_kl_and_theta(loc: torch.Tensor, scale: torch.Tensor, low64: torch.Tensor, high64: torch.Tensor,
                      exp_bounds: tuple[torch.Tensor, torch.Tensor], sizes: Sequence[int],
                      batch: "int | None", keep: "torch.Tensor | None" = None
                      ) -> tuple[torch.Tensor, "torch.Tensor | None"]:
    """(KL per structure, theta of shape (batch, sum(sizes)) or None without ``batch``) for the
    concatenated sites' (S,) ``loc`` and ``scale`` in the model's dtype (not float64).

    ``low64``, ``high64``: the float64 bounds of log theta per structure; ``exp_bounds``: e^low,
    e^high rounded to the model's dtype (the clamp of the draws). The KL equals
    :func:`kl_to_own_bounds` and theta is what :func:`sample_sites` draws with the same random
    numbers; only the constants they share are formed once.

    ``keep`` (bool, (S,)): the structures not pruned, None for all. A pruned structure's KL and
    theta are masked out of the loss, so its frozen posterior (often far in a tail, where the
    careful code costs a hundred times the textbook one) is replaced by a stand-in in the
    textbook regime: same loss, same gradients (zero for the pruned ones), less work.
    """
    dtype = loc.dtype
    if keep is not None:
        with torch.no_grad():
            mid, half = 0.5 * (high64 + low64), 0.5 * (high64 - low64)  # stand-in: centred, width / 20
        loc = torch.where(keep, loc, mid.to(dtype))
        scale = torch.where(keep, scale, (0.1 * half).to(dtype))
    with torch.no_grad():
        loc64, s64 = loc.detach().double(), scale.detach().double()
        flipped = _flipped_bounds(loc64, s64, low64, high64)
        flip, a, b = flipped
        width = high64 - low64
        w = width / s64  # the interval in scales
        sample_fast = b >= -_FAST_SAMPLE_X  # the sampler's textbook inverse is exact there
        fast = _fast_kl_ok(a, b, w)  # and the textbook KL
        all_fast = bool(fast.all())
        ab = torch.stack((a, b, -b))
        cdf = torch.special.erfc(ab * -SQRT_HALF).mul_(0.5)  # Phi(a), Phi(b), Phi(-b)
        e = torch.exp(ab[:2].square().mul_(-0.5))
        ae = ab[:2] * e
        z_mass = cdf[1] - cdf[0]
        sign = torch.where(flip, -1.0, 1.0)
        # _FastIcdf's constants: Phi(a), Phi(-b), Z, sign, then the (scaled) phi(a), a phi(a)
        # and their steps to phi(b), b phi(b).
        consts = torch.stack((cdf[0], cdf[2], z_mass, sign, e[0], e[1] - e[0], ae[0], ae[1] - ae[0]))
    kl = _TextbookKL.apply(loc, scale, a, b, sign, s64, z_mass, e, ae, torch.log(width), None if all_fast else fast)
    if not all_fast:
        with torch.no_grad():  # wide posteriors (nearly uniform ones and beyond): quadrature
            quad = ~fast & _quadrature_regime(b, w)
            far = ~fast & ~quad & _far_tail_regime(b, w)
            careful = ~fast & ~quad & ~far
        if bool(quad.any()):
            kl = torch.where(quad, masked_apply(quad, _quadrature_kl, loc, scale, low64, high64), kl)
        if bool(far.any()):  # every element, stand-ins (x = 10, s = 1) where not far
            kl = torch.where(far, _FarTailKL.apply(loc, scale, torch.where(far, -b, 10.0), sign,
                                                   torch.where(far, s64, 1.0), torch.log(width), far), kl)
        if bool(careful.any()):
            kl = torch.where(careful, masked_apply(
                careful, lambda l, s, lo, hi: kl_to_own_bounds(l.double(), s.double(), lo, hi).to(dtype),
                loc, scale, low64, high64), kl)
    if batch is None:
        return kl, None
    all_sample_fast = all_fast or bool(sample_fast.all())
    u = _site_uniforms(sample_fast, sizes, batch, dtype, all_sample_fast)
    if all_sample_fast:
        theta = _fast_icdf(loc, scale, None, None, u, dtype=dtype, exp=True, consts=consts, exp_bounds=exp_bounds)
    else:  # float64 parameters, as sample_sites passes them: the tail structures' draws are float64
        theta = _icdf_draw(loc.double(), scale.double(), low64, high64, u, sample_fast, dtype, exp=True,
                           flipped=flipped, consts=consts, exp_bounds=exp_bounds)
    return kl, theta
