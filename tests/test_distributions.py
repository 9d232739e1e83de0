"""TruncatedNormal, TruncatedLogNormal and LogUniform against independent computations.

References: scipy quadrature in the offset variable u = z - c around c = clip(loc, low, high)
(so scales down to e^-20 are resolvable), mpmath for the reparameterisation gradients, scipy's
Kolmogorov-Smirnov test for samples, and Pyro's own ELBO machinery for the KL registration.
"""

from __future__ import annotations

import math
import warnings

import mpmath as mp
import numpy as np
import pyro
import pyro.distributions as pdist
import pytest
import torch
from scipy import integrate, stats

from bmrs_pyro.distributions import LogUniform, TruncatedLogNormal, TruncatedNormal

F64 = torch.float64
LOW, HIGH = -20.0, 0.0


# --------------------------------------------------------------------------------------------
# Independent reference: quadrature in the offset variable
# --------------------------------------------------------------------------------------------


def quad_reference(loc: float, scale: float, low: float = LOW, high: float = HIGH) -> dict:
    """Moments of the truncated normal and log-normal by scipy.integrate.quad.

    With c = clip(loc, low, high) and u = z - c the unnormalised density is
    exp(-u (u + 2 (c - loc)) / (2 scale^2)), which is 1 at u = 0 and decays over
    min(scale, scale^2/|c - loc|): integrating over 60 such lengths resolves any scale.
    theta moments use expm1(u) so that E[theta] - e^c keeps its digits.
    """
    c = min(max(loc, low), high)
    length = scale if c == loc else min(scale, scale * scale / abs(c - loc))
    lo_u, hi_u = max(low - c, -60.0 * length), min(high - c, 60.0 * length)

    def log_f(u: float) -> float:
        return -u * (u + 2.0 * (c - loc)) / (2.0 * scale * scale)

    def integral(fn) -> float:
        points = [0.0] if lo_u < 0.0 < hi_u else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", integrate.IntegrationWarning)
            value, _ = integrate.quad(
                lambda u: fn(u) * math.exp(log_f(u)), lo_u, hi_u,
                epsabs=0.0, epsrel=1e-13, limit=400, points=points,
            )
        return value

    norm = integral(lambda u: 1.0)
    mu = integral(lambda u: u) / norm
    var = integral(lambda u: (u - mu) ** 2) / norm
    entropy = math.log(norm) - integral(log_f) / norm
    m_exp = integral(math.expm1) / norm
    v_exp = integral(lambda u: (math.expm1(u) - m_exp) ** 2) / norm
    e_theta = math.exp(c) * (1.0 + m_exp)
    var_theta = math.exp(2.0 * c) * v_exp
    return {
        "mean": c + mu,
        "variance": var,
        "entropy": entropy,
        "kl": math.log(high - low) - entropy,
        "theta_mean": e_theta,
        "theta_variance": var_theta,
        "snr": e_theta / math.sqrt(var_theta),
        "theta_entropy": entropy + c + mu,
    }


def computed(loc: torch.Tensor, scale: torch.Tensor) -> dict:
    q = TruncatedLogNormal(loc, scale, LOW, HIGH)
    return {
        "mean": q.log_theta.mean,
        "variance": q.log_theta.variance,
        "entropy": q.log_theta.entropy(),
        "kl": torch.distributions.kl_divergence(q, LogUniform(LOW, HIGH)),
        "theta_mean": q.mean,
        "theta_variance": q.variance,
        "snr": q.signal_to_noise,
        "theta_entropy": q.entropy(),
    }


def grid(n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """loc in [low-5, high+5] x log scale in [-20, 5], n x n points (edges included)."""
    loc = torch.linspace(LOW - 5.0, HIGH + 5.0, n, dtype=dtype)
    log_scale = torch.linspace(-20.0, 5.0, n, dtype=dtype)
    return torch.meshgrid(loc, log_scale, indexing="ij")


# --------------------------------------------------------------------------------------------
# Finite everywhere on the project's grid
# --------------------------------------------------------------------------------------------


def _check_grid_finite(n: int, dtype: torch.dtype, rows_per_call: int) -> None:
    """Every statistic, sample and gradient finite on the n x n grid.

    Each quantity is one vectorised call over ``rows_per_call`` x n points (the full grid at
    once would hold several GB of autograd graph).
    """
    loc_all, log_scale_all = grid(n, dtype)
    for start in range(0, n, rows_per_call):
        rows = slice(start, start + rows_per_call)
        _check_block_finite(loc_all[rows], log_scale_all[rows], dtype)


def _check_block_finite(loc: torch.Tensor, log_scale: torch.Tensor, dtype: torch.dtype) -> None:
    loc = loc.clone().requires_grad_()
    log_scale = log_scale.clone().requires_grad_()
    q = TruncatedLogNormal(loc, log_scale.exp(), LOW, HIGH)
    tn = q.log_theta
    kl = torch.distributions.kl_divergence(q, LogUniform(LOW, HIGH))
    z = tn.rsample()
    theta = q.rsample()
    values = {
        "kl": kl,
        "theta_mean": q.mean,
        "theta_variance": q.variance,
        "snr": q.signal_to_noise,
        "theta_entropy": q.entropy(),
        "z_mean": tn.mean,
        "z_variance": tn.variance,
        "z_entropy": tn.entropy(),
        "log_prob_theta_at_mean": q.log_prob(q.mean),
        "log_prob_z_at_mean": tn.log_prob(tn.mean),
        "log_prob_z_at_sample": tn.log_prob(z),
        "log_prob_theta_at_sample": q.log_prob(theta),
        "cdf": tn.cdf(tn.mean),
        "icdf": tn.icdf(torch.full_like(loc, 0.3)),
        "rsample": z,
    }
    for name, target in (("kl", kl), ("rsample", z), ("rsample_theta", theta)):
        g_loc, g_scale = torch.autograd.grad(target.sum(), [loc, log_scale], retain_graph=True)
        values[f"d{name}/dloc"] = g_loc
        values[f"d{name}/dlogscale"] = g_scale
    for name, value in values.items():
        assert value.dtype == dtype, name
        bad = ~torch.isfinite(value)
        assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values, e.g. at " + str(
            [(float(loc[i, j]), float(log_scale[i, j])) for i, j in bad.nonzero()[:3].tolist()]
        )
    # Statistics stay inside the support.
    assert ((tn.mean >= LOW) & (tn.mean <= HIGH)).all()
    assert ((z >= LOW) & (z <= HIGH)).all()
    assert (values["snr"] > 0).all() and (kl >= 0).all()


@pytest.fixture
def one_thread():
    """Element-wise work on a shared 2-core machine: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_on_coarse_grid(dtype: torch.dtype):
    _check_grid_finite(201, dtype, rows_per_call=201)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_on_full_1001_grid(dtype: torch.dtype):
    _check_grid_finite(1001, dtype, rows_per_call=50)


# --------------------------------------------------------------------------------------------
# Exact: statistics against quadrature
# --------------------------------------------------------------------------------------------


def _accuracy_points() -> list[tuple[float, float]]:
    rng = np.random.default_rng(20240611)
    points = [(float(l), float(s)) for l, s in zip(rng.uniform(-25, 5, 200), rng.uniform(-20, 5, 200))]
    edges = [-25.0, -20.0, -19.9, -10.0, -0.1, 0.0, 5.0]
    points += [(l, s) for l in edges for s in (-20.0, -10.0, -2.3, 0.0, 5.0)]
    return points


def test_statistics_match_quadrature():
    points = _accuracy_points()
    loc = torch.tensor([p[0] for p in points], dtype=F64)
    scale = torch.exp(torch.tensor([p[1] for p in points], dtype=F64))
    got = computed(loc, scale)
    failures = []
    for i, (l, _) in enumerate(points):
        ref = quad_reference(l, float(scale[i]))
        for name, value in ref.items():
            err = abs(float(got[name][i]) - value)
            # 1e-6 relative; the tiny absolute floor only matters where an entropy crosses 0.
            if not err <= 1e-6 * abs(value) + 1e-12:
                failures.append((name, points[i], float(got[name][i]), value))
    assert not failures, failures[:5]


@pytest.mark.parametrize("low,high", [(-1.0, 0.0), (-0.01, 0.0), (-5.0, 5.0), (2.0, 3.0)])
def test_statistics_match_quadrature_for_other_bounds(low: float, high: float):
    """Short intervals relative to the scale take the nearly-uniform quadrature path."""
    width = high - low
    cases = [(low + 0.3 * width, 0.1 * width), (high + 2 * width, 0.5 * width), (low - 3.0, 1e-3),
             (high + 1.0, 30.0), (0.5 * (low + high), 1e3 * width), (low - 50.0 * width, 5.0 * width)]
    loc = torch.tensor([c[0] for c in cases], dtype=F64)
    scale = torch.tensor([c[1] for c in cases], dtype=F64)
    q = TruncatedLogNormal(loc, scale, low, high)
    got = {
        "mean": q.log_theta.mean, "variance": q.log_theta.variance, "entropy": q.log_theta.entropy(),
        "kl": torch.distributions.kl_divergence(q, LogUniform(low, high)), "theta_mean": q.mean,
        "theta_variance": q.variance, "snr": q.signal_to_noise, "theta_entropy": q.entropy(),
    }
    for i, (l, sc) in enumerate(cases):
        ref = quad_reference(l, sc, low, high)
        for name, value in ref.items():
            # The reference forms KL as log(width) - entropy: good to ~1e-15 absolute only.
            assert float(got[name][i]) == pytest.approx(value, rel=1e-6, abs=1e-12), (name, l, sc)


def test_deep_tail_corner_values():
    """loc = high + 5, scale = e^-20: the exponential-tail limit, known in closed form."""
    scale = math.exp(-20.0)
    x = 5.0 / scale  # distance to the bound in scales
    tn = TruncatedNormal(torch.tensor(5.0, dtype=F64), torch.tensor(scale, dtype=F64), LOW, HIGH)
    q = TruncatedLogNormal(torch.tensor(5.0, dtype=F64), torch.tensor(scale, dtype=F64), LOW, HIGH)
    # z = high - scale * v with v ~ Exp(x) up to O(1/x^2): mean, variance, entropy.
    assert float(tn.mean) == pytest.approx(-scale / x, rel=1e-12)
    assert float(tn.variance) == pytest.approx((scale / x) ** 2, rel=1e-12)
    assert float(tn.entropy()) == pytest.approx(1.0 + math.log(scale / x), rel=1e-12)
    assert float(q.signal_to_noise) == pytest.approx(x / scale, rel=1e-9)


def _composite_gauss(fn, lo: float, hi: float, split: float | None, panels: int = 200) -> float:
    """Integral of a vectorised fn over [lo, hi] by 20-point Gauss-Legendre on equal panels
    (on each side of ``split``, where the density may have its peak)."""
    nodes, weights = np.polynomial.legendre.leggauss(20)
    pieces = [(lo, split), (split, hi)] if split is not None and lo < split < hi else [(lo, hi)]
    total = 0.0
    for a, b in pieces:
        edges = np.linspace(a, b, panels + 1)
        half = (edges[1:] - edges[:-1])[:, None] / 2.0
        x = (edges[:-1, None] + half) + half * nodes[None, :]
        total += float((fn(torch.from_numpy(x)).numpy() * half * weights[None, :]).sum())
    return total


@pytest.mark.parametrize(
    "loc,scale",
    [(-10.0, 1.0), (-3.0, 0.05), (0.0, math.exp(-5)), (2.0, 0.3), (-22.0, 0.5), (-10.0, 100.0),
     (4.0, 1e-3)],
)
def test_log_prob_integrates_to_one(loc: float, scale: float):
    tn = TruncatedNormal(torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64), LOW, HIGH)
    q = TruncatedLogNormal(torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64), LOW, HIGH)
    c = min(max(loc, LOW), HIGH)
    length = scale if c == loc else min(scale, scale * scale / abs(c - loc))
    lo, hi = max(LOW, c - 60 * length), min(HIGH, c + 60 * length)
    total_z = _composite_gauss(lambda z: tn.log_prob(z).exp(), lo, hi, c)
    # theta = e^z: integrate the theta density over theta, written as an integral over z.
    total_t = _composite_gauss(lambda z: (q.log_prob(z.exp()) + z).exp(), lo, hi, c)
    assert total_z == pytest.approx(1.0, abs=1e-9)
    assert total_t == pytest.approx(1.0, abs=1e-9)
    # And the density against the textbook formula where that is safe to evaluate.
    if LOW < loc < HIGH and scale > 0.01:
        ref = stats.truncnorm((LOW - loc) / scale, (HIGH - loc) / scale, loc=loc, scale=scale)
        z = torch.linspace(lo, hi, 7, dtype=F64)
        np.testing.assert_allclose(tn.log_prob(z).numpy(), ref.logpdf(z.numpy()), rtol=1e-10)


def test_log_normalizer_matches_mpmath():
    for loc, scale in [(-10.0, 1.0), (5.0, math.exp(-20)), (-25.0, 0.01), (-3.0, 0.3)]:
        tn = TruncatedNormal(torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64), LOW, HIGH)
        with mp.workdps(80):
            a, b = (LOW - mp.mpf(loc)) / scale, (HIGH - mp.mpf(loc)) / scale
            ref = mp.log(mp.ncdf(-a) - mp.ncdf(-b)) if a + b > 0 else mp.log(mp.ncdf(b) - mp.ncdf(a))
        assert float(tn.log_normalizer) == pytest.approx(float(ref), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

def _numpy_cdf(dist):
    """The distribution's cdf as a numpy callable, for scipy.stats.kstest."""
    return lambda v: dist.cdf(torch.from_numpy(np.asarray(v))).numpy()


KS_POINTS = [
    (-10.0, 1.0),  # ordinary, inside
    (-1.0, 2.0),  # loc inside, truncated both sides
    (0.0, math.exp(-5)),  # the guide's initial posterior: loc on the bound
    (3.0, 1.0),  # outside, closed-form inverse
    (5.0, math.exp(-20)),  # outside, deep tail, Newton inverse (x ~ 2.4e9)
    (-25.0, 1e-3),  # below low, deep tail (x = 5000)
    (-10.0, math.exp(5)),  # nearly uniform
]


@pytest.mark.parametrize("loc,scale", KS_POINTS)
def test_samples_pass_kolmogorov_smirnov(loc: float, scale: float):
    torch.manual_seed(0)
    tn = TruncatedNormal(torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64), LOW, HIGH)
    q = TruncatedLogNormal(torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64), LOW, HIGH)
    z = tn.sample((4000,))
    theta = q.sample((4000,))
    assert stats.kstest(z.numpy(), _numpy_cdf(tn)).pvalue > 1e-3
    if float(tn.variance) ** 0.5 > 1e-12:  # below that theta = e^z rounds to a single double
        assert stats.kstest(theta.numpy(), _numpy_cdf(q)).pvalue > 1e-3


def test_samples_match_scipy_truncnorm_in_ordinary_regime():
    torch.manual_seed(1)
    tn = TruncatedNormal(torch.tensor(-3.0, dtype=F64), torch.tensor(2.0, dtype=F64), LOW, HIGH)
    ref = stats.truncnorm((LOW + 3.0) / 2.0, (HIGH + 3.0) / 2.0, loc=-3.0, scale=2.0)
    assert stats.kstest(tn.sample((4000,)).numpy(), ref.cdf).pvalue > 1e-3


@pytest.mark.parametrize("loc,scale", KS_POINTS + [(40.0, 1.0), (-60.0, 1.0), (0.01, 1e-4)])
def test_cdf_inverts_icdf(loc: float, scale: float):
    tn = TruncatedNormal(torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64), LOW, HIGH)
    p = torch.tensor([0.0, 1e-12, 1e-6, 0.01, 0.3, 0.5, 0.7, 0.99, 1 - 1e-6, 1.0], dtype=F64)
    z = tn.icdf(p)
    assert ((z >= LOW) & (z <= HIGH)).all() and (z.diff() >= 0).all()
    assert float(z[0]) == LOW and float(z[-1]) == HIGH
    q = TruncatedLogNormal(torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64), LOW, HIGH)
    theta = q.icdf(p)
    for dist, value in ((tn, z), (q, theta)):
        # A value can only be as exact as the double that holds it: allow the cdf mass of a
        # few ulps around it (matters where samples crowd at a bound, e.g. z = -20 + 1e-19).
        resolution = dist.log_prob(value).exp() * 8.0 * torch.finfo(F64).eps * value.abs()
        err = (dist.cdf(value) - p).abs()[1:-1]
        assert (err <= 1e-9 * p[1:-1] + 1e-14 + resolution[1:-1]).all(), (err, resolution)


# --------------------------------------------------------------------------------------------
# Reparameterisation gradients
# --------------------------------------------------------------------------------------------


def _implicit_gradient(loc: float, scale: float, u: float) -> tuple[float, float]:
    """dz/dloc and dz/dscale of z = F^-1(u) by implicit differentiation, in mpmath.

    F(z) = (Phi(xi) - Phi(alpha)) / Z with xi = (z - loc)/scale gives
    dz/dloc = 1 - (1-u) phi(alpha)/phi(xi) - u phi(beta)/phi(xi) and
    dz/dscale = xi - (1-u) alpha phi(alpha)/phi(xi) - u beta phi(beta)/phi(xi).
    """
    with mp.workdps(80):
        loc_m, s, u_m = mp.mpf(loc), mp.mpf(scale), mp.mpf(u)
        a, b = (LOW - loc_m) / s, (HIGH - loc_m) / s

        def cdf(z):
            xi = (z - loc_m) / s
            if a + b > 0:
                return (mp.ncdf(-a) - mp.ncdf(-xi)) / (mp.ncdf(-a) - mp.ncdf(-b))
            return (mp.ncdf(xi) - mp.ncdf(a)) / (mp.ncdf(b) - mp.ncdf(a))

        lo, hi = mp.mpf(LOW), mp.mpf(HIGH)
        for _ in range(260):  # bisection to ~1e-78
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cdf(mid) < u_m else (lo, mid)
        xi = ((lo + hi) / 2 - loc_m) / s
        ra, rb = mp.exp((xi - a) * (xi + a) / 2), mp.exp((xi - b) * (xi + b) / 2)
        d_loc = 1 - (1 - u_m) * ra - u_m * rb
        d_scale = xi - (1 - u_m) * a * ra - u_m * b * rb
        return float(d_loc), float(d_scale)


@pytest.mark.parametrize(
    "loc,scale,u",
    [
        (-10.0, 1.0, 0.3),
        (0.0, math.exp(-5), 0.5),
        (1.0, math.exp(-5), 0.2),  # x ~ 148: Newton inverse
        (1.0, math.exp(-5), 1e-6),
        (5.0, math.exp(-20), 0.7),  # x ~ 2.4e9: dz/dloc ~ 6e-20
        (-25.0, 1e-3, 0.4),
        (-19.5, 0.3, 0.999),
        (-10.0, math.exp(5), 0.1),
        (2.0, 3.0, 0.6),
    ],
)
def test_rsample_gradient_is_exact_implicit_reparameterisation(loc: float, scale: float, u: float):
    loc_t = torch.tensor(loc, dtype=F64, requires_grad=True)
    scale_t = torch.tensor(scale, dtype=F64, requires_grad=True)
    z = TruncatedNormal(loc_t, scale_t, LOW, HIGH).icdf(torch.tensor(u, dtype=F64))
    g_loc, g_scale = torch.autograd.grad(z, [loc_t, scale_t])
    ref_loc, ref_scale = _implicit_gradient(loc, scale, u)
    assert float(g_loc) == pytest.approx(ref_loc, rel=1e-9, abs=1e-300)
    assert float(g_scale) == pytest.approx(ref_scale, rel=1e-9, abs=1e-300)


def test_rsample_gradient_matches_finite_differences_with_fixed_noise():
    torch.manual_seed(2)
    loc = torch.tensor([-10.0, -0.5, 0.7, -21.0], dtype=F64)
    scale = torch.tensor([1.0, 0.3, 0.2, 0.8], dtype=F64)
    u = torch.rand(4, dtype=F64)
    loc_r, scale_r = loc.clone().requires_grad_(), scale.clone().requires_grad_()
    z = TruncatedNormal(loc_r, scale_r, LOW, HIGH).icdf(u)
    g_loc, g_scale = torch.autograd.grad(z.sum(), [loc_r, scale_r])
    h = 1e-6
    def sample(l: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return TruncatedNormal(l, s, LOW, HIGH).icdf(u)

    fd_loc = (sample(loc + h, scale) - sample(loc - h, scale)) / (2 * h)
    fd_scale = (sample(loc, scale + h) - sample(loc, scale - h)) / (2 * h)
    torch.testing.assert_close(g_loc, fd_loc, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_scale, fd_scale, rtol=1e-6, atol=1e-9)


def test_gradients_reach_loc_and_scale_in_float32():
    loc = torch.tensor([-3.0, 0.0, 2.0], requires_grad=True)
    log_scale = torch.tensor([-1.0, -5.0, -2.0], requires_grad=True)
    q = TruncatedLogNormal(loc, log_scale.exp(), LOW, HIGH)
    theta = q.rsample((5,))
    kl = torch.distributions.kl_divergence(q, LogUniform(LOW, HIGH))
    assert theta.dtype == torch.float32 and kl.dtype == torch.float32
    (theta.sum() + kl.sum()).backward()
    assert torch.isfinite(loc.grad).all() and (loc.grad != 0).all()
    assert torch.isfinite(log_scale.grad).all() and (log_scale.grad != 0).all()


def test_kl_gradient_matches_finite_differences():
    loc = torch.tensor([-10.0, -0.5, 1.0, -21.0], dtype=F64)
    scale = torch.tensor([1.0, 0.3, 0.01, 0.8], dtype=F64)
    p = LogUniform(LOW, HIGH)

    def kl(l, s):
        return torch.distributions.kl_divergence(TruncatedLogNormal(l, s, LOW, HIGH), p)

    loc_r, scale_r = loc.clone().requires_grad_(), scale.clone().requires_grad_()
    g_loc, g_scale = torch.autograd.grad(kl(loc_r, scale_r).sum(), [loc_r, scale_r])
    h = 1e-6
    fd_loc = (kl(loc + h, scale) - kl(loc - h, scale)) / (2 * h)
    fd_scale = (kl(loc, scale * (1 + h)) - kl(loc, scale * (1 - h))) / (2 * h * scale)
    torch.testing.assert_close(g_loc, fd_loc, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_scale, fd_scale, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Shapes, dtypes, validation
# --------------------------------------------------------------------------------------------


def test_broadcasting_expand_and_shapes():
    loc = torch.zeros(3, 1)
    scale = torch.full((4,), 0.5)
    high = torch.tensor([0.0, 1.0, 2.0, 3.0])
    for dist in (TruncatedNormal(loc, scale, -20.0, high), TruncatedLogNormal(loc, scale, -20.0, high)):
        assert dist.batch_shape == (3, 4) and dist.event_shape == ()
        sample = dist.rsample((2,))
        assert sample.shape == (2, 3, 4)
        assert dist.log_prob(sample).shape == (2, 3, 4)
        assert dist.mean.shape == dist.variance.shape == dist.entropy().shape == (3, 4)
        big = dist.expand((5, 3, 4))
        assert type(big) is type(dist) and big.batch_shape == (5, 3, 4)
        torch.testing.assert_close(big.mean[2], dist.mean)
        assert big.sample().shape == (5, 3, 4)
        assert dist.to_event(1).log_prob(sample).shape == (2, 3)
    lu = LogUniform(torch.tensor([-20.0, -5.0]), 0.0)
    assert lu.expand((3, 2)).sample().shape == (3, 2)
    assert TruncatedLogNormal(0.0, 1.0).signal_to_noise.shape == ()


def test_dtype_is_preserved():
    for dtype in (torch.float32, torch.float64):
        q = TruncatedLogNormal(torch.zeros(2, dtype=dtype), torch.ones(2, dtype=dtype), LOW, HIGH)
        for value in (q.mean, q.variance, q.entropy(), q.signal_to_noise, q.rsample(), q.log_normalizer):
            assert value.dtype == dtype


def test_float32_samples_satisfy_validation_at_the_bounds():
    pyro.enable_validation(True)
    loc, scale = torch.tensor([-25.0, 5.0]), torch.tensor([1e-3, 1e-3])
    q = TruncatedLogNormal(loc, scale, LOW, HIGH, validate_args=True)
    theta = q.sample((100,))
    assert torch.isfinite(q.log_prob(theta)).all()
    assert torch.isfinite(q.log_prob(q.mean)).all()


def test_log_prob_outside_support():
    tn = TruncatedNormal(torch.tensor(-1.0), torch.tensor(1.0), LOW, HIGH, validate_args=False)
    assert float(tn.log_prob(torch.tensor(0.5))) == -math.inf
    assert float(tn.cdf(torch.tensor(1.0))) == 1.0 and float(tn.cdf(torch.tensor(-30.0))) == 0.0
    with pytest.raises(ValueError, match="support"):
        strict = TruncatedNormal(torch.tensor(-1.0), torch.tensor(1.0), LOW, HIGH, validate_args=True)
        strict.log_prob(torch.tensor(0.5))


@pytest.mark.parametrize("validate", [None, False, True])
def test_bad_parameters_raise_value_error_always(validate):
    with pytest.raises(ValueError, match=r"low \(0\.0\) must be < high \(-20\.0\)"):
        TruncatedNormal(0.0, 1.0, 0.0, -20.0, validate_args=validate)
    with pytest.raises(ValueError, match=r"low \(0\.0\) must be < high \(0\.0\)"):
        TruncatedLogNormal(torch.zeros(3), torch.ones(3), 0.0, 0.0, validate_args=validate)
    with pytest.raises(ValueError, match=r"scale \(-1\.0\) must be > 0"):
        TruncatedLogNormal(torch.zeros(2), torch.tensor([1.0, -1.0]), validate_args=validate)
    with pytest.raises(ValueError, match=r"scale \(0\.0\) must be > 0"):
        TruncatedNormal(0.0, 0.0, validate_args=validate)
    with pytest.raises(ValueError, match=r"low \(1\.0\) must be < high \(-1\.0\)"):
        LogUniform(1.0, -1.0, validate_args=validate)


# --------------------------------------------------------------------------------------------
# LogUniform
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("low,high", [(-20.0, 0.0), (-1e-4, 0.0), (-3.0, 2.0)])
def test_log_uniform_against_quadrature_and_ks(low: float, high: float):
    lu = LogUniform(torch.tensor(low, dtype=F64), torch.tensor(high, dtype=F64))
    a, b = math.exp(low), math.exp(high)
    dens = lambda t: math.exp(float(lu.log_prob(torch.tensor(t, dtype=F64))))  # noqa: E731
    opts = dict(epsabs=0.0, epsrel=1e-12, limit=200)
    assert integrate.quad(dens, a, b, **opts)[0] == pytest.approx(1.0, rel=1e-9)
    # Moments in the log variable, where the integrand is smooth.
    mean = integrate.quad(lambda u: math.exp(u), low, high, **opts)[0] / (high - low)
    var = integrate.quad(lambda u: (math.exp(u) - mean) ** 2, low, high, **opts)[0] / (high - low)
    assert float(lu.mean) == pytest.approx(mean, rel=1e-10)
    assert float(lu.variance) == pytest.approx(var, rel=1e-6)
    entropy = integrate.quad(lambda u: (math.log(high - low) + u) / (high - low), low, high, **opts)[0]
    assert float(lu.entropy()) == pytest.approx(entropy, rel=1e-10, abs=1e-12)
    torch.manual_seed(3)
    sample = lu.sample((3000,))
    assert stats.kstest(sample.numpy(), _numpy_cdf(lu)).pvalue > 1e-3
    p = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    torch.testing.assert_close(lu.cdf(lu.icdf(p)), p)


def test_log_uniform_variance_for_a_short_interval():
    # Var = e^{2 mid} w^2/12 (1 + O(w^2)); the direct E[theta^2] - E[theta]^2 loses it all.
    w = 1e-6
    lu = LogUniform(torch.tensor(-w, dtype=F64), torch.tensor(0.0, dtype=F64))
    assert float(lu.variance) == pytest.approx(math.exp(-w) * w * w / 12.0, rel=1e-9)


# --------------------------------------------------------------------------------------------
# KL registration and Pyro integration
# --------------------------------------------------------------------------------------------


def test_kl_dispatch_and_bounds():
    loc, scale = torch.tensor([-3.0, 1.0], dtype=F64), torch.tensor([0.5, 0.01], dtype=F64)
    q = TruncatedLogNormal(loc, scale, LOW, HIGH)
    entropy = q.log_theta.entropy()
    kl = torch.distributions.kl_divergence(q, LogUniform(LOW, HIGH))
    torch.testing.assert_close(kl, math.log(20.0) - entropy)
    tn_kl = torch.distributions.kl_divergence(q.log_theta, torch.distributions.Uniform(LOW - 5.0, HIGH))
    torch.testing.assert_close(tn_kl, math.log(25.0) - entropy)
    # q has mass outside p's support: infinite KL.
    assert torch.isinf(torch.distributions.kl_divergence(q, LogUniform(-10.0, 0.0))).all()
    # Through Pyro's Independent wrapper.
    p_event = LogUniform(LOW, HIGH).expand([2]).to_event(1)
    kl_event = torch.distributions.kl_divergence(q.to_event(1), p_event)
    torch.testing.assert_close(kl_event, (math.log(20.0) - entropy).sum())


def test_trace_mean_field_elbo_uses_the_analytic_kl():
    loc = torch.tensor([-3.0, 0.0, 1.0, -19.0])
    scale = torch.tensor([0.5, math.exp(-5), 0.01, 2.0])

    def model():
        pyro.sample("theta", LogUniform(LOW, HIGH).expand([4]).to_event(1))

    def guide():
        pyro.sample("theta", TruncatedLogNormal(loc, scale, LOW, HIGH).to_event(1))

    mean_field = pyro.infer.TraceMeanField_ELBO().differentiable_loss(model, guide)
    by_hand = (math.log(20.0) - TruncatedNormal(loc.double(), scale.double(), LOW, HIGH).entropy()).sum()
    assert float(mean_field) == pytest.approx(float(by_hand), rel=1e-6)
    # Trace_ELBO estimates the same KL by Monte Carlo, through log_prob and rsample.
    pyro.set_rng_seed(0)
    mc = pyro.infer.Trace_ELBO(num_particles=4000, vectorize_particles=True).loss(model, guide)
    assert mc == pytest.approx(float(by_hand), abs=0.05)


def test_fast_sampler_matches_the_general_inverse_cdf_and_its_gradients():
    """The per-structure-constant sampler equals the offset-form inverse cdf at the same u."""
    from bmrs_pyro.distributions import _Core, _fast_icdf, _fast_sample_ok

    gen = torch.Generator().manual_seed(3)
    loc = (torch.rand(300, generator=gen, dtype=torch.float64) * 26 - 23).requires_grad_()
    scale = torch.exp(torch.rand(300, generator=gen, dtype=torch.float64) * 9 - 6).requires_grad_()
    low, high = torch.tensor(-20.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    ok = _fast_sample_ok(loc.detach(), scale.detach(), low, high)
    assert 50 < int(ok.sum()) < 300  # both kinds of structures are present
    u = torch.rand(40, 300, generator=gen, dtype=torch.float64)
    flip = (low - loc.detach()) / scale.detach() + (high - loc.detach()) / scale.detach() > 0
    fast = _fast_icdf(loc, scale, low, high, u)[:, ok]
    general = _Core(loc, scale, low, high).icdf(torch.where(flip, 1 - u, u))[:, ok]
    torch.testing.assert_close(fast, general, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad(fast.sum(), [loc, scale])
    g_general = torch.autograd.grad(general.sum(), [loc, scale])
    for a, b in zip(g_fast, g_general):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_expanded_and_mixed_sampling_stays_in_support_and_is_distributed_right():
    from scipy import stats

    loc = torch.tensor([0.0, -3.0, 2.0, -25.0], dtype=torch.float64)  # two fast, two tail
    scale = torch.tensor([0.5, 1.0, 0.05, 0.2], dtype=torch.float64)
    q = TruncatedNormal(loc, scale, -20.0, 0.0)
    z = q.expand((3000, 4)).rsample()
    assert z.shape == (3000, 4)
    assert bool(((z >= -20) & (z <= 0)).all())
    for j in range(4):
        ref = stats.truncnorm((-20 - loc[j].item()) / scale[j].item(), -loc[j].item() / scale[j].item(),
                              loc=loc[j].item(), scale=scale[j].item())
        assert stats.kstest(z[:, j].numpy(), ref.cdf).pvalue > 1e-3
