"""The closed-form BMR (BMRS_N, BMRS_U) against independent computations.

References never use the formulas under test: dF = log integral q p~ / p is integrated directly
(scipy quad for moderate parameters, mpmath at 50 digits at the extremes), with the Gaussian
normalisers themselves obtained by integration too, so no Phi and no 0.5 log(2 pi) enters them.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.special
import scipy.stats
import torch
from torch.distributions import Distribution, ExpTransform, TransformedDistribution, Uniform, constraints

from bmrs_pyro.distributions import LogUniform, TruncatedLogNormal, TruncatedNormal
from bmrs_pyro.reduction import (
    bits_to_log_bound,
    delta_f_log_normal,
    delta_f_log_uniform,
    delta_f_monte_carlo,
)

A, B = -20.0, 0.0
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# independent references


def _quad_log_integral(logf, lo: float, hi: float) -> float:
    """log of integral_lo^hi exp(logf(z)) dz for a log-concave logf, by scipy quad.

    The maximiser is located numerically and subtracted so that nothing underflows; breakpoints at
    geometric distances from it let quad resolve peaks much narrower than the interval.
    """
    res = scipy.optimize.minimize_scalar(lambda z: -logf(z), bounds=(lo, hi), method="bounded",
                                         options={"xatol": 1e-12})
    cands = [lo, hi, float(res.x)]
    z_star = max(cands, key=logf)
    m = logf(z_star)
    pts = sorted({min(hi, max(lo, z_star + sgn * 10.0**j)) for j in range(-7, 2) for sgn in (-1, 1)}
                 | {lo, hi, z_star})
    total = 0.0
    for left, right in zip(pts[:-1], pts[1:]):
        if right > left:
            val, _ = scipy.integrate.quad(lambda z: math.exp(logf(z) - m), left, right,
                                          epsabs=0.0, epsrel=1e-10, limit=200)
            total += val
    return m + math.log(total)


def _quad_bmrs_n(loc, scale, rl, rs, a=A, b=B) -> float:
    def lq(z):
        return -0.5 * ((z - loc) / scale) ** 2

    def lp(z):
        return -0.5 * ((z - rl) / rs) ** 2

    # q = exp(lq)/Iq, p~ = exp(lp)/Ip, p = 1/(b-a): the 1/(sigma sqrt(2 pi)) constants cancel.
    return (math.log(b - a) + _quad_log_integral(lambda z: lq(z) + lp(z), a, b)
            - _quad_log_integral(lq, a, b) - _quad_log_integral(lp, a, b))


def _quad_bmrs_u(loc, scale, a2, b2, a=A, b=B) -> float:
    def lq(z):
        return -0.5 * ((z - loc) / scale) ** 2

    return (math.log(b - a) - math.log(b2 - a2) + _quad_log_integral(lq, a2, b2)
            - _quad_log_integral(lq, a, b))


def _mp_log_integral(logf, lo, hi):
    """As _quad_log_integral, in 50-digit mpmath: golden-section maximiser, tanh-sinh pieces."""
    lo, hi = mpmath.mpf(lo), mpmath.mpf(hi)
    x0, x1 = lo, hi
    g = (mpmath.sqrt(5) - 1) / 2
    for _ in range(260):
        c, d = x1 - g * (x1 - x0), x0 + g * (x1 - x0)
        if logf(c) > logf(d):
            x1 = d
        else:
            x0 = c
    z_star = max([lo, hi, (x0 + x1) / 2], key=logf)
    m = logf(z_star)
    pts = {lo, hi, z_star}
    for j in range(-24, 2):
        for sgn in (-1, 1):
            pts.add(min(hi, max(lo, z_star + sgn * mpmath.mpf(10) ** j)))
    pts = sorted(pts)
    return m + mpmath.log(mpmath.quad(lambda z: mpmath.exp(logf(z) - m), pts))


def _mp_bmrs_n(loc, scale, rl, rs, a=A, b=B):
    loc, scale, rl, rs = (mpmath.mpf(x) for x in (loc, scale, rl, rs))

    def lq(z):
        return -((z - loc) / scale) ** 2 / 2

    def lp(z):
        return -((z - rl) / rs) ** 2 / 2

    return (mpmath.log(b - a) + _mp_log_integral(lambda z: lq(z) + lp(z), a, b)
            - _mp_log_integral(lq, a, b) - _mp_log_integral(lp, a, b))


def _mp_bmrs_u(loc, scale, a2, b2, a=A, b=B):
    loc, scale = mpmath.mpf(loc), mpmath.mpf(scale)

    def lq(z):
        return -((z - loc) / scale) ** 2 / 2

    return (mpmath.log(b - a) - mpmath.log(mpmath.mpf(b2) - mpmath.mpf(a2))
            + _mp_log_integral(lq, a2, b2) - _mp_log_integral(lq, a, b))


class _ScipyTruncNormal(Distribution):
    """A z-space truncated normal for the Monte Carlo tests: samples from scipy, log_prob by hand."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, loc: float, scale: float, low: float, high: float, seed: int = 0):
        self.loc, self.scale, self.low, self.high = loc, scale, low, high
        self._rng = np.random.default_rng(seed)
        alpha, beta = (low - loc) / scale, (high - loc) / scale
        self._log_z = float(np.log(scipy.stats.norm.cdf(beta) - scipy.stats.norm.cdf(alpha)))
        super().__init__(batch_shape=torch.Size(), validate_args=False)

    @property
    def support(self):
        return constraints.interval(self.low, self.high)

    def sample(self, sample_shape=torch.Size()):
        alpha, beta = (self.low - self.loc) / self.scale, (self.high - self.loc) / self.scale
        z = scipy.stats.truncnorm.rvs(alpha, beta, loc=self.loc, scale=self.scale,
                                      size=tuple(sample_shape), random_state=self._rng)
        return torch.as_tensor(z, dtype=torch.float64)

    def log_prob(self, value):
        x = (value - self.loc) / self.scale
        inside = (value >= self.low) & (value <= self.high)
        lp = -0.5 * x * x - HALF_LOG_2PI - math.log(self.scale) - self._log_z
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))


# ---------------------------------------------------------------------------------------------
# closed forms vs quadrature


def _random_params(n: int, seed: int):
    rng = np.random.default_rng(seed)
    loc = rng.uniform(-25.0, 5.0, n)
    scale = np.exp(rng.uniform(-4.0, 2.0, n))
    return rng, loc, scale


def test_bmrs_n_matches_quadrature_on_random_parameters():
    rng, loc, scale = _random_params(100, 1)
    rl = rng.uniform(A, B, 100)
    rs = rng.uniform(0.05, 2.0, 100)
    ours = delta_f_log_normal(torch.tensor(loc), torch.tensor(scale), A, B,
                              torch.tensor(rl), torch.tensor(rs)).numpy()
    ref = np.array([_quad_bmrs_n(*p) for p in zip(loc, scale, rl, rs)])
    # Wide spread of values, so the comparison covers far-negative, moderate and positive dF.
    assert ref.min() < -100 and ref.max() > 1
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-6)


def test_bmrs_n_default_reduced_prior_matches_quadrature():
    # The default sigma~ = 1e-6 at mu~ = a: quadrature still works thanks to the geometric
    # breakpoints around the maximiser.
    rng, loc, scale = _random_params(20, 2)
    ours = delta_f_log_normal(torch.tensor(loc), torch.tensor(scale)).numpy()
    ref = np.array([_quad_bmrs_n(lc, sc, A, 1e-6) for lc, sc in zip(loc, scale)])
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-6)


def test_bmrs_u_matches_quadrature_on_random_parameters():
    rng, loc, scale = _random_params(100, 3)
    ends = np.sort(rng.uniform(A, B, (100, 2)), axis=1)
    # Also the shipped configurations: a' = a with b' = log 2^-8 and log 2^-4.
    ends[:10] = [A, bits_to_log_bound(8)]
    ends[10:20] = [A, bits_to_log_bound(4)]
    a2, b2 = ends[:, 0], ends[:, 1]
    ours = delta_f_log_uniform(torch.tensor(loc), torch.tensor(scale), A, B,
                               torch.tensor(a2), torch.tensor(b2)).numpy()
    ref = np.array([_quad_bmrs_u(*p) for p in zip(loc, scale, a2, b2)])
    assert ref.min() < -100 and ref.max() > 0.5
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-6)


EXTREME_N = [
    # (loc, log scale, reduced_loc, reduced_scale)
    (-25.0, -20.0, A, 1e-6),  # piled at a, tiny: should be pruned (dF ~ +16.6)
    (-20.0 + 1e-7, -20.0, A, 1e-6),  # just inside a
    (-10.0, -20.0, A, 1e-6),  # interior spike far from the reduced prior
    (5.0, -20.0, A, 1e-6),  # piled at b
    (-20.0, 5.0, A, 1e-6),  # very wide
    (-25.0, 5.0, A, 1e-6),
    (-19.0, -3.0, -19.5, 1e-6),  # reduced prior inside (a, b)
]


@pytest.mark.parametrize("loc,log_scale,rl,rs", EXTREME_N)
def test_bmrs_n_matches_mpmath_at_extremes(loc, log_scale, rl, rs):
    mpmath.mp.dps = 50
    ref = float(_mp_bmrs_n(loc, mpmath.exp(log_scale), rl, rs))
    ours = float(delta_f_log_normal(loc, math.exp(log_scale), A, B, rl, rs))
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-6)


EXTREME_U = [
    # (loc, log scale, a', b')
    (-25.0, -20.0, A, bits_to_log_bound(8)),
    (-25.0, -20.0, bits_to_log_bound(23), bits_to_log_bound(8)),  # piled at a, a' > a: -inf-ish
    (-5.5, -20.0, A, bits_to_log_bound(8)),  # spike just above b'
    (5.0, -20.0, A, bits_to_log_bound(4)),  # piled at b
    (-10.0, 5.0, A, bits_to_log_bound(8)),
]


@pytest.mark.parametrize("loc,log_scale,a2,b2", EXTREME_U)
def test_bmrs_u_matches_mpmath_at_extremes(loc, log_scale, a2, b2):
    mpmath.mp.dps = 50
    ref = float(_mp_bmrs_u(loc, mpmath.exp(log_scale), a2, b2))
    ours = float(delta_f_log_uniform(loc, math.exp(log_scale), A, B, a2, b2))
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Monte Carlo


def _f64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# bmrs_pyro.distributions samples by exact inversion, which is thorough but slow: keep n modest.
MC_DRAWS = 8000
MC_N_CASES = [(-18.0, 1.5, A, 0.8), (-12.0, 3.0, -15.0, 2.0), (-8.0, 4.0, A, 3.0)]


@pytest.mark.parametrize("loc,scale,rl,rs", MC_N_CASES)
def test_monte_carlo_agrees_with_bmrs_n_in_z_and_theta_space(loc, scale, rl, rs):
    torch.manual_seed(0)
    exact = float(delta_f_log_normal(loc, scale, A, B, rl, rs))
    q = TruncatedNormal(_f64(loc), _f64(scale), A, B)
    reduced = TruncatedNormal(_f64(rl), _f64(rs), A, B)
    est, se = delta_f_monte_carlo(q, Uniform(_f64(A), _f64(B)), reduced, MC_DRAWS, return_stderr=True)
    assert 0 < float(se) < 0.15
    assert abs(float(est) - exact) < 4 * float(se)
    # theta = e^z: the Jacobian of exp cancels in p~/p, so dF is the same.
    q_t = TruncatedLogNormal(_f64(loc), _f64(scale), A, B)
    reduced_t = TruncatedLogNormal(_f64(rl), _f64(rs), A, B)
    est_t, se_t = delta_f_monte_carlo(q_t, LogUniform(_f64(A), _f64(B)), reduced_t, MC_DRAWS, return_stderr=True)
    assert abs(float(est_t) - exact) < 4 * float(se_t)


@pytest.mark.parametrize("loc,scale,bits", [(-15.0, 4.0, 8), (-6.0, 2.0, 4), (-2.0, 3.0, 8)])
def test_monte_carlo_agrees_with_bmrs_u_in_z_and_theta_space(loc, scale, bits):
    torch.manual_seed(1)
    b2 = bits_to_log_bound(bits)
    exact = float(delta_f_log_uniform(loc, scale, A, B, A, b2))
    # The reduced prior's support is narrower than the posterior's: samples outside it count 0.
    q = TruncatedNormal(_f64(loc), _f64(scale), A, B)
    est, se = delta_f_monte_carlo(q, Uniform(_f64(A), _f64(B)), Uniform(_f64(A), _f64(b2)), MC_DRAWS,
                                  return_stderr=True)
    assert abs(float(est) - exact) < 4 * float(se)
    q_t = TruncatedLogNormal(_f64(loc), _f64(scale), A, B)
    est_t, se_t = delta_f_monte_carlo(q_t, LogUniform(_f64(A), _f64(B)), LogUniform(_f64(A), _f64(b2)),
                                      MC_DRAWS, return_stderr=True)
    assert abs(float(est_t) - exact) < 4 * float(se_t)


def test_monte_carlo_with_an_independent_sampler():
    # Posterior draws from scipy rather than from bmrs_pyro.distributions, and torch's own
    # TransformedDistribution for theta, so the agreement does not rest on the project's sampler.
    lo, hi = _f64(A), _f64(B)
    for loc, scale, rl, rs in MC_N_CASES[:2]:
        exact = float(delta_f_log_normal(loc, scale, A, B, rl, rs))
        q = _ScipyTruncNormal(loc, scale, A, B, seed=1)
        est, se = delta_f_monte_carlo(q, Uniform(lo, hi), _ScipyTruncNormal(rl, rs, A, B), 20000,
                                      return_stderr=True)
        assert abs(float(est) - exact) < 4 * float(se)
    b2 = _f64(bits_to_log_bound(8))
    exact = float(delta_f_log_uniform(-15.0, 4.0, A, B, A, float(b2)))
    q_t = TransformedDistribution(_ScipyTruncNormal(-15.0, 4.0, A, B, seed=3), [ExpTransform()])
    p_t = TransformedDistribution(Uniform(lo, hi), [ExpTransform()])
    r_t = TransformedDistribution(Uniform(lo, b2), [ExpTransform()])
    est_t, se_t = delta_f_monte_carlo(q_t, p_t, r_t, 20000, return_stderr=True)
    assert abs(float(est_t) - exact) < 4 * float(se_t)


def test_monte_carlo_stderr_matches_spread_of_repeats():
    lo, hi = _f64(A), _f64(B)
    reduced = TruncatedNormal(_f64(A), _f64(3.0), A, B)
    q = _ScipyTruncNormal(-14.0, 2.0, A, B, seed=4)  # one generator, fresh draws each call
    ests, ses = [], []
    for _ in range(40):
        e, s = delta_f_monte_carlo(q, Uniform(lo, hi), reduced, 2000, return_stderr=True)
        ests.append(float(e))
        ses.append(float(s))
    ratio = np.std(ests, ddof=1) / np.mean(ses)
    assert 0.7 < ratio < 1.4


def test_monte_carlo_batched_and_validated():
    lo, hi = torch.full((3,), A, dtype=torch.float64), torch.full((3,), B, dtype=torch.float64)
    est = delta_f_monte_carlo(Uniform(lo, hi), Uniform(lo, hi), Uniform(lo, hi), 100)
    assert est.shape == (3,) and est.dtype == torch.float64
    torch.testing.assert_close(est, torch.zeros(3, dtype=torch.float64))  # p~ = p gives dF = 0
    with pytest.raises(ValueError, match="num_samples"):
        delta_f_monte_carlo(Uniform(lo, hi), Uniform(lo, hi), Uniform(lo, hi), 0)
    # A theta-space posterior against a z-space prior: samples fall outside the prior's support.
    with pytest.raises(ValueError, match="support"):
        delta_f_monte_carlo(LogUniform(_f64(A), _f64(B)), Uniform(_f64(A), _f64(B)), Uniform(_f64(A), _f64(B)), 100)
    # A reduced prior disjoint from the posterior gives dF = -inf, not an error.
    far = delta_f_monte_carlo(Uniform(_f64(A), _f64(-10.0)), Uniform(_f64(A), _f64(B)),
                              Uniform(_f64(-5.0), _f64(B)), 100)
    assert float(far) == -math.inf


# ---------------------------------------------------------------------------------------------
# grid, signs and decision rule


def _grid(n: int = 1001):
    loc = torch.linspace(A - 5, B + 5, n, dtype=torch.float64)
    log_scale = torch.linspace(-20.0, 5.0, n, dtype=torch.float64)
    return loc[:, None], log_scale.exp()[None, :]


def test_finite_on_the_whole_grid():
    loc, scale = _grid()
    assert torch.isfinite(delta_f_log_normal(loc, scale)).all()
    for bits in (8, 4):
        out = delta_f_log_uniform(loc, scale, reduced_high=bits_to_log_bound(bits))
        assert out.shape == (1001, 1001) and out.dtype == torch.float64
        assert torch.isfinite(out).all()
    # a' = log 2^-23 drives dF very negative for posteriors piled at a, but stays finite.
    assert torch.isfinite(delta_f_log_uniform(loc, scale, reduced_low=bits_to_log_bound(23))).all()


def test_bmrs_n_signs():
    small = math.exp(-15)
    at_low = float(delta_f_log_normal(A, small))
    below_low = float(delta_f_log_normal(A - 3, small))
    at_high = float(delta_f_log_normal(B, small))
    assert at_low > 10 and below_low > 10  # collapsed onto the reduced prior: prune
    assert at_high < -1e10  # sure the structure is on: keep
    # Prune decisions flip exactly once along loc for a fixed moderate scale.
    locs = torch.linspace(A - 5, B + 5, 3001, dtype=torch.float64)
    prune = (delta_f_log_normal(locs, 1.0) >= 0).numpy()
    assert prune[0] and not prune[-1] and np.count_nonzero(np.diff(prune)) == 1


def test_bmrs_u_sign_is_posterior_mass_against_prior_mass():
    rng = np.random.default_rng(5)
    n = 400
    loc = rng.uniform(A - 5, B + 5, n)
    scale = np.exp(rng.uniform(-4.0, 2.5, n))
    bits = rng.choice([2, 4, 8, 12], n)
    b2 = -bits * math.log(2.0)
    alpha, beta = (A - loc) / scale, (B - loc) / scale
    mass = scipy.stats.truncnorm.cdf(b2, alpha, beta, loc=loc, scale=scale)  # a' = a
    prior_mass = (b2 - A) / (B - A)
    clear = np.abs(mass - prior_mass) > 1e-9 * prior_mass
    df = delta_f_log_uniform(torch.tensor(loc), torch.tensor(scale), reduced_high=torch.tensor(b2))
    prune = df.numpy() >= 0
    assert clear.sum() > 300 and 0.2 < prune.mean() < 0.8
    np.testing.assert_array_equal(prune[clear], (mass >= prior_mass)[clear])


# ---------------------------------------------------------------------------------------------
# the authors' missing -0.5 log(2 pi)


def _authors_bmrs_n(loc, scale, rl=A, rs=1e-6, a=A, b=B) -> float:
    """The published code's dF_N: the same formula without the -0.5 log(2 pi) term (scipy, moderate args)."""
    def log_mass(mu, sd):
        return math.log(scipy.special.ndtr((b - mu) / sd) - scipy.special.ndtr((a - mu) / sd))

    s2 = 1.0 / (1.0 / scale**2 + 1.0 / rs**2)
    m = s2 * (loc / scale**2 + rl / rs**2)
    v = scale**2 + rs**2
    return (math.log(b - a) + log_mass(m, math.sqrt(s2)) - log_mass(loc, scale) - log_mass(rl, rs)
            - 0.5 * math.log(v) - (loc - rl) ** 2 / (2 * v))


def test_authors_variant_is_too_high_by_half_log_two_pi():
    rng = np.random.default_rng(7)
    for loc, log_scale in zip(rng.uniform(-22, -10, 20), rng.uniform(-3, 2, 20)):
        ours = float(delta_f_log_normal(loc, math.exp(log_scale)))
        assert _authors_bmrs_n(loc, math.exp(log_scale)) - ours == pytest.approx(0.918938533, abs=1e-8)
    # A structure whose exact dF is in [-0.92, 0): we keep it, the authors' rule prunes it.
    loc, scale = -16.0, 2.0
    exact = _quad_bmrs_n(loc, scale, A, 1e-6)
    assert -0.92 <= exact < 0
    assert float(delta_f_log_normal(loc, scale)) < 0 <= _authors_bmrs_n(loc, scale)


def test_the_family_member_closest_to_the_prior_is_kept_by_bmrs_n_and_pruned_by_bmrs_u():
    """Why exact BMRS_N keeps units the data do not use (the finding of the digits experiments).

    A useless structure's posterior tends to the member of the family closest to the prior: loc at
    the interval's centre, scale at the clamp e^5. BMRS_N's spike sits at the bound a, where that
    truncated normal is slightly below the uniform density, so dF_N = log((b - a) q(a)) < 0 (the
    sigma~ -> 0 limit, by scipy's truncnorm); BMRS_U-8 compares masses over [a, log 2^-8], which
    contains more than half of the interval, so the centred bump gives dF_U > 0. Any tilt of the
    posterior towards theta = 1 (a unit the network still uses a little) makes both negative.
    """
    a, b = A, B
    for loc, log_scale, n_sign, u_sign in ((-10.0, 5.0, -1, 1), (-10.0, 3.5, -1, 1), (-4.4, 5.0, -1, -1),
                                           (0.0, 3.5, -1, -1)):
        s = math.exp(log_scale)
        dist = scipy.stats.truncnorm((a - loc) / s, (b - loc) / s, loc=loc, scale=s)
        limit_n = math.log((b - a) * dist.pdf(a))
        b8 = math.log(2.0 ** -8)
        mass_u = math.log(dist.cdf(b8) / ((b8 - a) / (b - a)))
        df_n = float(delta_f_log_normal(loc, s, a, b))
        df_u = float(delta_f_log_uniform(loc, s, a, b))
        assert df_n == pytest.approx(limit_n, abs=1e-7)  # sigma~ = 1e-6 is the spike's limit
        assert df_u == pytest.approx(mass_u, rel=1e-9, abs=1e-12)
        assert np.sign(df_n) == n_sign and np.sign(df_u) == u_sign
        assert abs(df_n) < 0.2  # a near tie either way
    # the centred member at the clamp: BMRS_N misses zero by 0.0015 nats
    assert float(delta_f_log_normal(-10.0, math.exp(5.0), a, b)) == pytest.approx(-0.00151, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# API details and validation


def test_bits_to_log_bound():
    assert bits_to_log_bound(8) == pytest.approx(math.log(2.0**-8))
    assert bits_to_log_bound(2.5) == pytest.approx(math.log(2.0**-2.5))
    t = bits_to_log_bound(torch.tensor([4, 23]))
    assert t.dtype == torch.float64
    torch.testing.assert_close(t, torch.tensor([math.log(2.0**-4), math.log(2.0**-23)], dtype=torch.float64))
    for bad in (0, -1.0, torch.tensor([4.0, 0.0])):
        with pytest.raises(ValueError, match="bits"):
            bits_to_log_bound(bad)


def test_defaults_broadcasting_and_dtype():
    loc = torch.tensor([-19.0, -10.0, -1.0], dtype=torch.float32)
    out = delta_f_log_normal(loc, 0.5)
    assert out.dtype == torch.float64 and out.shape == (3,)
    torch.testing.assert_close(out, delta_f_log_normal(loc.double(), 0.5, -20.0, 0.0, -20.0, 1e-6))
    out_u = delta_f_log_uniform(loc[:, None], torch.tensor([0.1, 1.0]))
    assert out_u.shape == (3, 2)
    torch.testing.assert_close(out_u, delta_f_log_uniform(loc[:, None].double(), torch.tensor([0.1, 1.0]),
                                                          -20.0, 0.0, -20.0, -8 * math.log(2.0)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(low=0.0, high=-20.0), "low < high"),
        (dict(scale=0.0), "scale"),
        (dict(scale=torch.tensor([1.0, -1.0])), "scale"),
        (dict(reduced_scale=0.0), "reduced_scale"),
        (dict(loc=float("nan")), "loc"),
    ],
)
def test_bmrs_n_validation(kwargs, match):
    args = dict(loc=-10.0, scale=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        delta_f_log_normal(**args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(low=0.0, high=-20.0), "low < high"),
        (dict(scale=-1.0), "scale"),
        (dict(reduced_low=-21.0), "reduced_low"),
        (dict(reduced_low=-3.0, reduced_high=-4.0), "reduced_low < reduced_high"),
        (dict(reduced_high=1.0), "reduced_high <= high"),
        (dict(high=-10.0), "reduced_high"),  # default b' = log 2^-8 lies above high
        (dict(reduced_high=torch.tensor([-5.0, 0.5])), "reduced_high"),
    ],
)
def test_bmrs_u_validation(kwargs, match):
    args = dict(loc=-10.0, scale=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        delta_f_log_uniform(**args)


# ---------------------------------------------------------------------------------------------
# numerics over the whole grid, through the batched (chunked, threaded) path


def _mp_log_mass(lo, hi):
    """log(Phi(hi) - Phi(lo)) at mpmath precision, from the tail nearer to the interval."""
    if lo > 0:
        lo, hi = -hi, -lo
    return mpmath.log(mpmath.ncdf(hi) - mpmath.ncdf(lo))


def _mp_closed_n(mu, sig, rl, rs, a=A, b=B):
    """The BMRS_N formula written out in 60-digit mpmath (checks our float64 numerics)."""
    mu, sig, rl, rs = (mpmath.mpf(x) for x in (mu, sig, rl, rs))
    s2 = 1 / (1 / sig**2 + 1 / rs**2)
    s = mpmath.sqrt(s2)
    m = s2 * (mu / sig**2 + rl / rs**2)
    v = sig**2 + rs**2
    return (mpmath.log(b - a) + _mp_log_mass((a - m) / s, (b - m) / s)
            - _mp_log_mass((a - mu) / sig, (b - mu) / sig) - _mp_log_mass((a - rl) / rs, (b - rl) / rs)
            - mpmath.log(2 * mpmath.pi * v) / 2 - (mu - rl) ** 2 / (2 * v))


def _mp_closed_u(mu, sig, a2, b2, a=A, b=B):
    mu, sig, a2, b2 = (mpmath.mpf(x) for x in (mu, sig, a2, b2))
    return (mpmath.log(b - a) - mpmath.log(b2 - a2) + _mp_log_mass((a2 - mu) / sig, (b2 - mu) / sig)
            - _mp_log_mass((a - mu) / sig, (b - mu) / sig))


def test_batched_values_match_high_precision_across_the_grid():
    mpmath.mp.dps = 60
    rng = np.random.default_rng(11)
    k, copies = 160, 700  # 112000 entries: several chunks, so worker threads are exercised
    loc = rng.uniform(A - 5, B + 5, k)
    log_scale = rng.uniform(-20.0, 5.0, k)
    rs = np.where(rng.random(k) < 0.5, 1e-6, np.exp(rng.uniform(-10, 1, k)))
    rl = np.where(rng.random(k) < 0.5, A, rng.uniform(A, B, k))
    ends = np.sort(rng.uniform(A, B, (k, 2)), axis=1)
    ends[: k // 2] = [A, bits_to_log_bound(8)]

    def tiled(x):
        return torch.tensor(np.tile(x, copies))

    ours_n = delta_f_log_normal(tiled(loc), tiled(np.exp(log_scale)), A, B, tiled(rl), tiled(rs))
    ours_u = delta_f_log_uniform(tiled(loc), tiled(np.exp(log_scale)), A, B,
                                 tiled(ends[:, 0]), tiled(ends[:, 1]))
    # Every copy gets the same value, wherever its chunk fell.
    assert (ours_n.reshape(copies, k) == ours_n[:k]).all()
    assert (ours_u.reshape(copies, k) == ours_u[:k]).all()
    ref_n = np.array([float(_mp_closed_n(lc, mpmath.exp(ls), r_loc, r_scale))
                      for lc, ls, r_loc, r_scale in zip(loc, log_scale, rl, rs)])
    ref_u = np.array([float(_mp_closed_u(lc, mpmath.exp(ls), e[0], e[1]))
                      for lc, ls, e in zip(loc, log_scale, ends)])
    # Values run from ~1e19 down to O(1): relative accuracy for large ones, absolute near 0.
    for ours, ref in ((ours_n[:k].numpy(), ref_n), (ours_u[:k].numpy(), ref_u)):
        assert np.abs(ref).max() > 1e12 and np.abs(ref).min() < 1
        np.testing.assert_allclose(ours, ref, rtol=1e-13, atol=1e-12)


def test_scalar_and_tensor_arguments_mix():
    scales = torch.linspace(0.01, 5.0, 50_000, dtype=torch.float64)  # > one chunk
    mixed = delta_f_log_normal(-12.0, scales, reduced_loc=-19.0, reduced_scale=0.3)
    one_by_one = torch.stack([delta_f_log_normal(-12.0, float(x), reduced_loc=-19.0, reduced_scale=0.3)
                              for x in scales[::5000]])
    torch.testing.assert_close(mixed[::5000], one_by_one, rtol=0, atol=0)
    locs = torch.linspace(-24.0, 4.0, 50_000, dtype=torch.float64)
    mixed_u = delta_f_log_uniform(locs, 0.7, reduced_high=bits_to_log_bound(4))
    one_by_one_u = torch.stack([delta_f_log_uniform(float(x), 0.7, reduced_high=bits_to_log_bound(4))
                                for x in locs[::5000]])
    torch.testing.assert_close(mixed_u[::5000], one_by_one_u, rtol=0, atol=0)
    assert delta_f_log_normal(torch.zeros(0), 1.0).shape == (0,)


def test_parameters_in_no_graph_out():
    # Guide parameters come in requiring grad; the threaded chunks must not build a graph.
    loc = torch.nn.Parameter(torch.full((70_000,), -10.0))
    scale = torch.nn.Parameter(torch.full((70_000,), 0.5))
    for out in (delta_f_log_normal(loc, scale), delta_f_log_uniform(loc, scale)):
        assert not out.requires_grad and out.grad_fn is None and out.dtype == torch.float64
    expected = float(delta_f_log_normal(-10.0, 0.5))
    assert (delta_f_log_normal(loc, scale) == expected).all()
