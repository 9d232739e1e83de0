"""Special functions of bmrs_pyro._special against mpmath at high precision."""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import scipy.special
import torch

from bmrs_pyro import _special as S

mp.mp.dps = 60
F64 = torch.float64


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def _rel(got: float, ref) -> float:
    ref = mp.mpf(ref)
    return float(abs(mp.mpf(got) - ref) / abs(ref)) if ref != 0 else abs(got)


def test_ndtr_keeps_lower_tail_that_torch_loses():
    x = _t([-37.0, -20.0, -8.9, -3.0, 0.0, 2.0, 9.0])  # Phi(-37) ~ 6e-300, still normal
    got = S.ndtr(x)
    for xi, gi in zip(x.tolist(), got.tolist()):
        assert _rel(gi, mp.ncdf(xi)) < 2e-13  # x/sqrt2 rounding costs ~x^2 eps at -37
    assert float(torch.special.ndtr(_t(-8.9))) == 0.0  # the reason ndtr exists
    assert abs(float(S.ndtr(_t(-3.0))) - scipy.special.ndtr(-3.0)) < 1e-17


@pytest.mark.parametrize(
    "lo,hi",
    [
        (-1e-10, 1e-10),  # short interval straddling 0
        (-3.0, 2.0),
        (-40.0, 40.0),  # mass ~ 1
        (-50.0, -49.999),  # short, deep lower tail
        (-2.4e9, -2.3e9),
        (-2.4e9 - 2.0**-20, -2.4e9),  # tiny offset at x ~ 1e9
        (30.0, 31.0),  # upper tail: flipped
        (5.0, 1e9),
        (-1e9, -5.0),
        (0.0, 1e-300),
    ],
)
def test_log_diff_ndtr_matches_mpmath(lo: float, hi: float):
    got = float(S.log_diff_ndtr(_t(lo), _t(hi)))
    with mp.workdps(400):  # enough digits for the subtraction of cdfs ~1e-300 apart
        mlo, mhi = mp.mpf(lo), mp.mpf(hi)
        if lo + hi > 0:
            ref = mp.log(mp.ncdf(-mlo) - mp.ncdf(-mhi))
        else:
            ref = mp.log(mp.ncdf(mhi) - mp.ncdf(mlo))
    # (-40, 40): log Z = -7e-350 underflows to 0, which is the right double.
    assert abs(mp.mpf(got) - ref) <= 1e-13 * abs(ref) + 1e-300


def test_log_diff_ndtr_gradient_is_finite_in_every_branch():
    lo = _t([-1e-10, -3.0, -50.0, -2.4e9, 30.0, 5.0, -1.0]).requires_grad_()
    hi = _t([1e-10, 2.0, -49.999, -2.3e9, 31.0, 1e9, -1.0 + 1e-12]).requires_grad_()
    value = S.log_diff_ndtr(lo, hi)
    g_lo, g_hi = torch.autograd.grad(value.sum(), [lo, hi])
    assert torch.isfinite(g_lo).all() and torch.isfinite(g_hi).all()
    # d/dhi log(Phi(hi) - Phi(lo)) = phi(hi) / (Phi(hi) - Phi(lo)), checked at a plain point.
    ref = float(mp.npdf(2.0) / (mp.ncdf(2.0) - mp.ncdf(-3.0)))
    assert abs(float(g_hi[1]) - ref) < 1e-13 * ref


@pytest.mark.parametrize(
    "y", [-30.0, -5.5, -5.0, -1.0, 0.0, 3.0, 5.999, 6.0, 8.0, 10.0, 14.0, 15.0, 29.0, 30.0, 1e3, 2.4e9]
)
def test_mills_gap_and_u_match_mpmath(y: float):
    g, u = S.mills_gap_and_u(_t(y))
    with mp.workdps(120):  # u = 1 - y g ~ 2/y^2 needs ~2 log10(y) extra digits
        my = mp.mpf(y)
        g_ref = mp.npdf(my) / mp.ncdf(-my) - my
        u_ref = 1 - my * g_ref
    assert _rel(float(g), g_ref) < 3e-14
    assert _rel(float(u), u_ref) < 3e-13


@pytest.mark.parametrize("y", [-20.0, -3.0, 0.0, 5.0, 6.0, 40.0, 1e6, 2.4e9])
def test_log_ndtr_upper_scaled_and_its_gradient(y: float):
    t = _t(y).requires_grad_()
    value = S.log_ndtr_upper_scaled(t)
    (grad,) = torch.autograd.grad(value, t)
    my = mp.mpf(y)
    assert _rel(float(value.detach()), mp.log(mp.ncdf(-my)) + my * my / 2) < 1e-14
    # Lambda'(y) = y - phi(y)/Phi(-y) = -g(y): torch's own erfcx gradient loses it at large y.
    assert _rel(float(grad), my - mp.npdf(my) / mp.ncdf(-my)) < 1e-12


@pytest.mark.parametrize("x", [-1.0, 0.0, 2.0, 6.0, 29.0, 31.0, 1e4, 2.4e9])
@pytest.mark.parametrize("v", [1e-14, 1e-6, 0.01, 0.5, 1.0, 3.0, 40.0])
def test_log_ndtr_ratio_offset_matches_mpmath(x: float, v: float):
    got = float(S.log_ndtr_ratio_offset(_t(x), _t(v)))
    mx, mv = mp.mpf(x), mp.mpf(v)
    ref = mp.log(mp.ncdf(-mx - mv) / mp.ncdf(-mx))
    assert _rel(got, ref) < 1e-13


def test_log_erfcx_ratio_lower_and_mills_ratio():
    lo, hi = _t([-40.0, -3.0]), _t([-39.0, -1.0])
    got = S.log_erfcx_ratio_lower(lo, hi)
    for i in range(2):
        ref = mp.log(mp.ncdf(float(lo[i])) / mp.ncdf(float(hi[i])))
        assert _rel(float(got[i]), ref) < 1e-13
    x = _t([-1e3, -3.0, 0.0, 2.0])
    for xi, mi in zip(x.tolist(), S.mills_ratio(x).tolist()):
        assert _rel(mi, mp.npdf(xi) / mp.ncdf(xi)) < 1e-13


def test_log1mexp_two_branches():
    x = _t([-1e-20, -0.1, -math.log(2.0), -5.0, -800.0])
    got = S.log1mexp(x)
    for xi, gi in zip(x.tolist(), got.tolist()):
        assert _rel(gi, mp.log(1 - mp.exp(xi))) < 1e-14


def test_masked_apply_and_where_apply():
    y = _t([-1.0, 2.0, -3.0, 4.0]).requires_grad_()
    mask = y > 0
    # The log branch sees only positive inputs: no NaN in the value or the gradient.
    out = S.where_apply(mask, torch.log, lambda t: -t, y)
    assert torch.equal(out.detach(), _t([1.0, math.log(2.0), 3.0, math.log(4.0)]))
    (grad,) = torch.autograd.grad(out.sum(), y)
    assert torch.equal(grad, _t([-1.0, 0.5, -1.0, 0.25]))
    # Empty and full masks, and several outputs.
    empty = S.masked_apply(torch.zeros(4, dtype=torch.bool), torch.log, y, fill=7.0)
    assert torch.equal(empty, torch.full((4,), 7.0, dtype=F64))
    full = S.masked_apply(torch.ones(4, dtype=torch.bool), torch.abs, y)
    assert torch.equal(full.detach(), y.detach().abs())
    pair = S.where_apply(mask, lambda t: (t, 2 * t), lambda t: (-t, t), y, n_out=2)
    assert torch.equal(pair[1].detach(), _t([-1.0, 4.0, -3.0, 8.0]))


def test_scaled_log_diff_ndtr_is_log_diff_ndtr_plus_the_removed_quadratic():
    from bmrs_pyro._special import scaled_log_diff_ndtr

    lo = torch.tensor([-3.0, -1.0, 0.5, -40.0, 20.0, -0.1], dtype=torch.float64)
    hi = torch.tensor([-2.0, 2.0, 0.7, -39.5, 30.0, 0.1], dtype=torch.float64)
    e = torch.clamp(lo, min=0) - torch.clamp(hi, max=0)
    expected = S.log_diff_ndtr(lo, hi) + 0.5 * e * e
    assert torch.allclose(scaled_log_diff_ndtr(lo.clone(), hi.clone()), expected, rtol=1e-10, atol=1e-10)
    # Deep in the lower tail the remainder is -log|b| - log sqrt(2 pi) (Mills ratio, relative error
    # 1/b^2), where log_diff_ndtr itself would need ~1e18 digits after adding b^2/2 back.
    b = torch.tensor([-1e9], dtype=torch.float64)
    got = scaled_log_diff_ndtr(b - 1.0, b.clone())
    assert torch.allclose(got, -torch.log(-b) - 0.5 * math.log(2 * math.pi), rtol=1e-12)
