"""The CPU one-pass step of float32 models (issue 15): the KL and theta of every site from one
set of float64 constants, the KL's closed-form gradient.

The KL and its gradient are checked against scipy (the truncated normal's entropy, finite
differences) and against autograd through the careful statistics; the step as a whole against
the separate KL (:func:`kl_to_own_bounds`) and sampler (:func:`sample_sites`) it replaces, at
the same random numbers, on posteriors in the textbook regime and in the tails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from bmrs_pyro._fast_paths import _exp_bound, _fast_kl_ok, _flipped_bounds, kl_to_own_bounds, sample_sites
from bmrs_pyro._fused_step import _TextbookKL, step_kl_and_theta
from bmrs_pyro._special import ndtr
from bmrs_pyro._truncnorm import _Core

F64 = torch.float64
LOW, HIGH = -20.0, 0.0


def _textbook_kl(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """_TextbookKL on (loc, scale), its constants formed as step_kl_and_theta forms them."""
    low = torch.full_like(loc, LOW, dtype=F64)
    high = torch.full_like(loc, HIGH, dtype=F64)
    with torch.no_grad():
        flip, a, b = _flipped_bounds(loc.double(), scale.double(), low, high)
        ab = torch.stack((a, b))
        cdf = ndtr(ab)  # through erfc: relative precision in the lower tail
        e = torch.exp(-0.5 * ab * ab)
    return _TextbookKL.apply(loc, scale, a, b, torch.where(flip, -1.0, 1.0), scale.detach().double(),
                             cdf[1] - cdf[0], e, ab * e, torch.log(high - low), None)


def _scipy_kl(loc: float, scale: float) -> float:
    """log(width) - H(q) with scipy's truncated normal entropy."""
    q = stats.truncnorm((LOW - loc) / scale, (HIGH - loc) / scale, loc=loc, scale=scale)
    return math.log(HIGH - LOW) - float(q.entropy())


# Posteriors in the textbook regime: inside the interval, at either bound, wide and narrow ones.
TEXTBOOK = [(-3.0, 0.5), (-0.2, 0.05), (0.01, 0.02), (-19.5, 0.3), (-10.0, 4.0), (-1.0, 12.0), (1.5, 2.0)]


def test_textbook_kl_and_its_gradient_match_scipy_and_finite_differences():
    loc = torch.tensor([p[0] for p in TEXTBOOK], dtype=F64, requires_grad=True)
    scale = torch.tensor([p[1] for p in TEXTBOOK], dtype=F64, requires_grad=True)
    assert bool(_fast_kl_ok(*_flipped_bounds(loc.detach(), scale.detach(), torch.tensor(LOW, dtype=F64),
                                             torch.tensor(HIGH, dtype=F64))[1:], 20.0 / scale.detach()).all())
    kl = _textbook_kl(loc, scale)
    g_loc, g_scale = torch.autograd.grad(kl.sum(), [loc, scale])
    for i, (l, s) in enumerate(TEXTBOOK):
        assert float(kl[i].detach()) == pytest.approx(_scipy_kl(l, s), rel=1e-9, abs=1e-12)
        h_l, h_s = 1e-6 * max(1.0, abs(l)), 1e-6 * s
        fd_loc = (_scipy_kl(l + h_l, s) - _scipy_kl(l - h_l, s)) / (2 * h_l)
        fd_scale = (_scipy_kl(l, s + h_s) - _scipy_kl(l, s - h_s)) / (2 * h_s)
        assert float(g_loc[i]) == pytest.approx(fd_loc, rel=1e-5, abs=1e-6)
        assert float(g_scale[i]) == pytest.approx(fd_scale, rel=1e-5, abs=1e-6)


def test_textbook_kl_gradient_equals_autograd_through_the_careful_statistics_on_the_grid():
    """The closed form against autograd through _Core's KL (a different formula), float64, on the
    textbook part of the project's (loc, log scale) grid: within 4e-12 of |gradient| + 1/scale (3.8e-13 seen)."""
    loc = torch.linspace(-25.0, 5.0, 121, dtype=F64).repeat_interleave(101)
    scale = torch.linspace(-20.0, 5.0, 101, dtype=F64).repeat(121).exp()
    low, high = torch.tensor(LOW, dtype=F64), torch.tensor(HIGH, dtype=F64)
    _, a, b = _flipped_bounds(loc, scale, low, high)
    ok = _fast_kl_ok(a, b, 20.0 / scale)
    assert 0.2 < float(ok.double().mean()) < 0.9  # the grid has both regimes
    loc, scale = loc[ok].requires_grad_(), scale[ok].requires_grad_()
    ours = torch.autograd.grad(_textbook_kl(loc, scale).sum(), [loc, scale])
    careful = torch.autograd.grad(_Core(loc, scale, low, high).stats[4].sum(), [loc, scale])
    for g, ref in zip(ours, careful):
        assert bool(torch.isfinite(g).all())
        size = ref.abs() + 1.0 / scale.detach()  # the natural scale of d/dloc, d/dscale
        assert float(((g - ref).abs() / size).max()) < 4e-12


def _posteriors(kind: str, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    if kind == "textbook":
        loc = torch.rand(n, generator=gen) * 4.0 - 3.0
        scale = (torch.rand(n, generator=gen) * 6.0 - 5.0).exp()
    else:  # the whole grid: tails (loc far outside, tiny scales) and wide, flat posteriors too
        loc = torch.linspace(-25.0, 5.0, n)
        scale = torch.linspace(-20.0, 5.0, n).flip(0).exp()
    return loc.requires_grad_(), scale.requires_grad_()


@pytest.mark.parametrize("kind", ["textbook", "with_tails"])
def test_step_equals_the_separate_kl_and_sampler_at_the_same_uniforms(kind):
    loc, scale = _posteriors(kind)
    n = loc.shape[0]
    low64, high64 = torch.full((n,), LOW, dtype=F64), torch.full((n,), HIGH, dtype=F64)
    sizes = [n // 3, n - n // 3]
    torch.manual_seed(1)
    exp_bounds = (_exp_bound(low64.float()), _exp_bound(high64.float()))
    kl, theta = step_kl_and_theta(loc, scale, low64, high64, exp_bounds, sizes, 5)
    torch.manual_seed(1)
    loc64, scale64 = loc.double(), scale.double()
    flipped = _flipped_bounds(loc64, scale64, low64, high64)
    kl_ref = kl_to_own_bounds(loc64, scale64, low64, high64, flipped=flipped).float()
    theta_ref = sample_sites(loc, scale, low64.float(), high64.float(), sizes, 5, flipped=flipped)
    if kind == "with_tails":
        fast = _fast_kl_ok(flipped[1], flipped[2], 20.0 / scale64).detach()
        assert 0.1 < float(fast.double().mean()) < 0.9
    assert theta.dtype == kl.dtype == torch.float32
    assert torch.equal(theta, theta_ref)
    assert bool(((kl - kl_ref).abs() <= 4 * torch.finfo(torch.float32).eps * kl_ref.abs()).all())
    grads = torch.autograd.grad(kl.sum() + theta.sum(), [loc, scale], retain_graph=True)
    grads_ref = torch.autograd.grad(kl_ref.sum() + theta_ref.sum(), [loc, scale], retain_graph=True)
    kl_grads = torch.autograd.grad(kl.sum(), [loc, scale])
    kl_grads_ref = torch.autograd.grad(kl_ref.sum(), [loc, scale])
    for g, ref in list(zip(grads, grads_ref)) + list(zip(kl_grads, kl_grads_ref)):
        assert bool(torch.isfinite(g).all())  # the tail structures' unused textbook values stay out
        assert bool(((g - ref).abs() <= 1e-5 * (ref.abs() + 1.0)).all())


def test_step_without_a_batch_returns_the_kl_only():
    loc, scale = _posteriors("textbook", 10)
    low64, high64 = torch.full((10,), LOW, dtype=F64), torch.full((10,), HIGH, dtype=F64)
    exp_bounds = (_exp_bound(low64.float()), _exp_bound(high64.float()))
    kl, theta = step_kl_and_theta(loc, scale, low64, high64, exp_bounds, [10], None)
    assert theta is None
    expected = np.array([_scipy_kl(float(l), float(s)) for l, s in zip(loc.detach(), scale.detach())])
    assert np.allclose(kl.detach().double().numpy(), expected, rtol=1e-5)


def _two_sites_with_tails():
    """Two sites of 4 and 4 structures: the first holds a far-tail posterior (kept), a far-tail
    one to be pruned and a nearly uniform one; the second a wide posterior outside the bounds
    and one 6 scales beyond the upper bound on an interval 2 scales wide (the careful code)."""
    loc = torch.tensor([3.0, -0.5, 40.0, -9.0, -2.0, 60.0, -1.0, 60.0], requires_grad=True)
    scale = torch.tensor([0.05, 0.3, 0.01, 40.0, 0.7, 35.0, 0.5, 10.0], requires_grad=True)
    n = loc.shape[0]
    low64, high64 = torch.full((n,), LOW, dtype=F64), torch.full((n,), HIGH, dtype=F64)
    return loc, scale, low64, high64, (_exp_bound(low64.float()), _exp_bound(high64.float())), [4, 4]


def test_regimes_of_the_fixture_are_the_ones_meant():
    from bmrs_pyro._fused_step import _far_tail_regime, _quadrature_regime

    loc, scale, low64, high64, _, _ = _two_sites_with_tails()
    _, a, b = _flipped_bounds(loc.double(), scale.double(), low64, high64)
    w = 20.0 / scale.double()
    fast = _fast_kl_ok(a, b, w)
    quad = ~fast & _quadrature_regime(b, w)
    far = ~fast & ~quad & _far_tail_regime(b, w)
    assert fast.tolist() == [False, True, False, False, True, False, True, False]
    assert quad.tolist() == [False, False, False, True, False, True, False, False]
    assert far.tolist() == [True, False, True, False, False, False, False, False]  # 7: the careful code


def test_pruned_structures_take_a_stand_in_and_change_nothing_in_the_loss():
    """Pruning structure 2 (far tail): the kept structures' KL and theta are unchanged (same
    uniforms: its site still draws float64 ones for the kept tail structure 0), and the masked
    loss has the same gradients (to float32 rounding), zero for the pruned structure."""
    loc, scale, low64, high64, exp_bounds, sizes = _two_sites_with_tails()
    keep = torch.tensor([True, True, False, True, True, True, True, True])
    results = []
    for k in (None, keep):
        torch.manual_seed(2)
        kl, theta = step_kl_and_theta(loc, scale, low64, high64, exp_bounds, sizes, 6, k)
        masked = torch.where(keep, kl, 0.0).sum() + (theta * keep).sum()
        results.append((kl.detach(), theta.detach(), torch.autograd.grad(masked, [loc, scale])))
    (kl0, th0, g0), (kl1, th1, g1) = results
    assert torch.equal(kl0[keep], kl1[keep]) and torch.equal(th0[:, keep], th1[:, keep])
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=4 * torch.finfo(torch.float32).eps, atol=0.0)
        assert float(a[2]) == float(b[2]) == 0.0


def test_step_kl_in_every_regime_matches_the_careful_statistics():
    loc, scale, low64, high64, exp_bounds, sizes = _two_sites_with_tails()
    kl, _ = step_kl_and_theta(loc, scale, low64, high64, exp_bounds, sizes, None)
    careful = _Core(loc.double(), scale.double(), LOW, HIGH).stats[4]
    torch.testing.assert_close(kl, careful.float(), rtol=2 * torch.finfo(torch.float32).eps, atol=0.0)
    for g, ref in zip(torch.autograd.grad(kl.sum(), [loc, scale]),
                      torch.autograd.grad(careful.sum(), [loc, scale])):
        torch.testing.assert_close(g, ref.float(), rtol=4 * torch.finfo(torch.float32).eps, atol=1e-30)


def test_quadrature_kl_matches_the_careful_statistics_and_scipy_on_its_whole_regime():
    """The 20-point rule on wide posteriors (interval < 1 scale) whose log density varies by up
    to _QUAD_V = 8 over the interval, loc inside or far outside: float64 value and gradients
    against the careful statistics (relative 1e-12, 1e-10, absolute 2e-15 where the KL of a nearly
    uniform posterior is ~1e-7 and both sides carry double rounding), values against scipy too."""
    from bmrs_pyro._fused_step import _QUAD_V, _quadrature_kl, _quadrature_regime

    loc = torch.linspace(-300.0, 300.0, 301, dtype=F64).repeat_interleave(60)
    scale = torch.linspace(math.log(20.0), 5.0, 60, dtype=F64).exp().repeat(301)
    low, high = torch.full_like(loc, LOW), torch.full_like(loc, HIGH)
    _, a, b = _flipped_bounds(loc, scale, low, high)
    w = 20.0 / scale
    quad = ~_fast_kl_ok(a, b, w) & _quadrature_regime(b, w)
    variation = w * (b.abs() + w)
    assert int(quad.sum()) > 1000 and float(variation[quad].max()) > 0.9 * _QUAD_V  # the whole regime
    loc, scale = loc[quad].requires_grad_(), scale[quad].requires_grad_()
    kl = _quadrature_kl(loc, scale, low[quad], high[quad])
    careful = _Core(loc, scale, LOW, HIGH).stats[4]
    torch.testing.assert_close(kl, careful, rtol=1e-12, atol=2e-15)
    for g, ref in zip(torch.autograd.grad(kl.sum(), [loc, scale]), torch.autograd.grad(careful.sum(), [loc, scale])):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-14)
    for i in torch.linspace(0, loc.shape[0] - 1, 7).long().tolist():
        assert float(kl[i].detach()) == pytest.approx(_integrated_kl(float(loc[i].detach()), float(scale[i].detach())),
                                                      rel=1e-8, abs=1e-14)


def _integrated_kl(loc: float, scale: float) -> float:
    """KL(q || Uniform) = log(width) + int q log q by scipy quadrature of the density, its exponent
    shifted by its largest value on the interval (far-outside posteriors do not underflow)."""
    from scipy import integrate

    top = -0.5 * ((min(max(loc, LOW), HIGH) - loc) / scale) ** 2
    log_f = lambda z: -0.5 * ((z - loc) / scale) ** 2 - top  # noqa: E731
    mass = integrate.quad(lambda z: math.exp(log_f(z)), LOW, HIGH, epsabs=0.0, epsrel=1e-13, limit=200)[0]
    neg_entropy = integrate.quad(lambda z: math.exp(log_f(z)) / mass * (log_f(z) - math.log(mass)), LOW, HIGH,
                                 epsabs=0.0, epsrel=1e-13, limit=200)[0]
    return math.log(HIGH - LOW) + neg_entropy


def test_far_tail_kl_matches_the_careful_statistics_and_scipy_on_its_whole_regime():
    """Near bound 5 to 5e12 scales away, far bound beyond 40 / x scales, both flips, two sets
    of bounds: value (relative 1e-13) and closed-form gradients (1e-10 of |grad| + 1/scale)
    against autograd through the careful statistics; a few values against scipy quadrature."""
    from bmrs_pyro._fused_step import _FarTailKL, _far_tail_regime

    for low_, high_ in ((LOW, HIGH), (-6.0, -1.0)):
        away = torch.logspace(-3, 4, 60, dtype=F64)
        loc = torch.cat([high_ + away, low_ - away]).repeat_interleave(40)
        scale = torch.linspace(-20.0, 1.0, 40, dtype=F64).exp().repeat(120)
        low, high = torch.full_like(loc, low_), torch.full_like(loc, high_)
        flip, _, b = _flipped_bounds(loc, scale, low, high)
        far = _far_tail_regime(b, (high - low) / scale)
        assert int(far.sum()) > 3000 and bool(flip[far].any()) and bool((~flip[far]).any())
        assert float((-b[far]).min()) < 6.0 and float((-b[far]).max()) > 1e9
        loc, scale, low, high = loc[far].requires_grad_(), scale[far].requires_grad_(), low[far], high[far]
        flip, _, b = _flipped_bounds(loc.detach(), scale.detach(), low, high)
        kl = _FarTailKL.apply(loc, scale, -b, torch.where(flip, -1.0, 1.0).double(), scale.detach(),
                              torch.log(high - low), torch.ones_like(flip))
        careful = _Core(loc, scale, low, high).stats[4]
        torch.testing.assert_close(kl, careful, rtol=1e-13, atol=0.0)
        for g, ref in zip(torch.autograd.grad(kl.sum(), [loc, scale]),
                          torch.autograd.grad(careful.sum(), [loc, scale])):
            assert float(((g - ref).abs() / (ref.abs() + 1.0 / scale.detach())).max()) < 1e-10
    for loc_, scale_ in ((0.6, 0.1), (2.0, 0.25), (-21.5, 0.2)):  # x = 6, 8, 7.5
        loc = torch.tensor([loc_], dtype=F64)
        scale = torch.tensor([scale_], dtype=F64)
        flip, _, b = _flipped_bounds(loc, scale, torch.tensor(LOW, dtype=F64), torch.tensor(HIGH, dtype=F64))
        kl = _FarTailKL.apply(loc, scale, -b, torch.where(flip, -1.0, 1.0).double(), scale,
                              torch.log(torch.tensor([HIGH - LOW], dtype=F64)), torch.ones_like(flip))
        assert float(kl) == pytest.approx(_integrated_kl(loc_, scale_), rel=1e-9)
