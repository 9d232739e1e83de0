"""The off-CPU hot path in the model's dtype (issue 15, point 4), checked on the CPU.

On a GPU the one-pass loss (``MeanFieldNoiseELBO``) samples theta and evaluates the KL in the
model's dtype (float32), making no float64 tensor; on the CPU it keeps its float64 forms.
``_forced_low_precision()`` sends the CPU down the GPU path, so every check here runs where no
GPU is lent. Each float32 result is compared with an independent float64 reference (the
careful float64 code of ``_truncnorm``, scipy, or Pyro's ``TraceMeanField_ELBO``) over a grid
of posteriors covering every regime: narrow and wide scales, loc inside, near and beyond the
bounds, tails beyond 5 and 30 scales. Each test prints its worst error against its bound
(``pytest -s``).
"""

from __future__ import annotations

import contextlib

import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from scipy import stats

from _low_precision_helpers import (DtypeRecorder, assert_losses_agree, float64_ops_in_one_fit_step,
                                    loss_and_grads, zoo)
from bmrs_pyro._fast_paths import _FAST_SAMPLE_X, _flipped_bounds, kl_to_own_bounds
from bmrs_pyro._low_precision import (
    _forced_low_precision,
    _icdf_draw_lp,
    _low_precision,
    kl_to_own_bounds_lp,
    sample_sites_lp,
)
from bmrs_pyro._truncnorm import _Core
from bmrs_pyro.distributions import LogUniform, TruncatedLogNormal, TruncatedNormal
from bmrs_pyro.elbo import MeanFieldNoiseELBO

F32, F64 = torch.float32, torch.float64
EPS32 = torch.finfo(F32).eps
BOUNDS = [(-20.0, 0.0), (-6.0, -1.0)]


def _grid(low: float, high: float, n: int = 160) -> tuple[torch.Tensor, ...]:
    """float32 (loc, scale, low, high): loc over [low - 5, high + 5], log scale over [-20, 5]."""
    loc = torch.linspace(low - 5.0, high + 5.0, n).repeat_interleave(n)
    scale = torch.linspace(-20.0, 5.0, n).repeat(n).exp()
    return loc, scale, torch.full_like(loc, low), torch.full_like(loc, high)


def _regimes(loc, scale, low, high) -> dict[str, int]:
    _, a, b = _flipped_bounds(loc.double(), scale.double(), low.double(), high.double())
    w = (high - low).double() / scale.double()
    return {"inside": int((b > 1).sum()), "near bound": int(((b <= 1) & (b >= -_FAST_SAMPLE_X)).sum()),
            "tail 5-30": int(((b < -5) & (b >= -30)).sum()), "tail > 30": int((b < -30).sum()),
            "narrow (w <= 1)": int((w <= 1).sum())}


def test_the_switch_is_off_the_cpu_or_forced_and_never_for_float64():
    x32, x64 = torch.zeros(2), torch.zeros(2, dtype=F64)
    assert not _low_precision(x32) and not _low_precision(x64)
    with _forced_low_precision():
        assert _low_precision(x32) and not _low_precision(x64)
        with _forced_low_precision():
            pass
        assert _low_precision(x32)  # nesting restores the outer state
    assert not _low_precision(x32)


@pytest.mark.parametrize("bounds", BOUNDS)
def test_grid_covers_every_regime(bounds):
    counts = _regimes(*_grid(*bounds))
    assert all(n > 100 for n in counts.values()), counts


@pytest.mark.parametrize("bounds", BOUNDS)
def test_float32_draws_match_the_float64_inverse_at_the_same_uniforms(bounds):
    """|z32 - z64| <= 16 eps32 (|z| + min(scale, 20)) on the whole grid (fast and tail
    structures), z64 the careful float64 inverse cdf at the same uniform; and the
    reparameterised gradients (sums over 4 draws per structure) within
    256 eps32 (4 + |grad64|) of the float64 implicit-reparameterisation gradients."""
    loc, scale, low, high = _grid(*bounds)
    l32, s32 = loc.clone().requires_grad_(), scale.clone().requires_grad_()
    gen = torch.Generator().manual_seed(5)
    u = torch.rand(4, loc.shape[0], generator=gen).clamp(min=torch.finfo(F32).tiny)
    z32 = _icdf_draw_lp(l32, s32, low, high, u, False)
    assert z32.dtype == F32 and bool(torch.isfinite(z32).all())
    assert bool(((z32 >= low) & (z32 <= high)).all())
    # The float32 path samples in its own flipped frame with u itself: the same draw as the
    # original-frame inverse at 1 - u where it flipped.
    flip = _flipped_bounds(loc, scale, low, high)[0]
    l64, s64 = loc.double().requires_grad_(), scale.double().requires_grad_()
    u64 = u.double()
    z64 = _Core(l64, s64, low.double(), high.double()).icdf(torch.where(flip, 1.0 - u64, u64))
    bound = 16 * EPS32 * (z64.abs() + scale.double().clamp(max=20.0)).detach()
    ratio = float(((z32.double() - z64).abs().detach() / bound).max())
    grads = []
    for g32, g64 in zip(torch.autograd.grad(z32.sum(), [l32, s32]), torch.autograd.grad(z64.sum(), [l64, s64])):
        assert bool(torch.isfinite(g32).all())
        grads.append(float(((g32.double() - g64).abs() / (256 * EPS32 * (4.0 + g64.abs()))).max()))
    print(f"\n{bounds}: draws worst |z32-z64| / bound = {ratio:.3g}; gradients (loc, scale) worst / bound = "
          f"{grads[0]:.3g}, {grads[1]:.3g}")
    assert ratio <= 1.0
    assert max(grads) <= 1.0


# (loc, scale): inside, near and beyond each bound, narrow and wide, tails beyond 5 and 30
# scales (far enough from float32's resolution of z for a KS test to see the distribution).
_KS_POSTERIORS = [(-10.0, 3.0), (-0.3, 0.5), (0.0, 0.01), (0.5, 0.2), (1.0, 0.1), (1.0, 0.03),
                  (-19.8, 0.3), (-21.0, 0.15), (-20.5, 0.01), (-25.0, 50.0), (3.0, 8.0), (-3.0, 1e-3)]


@pytest.mark.parametrize("how", ["sample_sites", "rsample"])
def test_forced_samples_pass_kolmogorov_smirnov(how):
    """Draws under the forced low-precision path follow the truncated normal (scipy's cdf),
    p > 1e-3 for every posterior, tails beyond 5 and 30 scales included."""
    loc = torch.tensor([p[0] for p in _KS_POSTERIORS])
    scale = torch.tensor([p[1] for p in _KS_POSTERIORS])
    low, high = torch.full_like(loc, -20.0), torch.zeros_like(loc)
    b = _flipped_bounds(loc.double(), scale.double(), low.double(), high.double())[2]
    assert bool((b < -30).any()) and bool(((b < -5) & (b >= -30)).any()) and bool((b >= -5).any())
    torch.manual_seed(11)
    with _forced_low_precision():
        if how == "sample_sites":
            theta = sample_sites_lp(loc, scale, low, high, [5, 7], batch=3000)
            z = torch.log(theta.double())
        else:
            z = TruncatedNormal(loc, scale, -20.0, 0.0).expand((3000, loc.shape[0])).rsample().double()
    assert bool(((z >= -20.0 - 1e-5) & (z <= 0.0)).all())
    worst = 1.0
    for j, (l, s) in enumerate(_KS_POSTERIORS):
        ref = stats.truncnorm((-20.0 - l) / s, -l / s, loc=l, scale=s)
        p = stats.kstest(z[:, j].numpy(), ref.cdf).pvalue
        worst = min(worst, p)
        assert p > 1e-3, (l, s, p)
    print(f"\n{how}: smallest KS p-value {worst:.3g} (bound 1e-3)")


@pytest.mark.parametrize("bounds", BOUNDS)
def test_float32_kl_matches_the_float64_kl(bounds):
    """The float32 KL by regime within 32 eps32 relative of the float64 KL on the whole grid;
    its gradients within 64 eps32 (|grad64| + 1/scale) (1/scale: the size of a derivative
    with respect to loc or scale of a function of the standardised bounds)."""
    loc, scale, low, high = _grid(*bounds)
    l32, s32 = loc.clone().requires_grad_(), scale.clone().requires_grad_()
    kl32 = kl_to_own_bounds_lp(l32, s32, low, high)
    assert kl32.dtype == F32 and bool(torch.isfinite(kl32).all())
    l64, s64 = loc.double().requires_grad_(), scale.double().requires_grad_()
    kl64 = kl_to_own_bounds(l64, s64, low.double(), high.double())
    assert float(kl64.detach().min()) < 1e-3 < 10.0 < float(kl64.detach().max())  # near-uniform and peaked posteriors
    rel = float(((kl32.double() - kl64).abs() / kl64.abs()).detach().max()) / EPS32
    grads = []
    for g32, g64 in zip(torch.autograd.grad(kl32.sum(), [l32, s32]), torch.autograd.grad(kl64.sum(), [l64, s64])):
        assert bool(torch.isfinite(g32).all())
        grads.append(float(((g32.double() - g64).abs() / (g64.abs() + 1.0 / scale.double())).max()) / EPS32)
    print(f"\n{bounds}: KL worst relative error {rel:.3g} eps32 (bound 32); gradients (loc, scale) "
          f"{grads[0]:.3g}, {grads[1]:.3g} eps32 (bound 64)")
    assert rel <= 32.0
    assert max(grads) <= 64.0


def test_registered_kl_stays_float64_under_the_switch():
    """kl_divergence (the pruner's joint ELBO check relies on it) is the float64 code, forced or not."""
    loc, scale, low, high = _grid(-20.0, 0.0, 40)
    q, p = TruncatedLogNormal(loc, scale, -20.0, 0.0), LogUniform(-20.0, 0.0)
    plain = torch.distributions.kl_divergence(q, p)
    recorder = DtypeRecorder()
    with _forced_low_precision(), recorder:
        forced = torch.distributions.kl_divergence(q, p)
    assert torch.equal(plain, forced)
    assert recorder.float64  # computed in float64 as before


@pytest.mark.parametrize("init", [(-0.4, 0.6), (-3.0, 2.0), (-12.0, 4.0)])
def test_forced_loss_equals_trace_mean_field(init):
    """The forced one-pass loss (float32 draws and KL) equals Pyro's TraceMeanField_ELBO on
    the float64-inside CPU path at the same seed (every structure in the fast region, so both
    draw the same float32 uniforms): value within 1e-5 relative, gradients within
    1e-4 (|g| + max|g|/100)."""
    model, guide, x, y = zoo(*init)
    params = list(model.parameters()) + list(guide.parameters())
    results = []
    for forced in (True, False):
        pyro.set_rng_seed(8)
        with _forced_low_precision() if forced else contextlib.nullcontext():
            elbo = MeanFieldNoiseELBO() if forced else TraceMeanField_ELBO()
            loss = elbo.differentiable_loss(model, guide, x, y)
        assert loss.dtype == F32
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    rel, worst = assert_losses_agree(*results)
    print(f"\ninit {init}: loss relative error {rel:.3g} (bound 1e-5); gradients worst {worst:.3g} (bound 1e-4)")


@pytest.mark.parametrize("init_loc, noise", [(0.0, "example"), (3.0, "example"), (3.0, "global")])
def test_a_forced_training_step_makes_no_float64_tensor(init_loc, noise, noisy_mlp):
    """One step of fit (1 epoch, 1 batch, guide set up inside it) under the forced switch:
    no op outputs a float64 tensor (init_loc 3: every structure ~450 scales beyond the upper
    bound, the tail sampler and the offset-form KL; global noise: the distributions' own
    rsample). The same recorder sees float64 on the ordinary CPU path, so the check can fail."""
    model_class = noisy_mlp if noise == "global" else None
    assert float64_ops_in_one_fit_step(init_loc, model_class=model_class)
    seen = float64_ops_in_one_fit_step(init_loc, forced=True, model_class=model_class)
    assert not seen, dict(seen)


def test_cpu_twin_of_the_cuda_loss_check():
    """tests/test_cuda.py's loss check (GPU float32 loss vs CPU float64 loss at the same
    uniforms), run here with the forced switch standing in for the GPU."""
    rel, worst = assert_losses_agree(loss_and_grads("cpu", forced=True), loss_and_grads("cpu"))
    print(f"\nforced CPU vs CPU loss: relative error {rel:.3g} (bound 1e-5); gradients worst {worst:.3g} (bound 1e-4)")


def test_forced_draws_lie_inside_the_stated_support():
    """theta drawn on the low-precision path (clamped onto [e^low, e^high] in float32) passes
    the distributions' own support check (e^bound rounded from float64), piled on a bound or not."""
    loc = torch.tensor([5.0, -25.0, -20.0, 0.0, -3.0, -4.0])
    scale = torch.tensor([1e-6, 1e-6, 1e-3, 1e-3, 1.0, 1e-8])
    torch.manual_seed(2)
    with _forced_low_precision():
        for low, high in [(-20.0, 0.0), (-7.3, -1.1)]:
            q = TruncatedLogNormal(loc, scale, low, high)
            theta = q.expand((500, 6)).rsample()
            assert theta.dtype == F32 and bool(q.support.check(theta).all())
            prior = LogUniform(torch.full((6,), low), torch.full((6,), high))
            assert bool(prior.support.check(prior.rsample((500,))).all())
