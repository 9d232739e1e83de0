"""Truncated normal, truncated log-normal and log-uniform distributions for Pyro.

Parameterisation. ``TruncatedNormal(loc, scale, low, high)`` is N(loc, scale^2) restricted to
[low, high]. ``TruncatedLogNormal(loc, scale, low, high)`` is theta = exp(z) with z that truncated
normal, so ``low``/``high`` bound log theta (support [e^low, e^high]). ``LogUniform(low, high)`` is
theta = exp(u), u ~ Uniform(low, high). ``kl_divergence`` is registered in closed form for
(TruncatedLogNormal, LogUniform) and (TruncatedNormal, Uniform): log(p.high - p.low) minus the
entropy of z (KL is invariant under z -> e^z), +inf when q's bounds are not inside p's.

Parameters may be float32 or float64. The numerics (float64, exact in every tail; the list of
tricks) are in :mod:`bmrs_pyro._truncnorm`; the per-step sampler and KL by regime in
:mod:`bmrs_pyro._fast_paths`.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import broadcast_all, lazy_property

from bmrs_pyro._fast_paths import (  # noqa: F401  (sampler and KL names re-exported for callers)
    _exp_bound,
    _fast_icdf,
    _fast_kl_ok,
    _fast_sample_ok,
    _flipped_bounds,
    _icdf_draw,
    _kl_textbook,
    _kl_tn_uniform_bounds,
    _uniform,
    kl_to_own_bounds,
    sample_sites,
)
from bmrs_pyro._low_precision import _compute_dtype, _icdf_draw_lp, _low_precision, _lp_exp_bounds
from bmrs_pyro._truncnorm import _Core, _check_interval, _check_scale, _log_expm1  # noqa: F401

__all__ = ["TruncatedNormal", "TruncatedLogNormal", "LogUniform", "sample_sites"]


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
        Without ``low_precision`` the result is float64. Off the CPU (or under
        ``_low_precision._forced_low_precision()``) a float32 model's draws make no float64 at all
        (:func:`bmrs_pyro._low_precision._icdf_draw_lp`).
        """
        params = self.__dict__.get("_compact_params") or (self.loc, self.scale, self.low, self.high)
        if low_precision and _low_precision(self.loc):
            cdt = _compute_dtype(self.loc.dtype)
            loc, scale, low, high = (t.to(cdt) for t in broadcast_all(*params))
            u = _uniform(self._extended_shape(sample_shape), cdt, loc.device)
            return _icdf_draw_lp(loc, scale, low, high, u, exp)
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
        """Reparameterised sample exp(low + u (high - low)) (float64 inside on the CPU; in the
        parameters' dtype off it, kept inside the support)."""
        shape = self._extended_shape(sample_shape)
        if _low_precision(self.low):
            cdt = _compute_dtype(self.low.dtype)
            lo, hi = self.low.to(cdt), self.high.to(cdt)
            u = torch.rand(shape, dtype=cdt, device=self.low.device)
            e_lo, e_hi = _lp_exp_bounds(lo, hi)
            theta = torch.exp(lo + u * (hi - lo))
            return self._out(torch.where(theta < e_lo, e_lo, torch.where(theta > e_hi, e_hi, theta)))
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


@register_kl(TruncatedNormal, torch.distributions.Uniform)
def _kl_truncated_normal_uniform(q: TruncatedNormal, p: torch.distributions.Uniform) -> torch.Tensor:
    return _kl_tn_uniform_bounds(q, p.low, p.high)


@register_kl(TruncatedLogNormal, LogUniform)
def _kl_truncated_log_normal_log_uniform(q: TruncatedLogNormal, p: LogUniform) -> torch.Tensor:
    # KL is invariant under the bijection z -> e^z, so the z-space value is the answer.
    return _kl_tn_uniform_bounds(q._tn, p.low, p.high)
