"""The training hot path (issue 15): float32 fast sampler, textbook KL, batched sites, bypasses.

Each fast path is checked against the careful float64 code it stands in for, on the region
where it is used, to a stated tolerance, and the one-pass ELBO against Pyro's
TraceMeanField_ELBO on a zoo model (value and gradients).
"""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from scipy import stats

from _low_precision_helpers import zoo
from bmrs_pyro.distributions import (
    TruncatedLogNormal,
    _Core,
    _fast_icdf,
    _fast_kl_ok,
    _fast_sample_ok,
    _flipped_bounds,
    _kl_textbook,
    sample_sites,
)
from bmrs_pyro.elbo import MeanFieldNoiseELBO

F32, F64 = torch.float32, torch.float64
EPS32 = torch.finfo(F32).eps
LOW = torch.tensor(-20.0, dtype=F64)
HIGH = torch.tensor(0.0, dtype=F64)


def _grid(n: int = 160) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (loc, scale) over loc in [-25, 5], log scale in [-20, 5] (the project's grid)."""
    loc = torch.linspace(-25.0, 5.0, n).repeat_interleave(n)
    scale = torch.linspace(-20.0, 5.0, n).repeat(n).exp()
    return loc, scale


def test_float32_fast_sampler_matches_float64_inverse_at_the_same_uniforms():
    """|z32 - z64| <= 16 eps32 (|z| + min(scale, width)) and the float32 gradients (closed
    form) agree with the float64 implicit-reparameterisation ones to 256 eps32 (1 + |grad|),
    everywhere the fast path is used."""
    loc32, scale32 = _grid()
    loc64, scale64 = loc32.double(), scale32.double()
    ok = _fast_sample_ok(loc64, scale64, LOW, HIGH)
    assert 0.3 < float(ok.float().mean()) < 1.0  # the grid has fast and tail structures
    l32, s32 = loc32[ok].clone().requires_grad_(), scale32[ok].clone().requires_grad_()
    l64, s64 = loc64[ok].clone().requires_grad_(), scale64[ok].clone().requires_grad_()
    gen = torch.Generator().manual_seed(5)
    u32 = torch.rand(4, l32.shape[0], generator=gen).clamp(min=torch.finfo(F32).tiny)
    z32 = _fast_icdf(l32, s32, LOW, HIGH, u32, dtype=F32)
    assert z32.dtype == F32
    flip = _flipped_bounds(l64.detach(), s64.detach(), LOW, HIGH)[0]
    u64 = u32.double()
    z64 = _Core(l64, s64, LOW, HIGH).icdf(torch.where(flip, 1.0 - u64, u64))
    bound = 16 * EPS32 * (z64.abs() + torch.clamp(s64, max=20.0)).detach()
    assert bool(((z32.double() - z64).abs() <= bound).all())
    for g32, g64 in zip(torch.autograd.grad(z32.sum(), [l32, s32]), torch.autograd.grad(z64.sum(), [l64, s64])):
        assert bool(torch.isfinite(g32).all())
        assert bool(((g32.double() - g64).abs() <= 256 * EPS32 * (1.0 + g64.abs())).all())


def test_float32_theta_samples_pass_kolmogorov_smirnov():
    loc = torch.tensor([0.0, -3.0, 0.5, -19.0, -8.0])
    scale = torch.tensor([0.5, 1.0, 0.2, 2.0, 30.0])
    assert bool(_fast_sample_ok(loc.double(), scale.double(), LOW, HIGH).all())
    torch.manual_seed(11)
    q = TruncatedLogNormal(loc, scale, -20.0, 0.0)
    theta = q.expand((4000, 5)).rsample()
    assert theta.dtype == F32
    for j in range(5):
        l, s = float(loc[j]), float(scale[j])
        ref = stats.truncnorm((-20 - l) / s, -l / s, loc=l, scale=s)
        assert stats.kstest(torch.log(theta[:, j].double()).numpy(), ref.cdf).pvalue > 1e-3


def test_textbook_kl_matches_the_careful_statistics_where_used():
    """Relative error <= 3e-12 in the KL and <= 1e-10 in its gradients (float64)."""
    loc32, scale32 = _grid(200)
    loc = loc32.double().requires_grad_()
    scale = scale32.double().requires_grad_()
    _, a, b = _flipped_bounds(loc, scale, LOW, HIGH)
    ok = _fast_kl_ok(a, b, 20.0 / scale).detach()
    assert 0.3 < float(ok.float().mean()) < 1.0
    fast = _kl_textbook(a[ok], b[ok], scale[ok], torch.tensor(20.0, dtype=F64))
    careful = _Core(loc[ok], scale[ok], LOW, HIGH).stats[4]
    assert float(careful.detach().min()) > 5e-4  # never a tiny difference of O(1) terms
    torch.testing.assert_close(fast, careful, rtol=3e-12, atol=0.0)
    for g_fast, g_careful in zip(torch.autograd.grad(fast.sum(), [loc, scale]),
                                 torch.autograd.grad(careful.sum(), [loc, scale])):
        torch.testing.assert_close(g_fast[ok], g_careful[ok], rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_kl_by_regime_equals_the_careful_statistics_on_the_whole_grid(dtype):
    """kl_divergence (textbook / quadrature / careful by regime) = the careful statistics."""
    from torch.distributions import kl_divergence

    from bmrs_pyro.distributions import LogUniform

    loc32, scale32 = _grid(200)
    loc, scale = loc32.to(dtype).requires_grad_(), scale32.to(dtype).requires_grad_()
    kl = kl_divergence(TruncatedLogNormal(loc, scale, -20.0, 0.0), LogUniform(-20.0, 0.0))
    assert kl.dtype == dtype
    careful = _Core(loc.double(), scale.double(), LOW, HIGH).stats[4].to(dtype)
    torch.testing.assert_close(kl, careful, rtol=3e-12 if dtype == F64 else 2 * EPS32, atol=0.0)
    for g, g_careful in zip(torch.autograd.grad(kl.sum(), [loc, scale]),
                            torch.autograd.grad(careful.sum(), [loc, scale])):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g, g_careful, rtol=1e-10 if dtype == F64 else 4 * EPS32, atol=1e-300)


@pytest.mark.parametrize("tail", [False, True])
def test_sample_sites_equals_separate_draws(tail: bool):
    """All sites at once give the values that one draw per site gives with the same seed."""
    locs = [torch.tensor([0.0, -2.0, -7.0]), torch.tensor([0.1, -1.0]), torch.tensor([-5.0, -0.5, 0.0, -12.0])]
    if tail:
        locs[1] = torch.tensor([3.0, -1.0])  # 3 / 0.05 = 60 scales above the bound: offset form
    scales = [torch.full_like(l, 0.05) if i == 1 else torch.full_like(l, 0.7) for i, l in enumerate(locs)]
    sizes = [l.shape[0] for l in locs]
    loc, scale = torch.cat(locs), torch.cat(scales)
    low, high = torch.full_like(loc, -20.0), torch.zeros_like(loc)
    assert bool(_fast_sample_ok(loc.double(), scale.double(), low.double(), high.double()).all()) != tail
    torch.manual_seed(3)
    together = sample_sites(loc, scale, low, high, sizes, batch=6)
    torch.manual_seed(3)
    apart = torch.cat([TruncatedLogNormal(l, s, -20.0, 0.0).expand((6, l.shape[0])).rsample()
                       for l, s in zip(locs, scales)], dim=-1)
    torch.testing.assert_close(together, apart, rtol=1e-6, atol=0.0)


def _zoo_model(mask_one: bool):
    model, guide, x, y = zoo()
    if mask_one:
        next(iter(guide.layers.values())).mask[2] = 0.0
    return model, guide, x, y


@pytest.mark.parametrize("mask_one", [False, True])
def test_zoo_model_one_pass_elbo_equals_trace_mean_field(mask_one: bool):
    """The bypassed sample statements (noise and observation) change nothing: same value and
    gradients as Pyro's TraceMeanField_ELBO on a NoisyClassifier, pruned structure or not."""
    model, guide, x, y = _zoo_model(mask_one)
    params = list(model.parameters()) + list(guide.parameters())
    results = []
    for elbo in (MeanFieldNoiseELBO(), TraceMeanField_ELBO()):
        pyro.set_rng_seed(8)
        loss = elbo.differentiable_loss(model, guide, x, y)
        results.append((loss, torch.autograd.grad(loss, params)))
    (l1, g1), (l2, g2) = results
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_other_handlers_still_see_every_site():
    """Under any other handler the layers use real sample statements again."""
    model, guide, x, y = _zoo_model(False)
    with poutine.trace() as tracer:
        loss = MeanFieldNoiseELBO().differentiable_loss(model, guide, x, y)
    names = set(tracer.trace.nodes)
    assert {"net.3.theta", "net.6.theta", "obs"} <= names
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_ndtri_small_matches_scipy_in_every_range(dtype):
    """Phi^-1(p) on [0, 1/2]: erfinv above 1/16, the tail below (float32: float64 erfinv down
    to 2^-30, then ndtri), p = 0 taken as the smallest normal. Within 2 float32 eps (float32)
    or 8 float64 eps (float64) of scipy's ndtri, relative."""
    import numpy as np
    from scipy.special import ndtri

    from bmrs_pyro._fast_paths import _ndtri_small

    tiny = torch.finfo(dtype).tiny
    rng = np.random.default_rng(1)
    logs = rng.uniform(np.log(tiny), np.log(0.5), 50000)
    edges = [0.0, tiny, 2.0**-31, 2.0**-30, 1 / 16, 0.5]
    p = torch.tensor(np.concatenate([np.exp(logs), rng.uniform(0.0, 0.5, 20000), edges]), dtype=dtype)
    assert float((p < 2.0**-30).double().mean()) > 0.1 and float((p >= 1 / 16).double().mean()) > 0.05
    xi = _ndtri_small(p)
    assert xi.dtype == dtype and bool(torch.isfinite(xi).all())
    ref = ndtri(np.maximum(p.double().numpy(), tiny))
    rel = np.abs(xi.double().numpy() - ref) / np.maximum(np.abs(ref), tiny)
    assert rel.max() <= (2 * EPS32 if dtype == F32 else 8 * torch.finfo(F64).eps)
