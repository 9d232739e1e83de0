"""Bayesian model reduction (BMR) in closed form, and by Monte Carlo for any reduced prior.

Notation (log space, ``z = log theta``): the prior is ``p(z) = Uniform(a, b)``; the posterior of one
structure is ``q(z) = TruncatedNormal(loc, scale^2)`` on ``[a, b]``. Replacing the prior by a
*reduced* prior ``p~`` changes the log evidence by

    dF = log integral q(z) p~(z) / p(z) dz,

computed without refitting (Friston & Penny's BMR). A reduced prior that shrinks the structure's
scale ``theta`` towards zero encodes "this structure is not needed"; **dF >= 0 means the data favour
the reduced model, so the structure is pruned**. No threshold is tuned.

Numerics. For posteriors far outside ``[a, b]`` with tiny scales (``loc - a ~ -5``,
``scale ~ e^-20``) each log normaliser, ``log Z`` and ``log Z~``, is about ``-3e18`` while dF itself is
a modest number, so subtracting them loses everything. We therefore split every
``log(Phi(hi) - Phi(lo)) = -e^2/2 + R`` where ``e`` is the distance of ``[lo, hi]`` from zero and
``R`` is a moderate remainder computed through ``erfcx``, and combine the ``-e^2/2`` parts of all
normalisers with the Gaussian exponent algebraically, as products of differences, before adding
anything large. All arithmetic is float64 and the inputs broadcast.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch.distributions import Distribution, TransformedDistribution

from bmrs_pyro._special import log1mexp, log_erfcx_ratio_lower

__all__ = [
    "bits_to_log_bound",
    "delta_f_log_normal",
    "delta_f_log_uniform",
    "delta_f_monte_carlo",
]

TensorLike = Union[torch.Tensor, float, int]

_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
_F64 = torch.float64


def bits_to_log_bound(k: TensorLike) -> TensorLike:
    """The log of ``2^-k``, i.e. ``-k ln 2``: the upper bound ``b'`` of BMRS_U's "k bits" prior.

    ``k = 8`` and ``k = 4`` give BMRS_U-8 and BMRS_U-4 of the paper. ``k`` must be positive; ints
    and floats return a float, tensors a float64 tensor.
    """
    if isinstance(k, torch.Tensor):
        k = k.to(_F64)
        if not bool((k > 0).all()):
            raise ValueError("bits_to_log_bound: k (number of bits) must be > 0")
        return -k * _LOG_2
    k = float(k)
    if not k > 0:
        raise ValueError(f"bits_to_log_bound: k (number of bits) must be > 0, got {k}")
    return -k * _LOG_2


# --------------------------------------------------------------------------------------------
# helpers


def _f64(x: TensorLike, like: torch.Tensor | None = None) -> torch.Tensor:
    device = like.device if like is not None else None
    return torch.as_tensor(x, dtype=_F64, device=device)


def _all(cond: torch.Tensor) -> bool:
    return bool(cond.all())


def _scaled_log_diff_ndtr(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``R = log(Phi(hi) - Phi(lo)) + e^2 / 2`` with ``e = max(lo, -hi, 0)``, for ``lo < hi``.

    ``e`` is the distance of ``[lo, hi]`` from zero; removing ``-e^2/2`` leaves a remainder of order
    ``log e`` that stays exact however far in the tail the interval lies, so callers can cancel the
    quadratic parts of several normalisers exactly (see the module docstring).
    """
    flip = lo > 0
    # Mirror an upper-tail interval into the lower tail: Phi(hi)-Phi(lo) = Phi(-lo)-Phi(-hi).
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    # Same-tail branch (b <= 0, e = -b): log Phi(b) + e^2/2 = log(erfcx(e / sqrt 2) / 2).
    b_neg = torch.clamp(b, max=0.0)
    a_neg = torch.minimum(a, b_neg)
    log_ratio = torch.clamp(log_erfcx_ratio_lower(a_neg, b_neg), max=0.0)
    same = torch.log(torch.special.erfcx(-b_neg * _SQRT_HALF)) - _LOG_2 + log1mexp(log_ratio)
    # Straddling branch (a < 0 < b, e = 0): the mass is >= that of one half-line minus a tail.
    a_st = torch.clamp(a, max=0.0)
    b_st = torch.clamp(b, min=0.0)
    tails = torch.special.ndtr(a_st) + torch.special.ndtr(-b_st)
    straddle = torch.where(
        tails < 0.5,
        torch.log1p(-tails),
        torch.log(torch.special.ndtr(b_st) - torch.special.ndtr(a_st)),
    )
    return torch.where(b <= 0, same, straddle)


def _check_bounds(low: torch.Tensor, high: torch.Tensor, fn: str) -> None:
    if not _all(torch.isfinite(low) & torch.isfinite(high)):
        raise ValueError(f"{fn}: low and high must be finite")
    if not _all(low < high):
        raise ValueError(f"{fn}: need low < high (the prior is Uniform(low, high) on z = log theta)")


def _check_posterior(loc: torch.Tensor, scale: torch.Tensor, fn: str) -> None:
    if not _all(torch.isfinite(loc)):
        raise ValueError(f"{fn}: loc must be finite (got NaN or inf); check the guide's parameters")
    if not _all((scale > 0) & torch.isfinite(scale)):
        raise ValueError(f"{fn}: scale must be finite and > 0 (pass exp(log_scale), not log_scale)")


# --------------------------------------------------------------------------------------------
# closed forms


def delta_f_log_normal(
    loc: TensorLike,
    scale: TensorLike,
    low: TensorLike = -20.0,
    high: TensorLike = 0.0,
    reduced_loc: TensorLike | None = None,
    reduced_scale: TensorLike = 1e-6,
) -> torch.Tensor:
    """BMRS_N: dF for the reduced prior ``p~ = TruncatedNormal(reduced_loc, reduced_scale^2)`` on ``[a, b]``.

    Prior ``Uniform(a, b)`` on ``z = log theta`` (``a = low``, ``b = high``); posterior
    ``q = TruncatedNormal(loc, scale^2)`` on ``[a, b]``. With ``sigma = scale``, ``mu~ = reduced_loc``
    (default ``a``: a near point mass at ``theta = e^a``), ``sigma~ = reduced_scale``::

        s^2  = 1 / (1/sigma^2 + 1/sigma~^2),   m = s^2 (mu/sigma^2 + mu~/sigma~^2)
        Z    = Phi((b-mu)/sigma) - Phi((a-mu)/sigma)
        Z~   = Phi((b-m)/s)      - Phi((a-m)/s)
        Zp~  = Phi((b-mu~)/sigma~) - Phi((a-mu~)/sigma~)
        dF_N = log(b-a) + log Z~ - log Z - log Zp~
               - 0.5 log(2 pi (sigma^2 + sigma~^2)) - (mu - mu~)^2 / (2 (sigma^2 + sigma~^2))

    (The product of the two Gaussian densities is ``N(mu; mu~, sigma^2 + sigma~^2) N(z; m, s^2)``;
    integrating it over ``[a, b]`` gives ``Z~``.) **Prune where dF >= 0.**

    The authors' public code omits the ``-0.5 log(2 pi)`` term, so its dF is 0.919 nats too high
    and it prunes structures whose exact dF lies in ``[-0.92, 0)``; this function is exact and is
    checked against quadrature. ``reduced_loc`` may be any real (the reduced prior stays a normal
    truncated to ``[a, b]``). Finite over ``loc in [a-5, b+5]``, ``log scale in [-20, 5]``.

    Returns a float64 tensor of the broadcast shape of the arguments. Raises ``ValueError`` unless
    ``low < high``, ``scale > 0`` and ``reduced_scale > 0`` (all finite).
    """
    fn = "delta_f_log_normal"
    mu = _f64(loc)
    sigma = _f64(scale, mu)
    a = _f64(low, mu)
    b = _f64(high, mu)
    rl = a if reduced_loc is None else _f64(reduced_loc, mu)
    rs = _f64(reduced_scale, mu)
    _check_bounds(a, b, fn)
    _check_posterior(mu, sigma, fn)
    if not _all(torch.isfinite(rl)):
        raise ValueError(f"{fn}: reduced_loc must be finite")
    if not _all((rs > 0) & torch.isfinite(rs)):
        raise ValueError(f"{fn}: reduced_scale must be finite and > 0")

    # h = sqrt(sigma^2 + sigma~^2) via hypot, and weights as squared ratios <= 1, so nothing
    # overflows or underflows for sigma ~ e^-20 .. e^5 against sigma~ ~ 1e-6.
    h = torch.hypot(sigma, rs)
    w_p = torch.square(sigma / h)  # weight of mu~ in m
    w_q = torch.square(rs / h)  # weight of mu in m
    s = sigma * (rs / h)
    d = mu - rl
    m = mu - d * w_p

    # Distances from each Gaussian's centre to its nearest point of [a, b] (0 inside).
    u = torch.clamp(mu, a, b) - mu
    v = torch.clamp(rl, a, b) - rl
    m_in = (m >= a) & (m <= b)
    cm = torch.clamp(m, a, b)
    # cm - mu and cm - mu~, written without cancellation when m is inside [a, b].
    g = torch.where(m_in, -d * w_p, cm - mu)
    k = torch.where(m_in, d * w_q, cm - rl)
    # Quadratic parts: -(cm-m)^2/(2 s^2) + (c-mu)^2/(2 sigma^2) + (c~-mu~)^2/(2 sigma~^2)
    # - d^2/(2 h^2), rewritten with (z-mu)^2/sigma^2 + (z-mu~)^2/sigma~^2 = (z-m)^2/s^2 + d^2/h^2
    # at z = cm, as differences of squares.
    quad = 0.5 * ((u - g) / sigma) * ((u + g) / sigma) + 0.5 * ((v - k) / rs) * ((v + k) / rs)

    r_z = _scaled_log_diff_ndtr((a - mu) / sigma, (b - mu) / sigma)
    r_zt = _scaled_log_diff_ndtr((a - m) / s, (b - m) / s)
    r_zp = _scaled_log_diff_ndtr((a - rl) / rs, (b - rl) / rs)
    return torch.log(b - a) - _HALF_LOG_2PI - torch.log(h) + r_zt - r_z - r_zp + quad


def delta_f_log_uniform(
    loc: TensorLike,
    scale: TensorLike,
    low: TensorLike = -20.0,
    high: TensorLike = 0.0,
    reduced_low: TensorLike | None = None,
    reduced_high: TensorLike | None = None,
) -> torch.Tensor:
    """BMRS_U: dF for the reduced prior ``p~ = Uniform(a', b')`` on ``z``, ``a <= a' < b' <= b``.

    With the posterior ``q = TruncatedNormal(loc, scale^2)`` on ``[a, b]`` and the prior
    ``Uniform(a, b)``::

        dF_U = log(b-a) - log(b'-a')
               + log(Phi((b'-mu)/sigma) - Phi((a'-mu)/sigma)) - log(Phi((b-mu)/sigma) - Phi((a-mu)/sigma))

    i.e. the log of (posterior mass in ``[a', b']``) / (prior mass ``(b'-a')/(b-a)``). **Prune where
    dF >= 0**: the posterior puts at least as much mass on "theta at most 2^-k" as the prior does.

    Defaults: ``a' = a`` (``reduced_low``) and ``b' = bits_to_log_bound(8) = log 2^-8``
    (``reduced_high``; BMRS_U-8; ``bits_to_log_bound(4)`` gives BMRS_U-4). The authors' code uses
    ``a' = log 2^-23 = bits_to_log_bound(23)``; pass it as ``reduced_low`` to reproduce that, but
    note that with ``a' > a`` a posterior piled up at ``z = a`` (the most prunable structure) has
    almost no mass in ``[a', b']`` and is never pruned (dF -> -inf).

    Returns a float64 tensor of the broadcast shape. Raises ``ValueError`` unless
    ``low < high``, ``low <= reduced_low < reduced_high <= high`` and ``scale > 0``.
    """
    fn = "delta_f_log_uniform"
    mu = _f64(loc)
    sigma = _f64(scale, mu)
    a = _f64(low, mu)
    b = _f64(high, mu)
    a2 = a if reduced_low is None else _f64(reduced_low, mu)
    b2 = _f64(bits_to_log_bound(8) if reduced_high is None else reduced_high, mu)
    _check_bounds(a, b, fn)
    _check_posterior(mu, sigma, fn)
    if not _all(torch.isfinite(a2) & torch.isfinite(b2)):
        raise ValueError(f"{fn}: reduced_low and reduced_high must be finite")
    if not _all((a <= a2) & (a2 < b2) & (b2 <= b)):
        raise ValueError(
            f"{fn}: need low <= reduced_low < reduced_high <= high; the default reduced_high is "
            "bits_to_log_bound(8) = -5.545, so pass reduced_high when high is below that"
        )

    # The quadratic parts of the two normalisers cancel exactly when both intervals have the same
    # nearest point to mu (e.g. a posterior piled at a with a' = a).
    u = torch.clamp(mu, a, b) - mu
    u2 = torch.clamp(mu, a2, b2) - mu
    quad = 0.5 * ((u - u2) / sigma) * ((u + u2) / sigma)
    r_red = _scaled_log_diff_ndtr((a2 - mu) / sigma, (b2 - mu) / sigma)
    r_z = _scaled_log_diff_ndtr((a - mu) / sigma, (b - mu) / sigma)
    return torch.log(b - a) - torch.log(b2 - a2) + r_red - r_z + quad


# --------------------------------------------------------------------------------------------
# Monte Carlo


def _in_support(dist: Distribution, z: torch.Tensor) -> torch.Tensor:
    """Whether each ``z`` lies in the support, looking through transforms.

    ``TransformedDistribution.support`` is the codomain of the last transform (for ``exp``: all
    positive reals), not the image of the base support, so the base distribution is asked too.
    """
    inside = dist.support.check(z)
    if isinstance(dist, TransformedDistribution):
        x = z
        for t in reversed(dist.transforms):
            x = t.inv(x)
        base_inside = _in_support(dist.base_dist, x)
        while base_inside.dim() > inside.dim():
            base_inside = base_inside.all(-1)
        inside = inside & base_inside
    return inside


def _log_prob_in_support(dist: Distribution, z: torch.Tensor) -> torch.Tensor:
    """``dist.log_prob(z)``, and ``-inf`` where ``z`` lies outside ``dist.support``.

    A reduced prior is usually narrower than the posterior (``Uniform(a', b')``), and torch
    distributions either raise on such values or return densities continued outside the support.
    Out-of-support entries are swapped for one in-support draw before ``log_prob``, then masked.
    """
    inside = _in_support(dist, z)
    if bool(inside.all()):
        return dist.log_prob(z)
    event_dims = len(dist.event_shape)
    mask = inside.reshape(inside.shape + (1,) * event_dims)
    safe = torch.where(mask, z, dist.sample().to(z.dtype))
    return torch.where(inside, dist.log_prob(safe), torch.full_like(inside, -math.inf, dtype=z.dtype))


def delta_f_monte_carlo(
    posterior: Distribution,
    prior: Distribution,
    reduced_prior: Distribution,
    num_samples: int = 10000,
    *,
    return_stderr: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """dF by Monte Carlo for any reduced prior: ``log mean_i p~(z_i) / p(z_i)``, ``z_i ~ q``.

    ``posterior``, ``prior`` and ``reduced_prior`` are torch/Pyro distributions on the same space
    (all on ``z``, or all on ``theta``: the Jacobian of ``z -> e^z`` cancels in the ratio) whose
    batch shapes broadcast. The average is a ``logsumexp - log n`` in float64. It validates the
    closed forms and lets a user try their own reduced prior; a reduced prior much narrower than
    the posterior (BMRS_N's default ``sigma~ = 1e-6``) needs impractically many samples.

    With ``return_stderr=True`` also returns the delta-method standard error of the estimate: the
    standard error of the mean importance weight divided by that mean. Returns float64 tensors of
    the batch shape.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"delta_f_monte_carlo: num_samples must be an int >= 2, got {num_samples!r}")
    with torch.no_grad():
        z = posterior.rsample((num_samples,)) if posterior.has_rsample else posterior.sample((num_samples,))
        log_prior = _log_prob_in_support(prior, z)
        if not _all(torch.isfinite(log_prior)):
            raise ValueError(
                "delta_f_monte_carlo: posterior samples fall outside the prior's support (or the "
                "prior's density is zero there); posterior and prior must live on the same space"
            )
        log_w = (_log_prob_in_support(reduced_prior, z) - log_prior).to(_F64)
    estimate = torch.logsumexp(log_w, dim=0) - math.log(num_samples)
    if not return_stderr:
        return estimate
    # Weights relative to the largest keep the ratio std/mean exact without overflow.
    w = torch.exp(log_w - log_w.max(dim=0, keepdim=True).values)
    stderr = w.std(dim=0) / (math.sqrt(num_samples) * w.mean(dim=0))
    return estimate, stderr
