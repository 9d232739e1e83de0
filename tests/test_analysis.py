"""ArviZ conversion (issue 5, part 1): draws, summaries, decisions, log likelihood, ELBO, netCDF."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from bmrs_pyro.analysis import (
    compare_pruned,
    history_from_idata,
    masks_from_idata,
    posteriors_from_idata,
    reductions_from_idata,
    to_inference_data,
)
from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import History
from bmrs_pyro.nn import MultiplicativeNoise, NoisyClassifier
from bmrs_pyro.reduction import delta_f_log_normal

import arviz as az  # noqa: E402  (after bmrs_pyro.analysis, which silences its import notice)

SITES = ("net.2.theta", "net.5.theta")
WIDTHS = (12, 8)


@dataclass
class FakeReduction:
    """Stand-in with the fields of bmrs_pyro.pruner.ReductionResult that analysis relies on."""

    method: str
    scores: dict
    keep: dict
    options: dict = field(default_factory=dict)

    @property
    def kept_per_layer(self):
        return {s: (int(k.sum()), k.numel()) for s, k in self.keep.items()}

    @property
    def fraction_removed(self):
        return 1 - sum(int(k.sum()) for k in self.keep.values()) / sum(k.numel() for k in self.keep.values())


def make_model(noise: str = "example"):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, WIDTHS[0]), torch.nn.Tanh(), MultiplicativeNoise(WIDTHS[0], noise=noise),
        torch.nn.Linear(WIDTHS[0], WIDTHS[1]), torch.nn.Tanh(), MultiplicativeNoise(WIDTHS[1], noise=noise),
        torch.nn.Linear(WIDTHS[1], 10),
    )
    model = NoisyClassifier(net)
    guide = AutoTruncatedLogNormal(model)
    guide(torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))
    return model, guide


def set_posterior(guide, site: str, loc, scale) -> None:
    """Write loc and scale of log theta into the guide's raw parameters."""
    locs, scales = guide.locs, guide.log_scales
    *path, leaf = site.split(".")
    for part in path:
        locs, scales = getattr(locs, part), getattr(scales, part)
    with torch.no_grad():
        getattr(locs, leaf + "_unconstrained").copy_(torch.as_tensor(loc, dtype=torch.float32))
        getattr(scales, leaf + "_unconstrained").copy_(torch.log(torch.as_tensor(scale, dtype=torch.float32)))


def moderate(guide) -> dict:
    """Posteriors of moderate scale (0.3 to 1) inside [-20, 0], so draws have finite moments to test."""
    params = {}
    for site, width in zip(SITES, WIDTHS):
        loc = torch.linspace(-3.0, -0.5, width)
        scale = torch.linspace(0.3, 1.0, width)
        set_posterior(guide, site, loc, scale)
        params[site] = (loc, scale)
    return params


def bmrs_fake(guide, method="bmrs_n") -> FakeReduction:
    scores, keep = {}, {}
    for site in SITES:
        loc, scale = guide.loc_scale(site)
        df = delta_f_log_normal(loc.detach(), scale.detach(), -20.0, 0.0)
        scores[site], keep[site] = df, df < 0
    return FakeReduction(method, scores, keep, {"reduced_scale": 1e-6})


def quad_moments(loc: float, scale: float, a: float = -20.0, b: float = 0.0) -> tuple[float, float]:
    """E[theta] and SD[theta] of theta = e^z, z ~ N(loc, scale) on [a, b], by quadrature."""
    dist = stats.norm(loc, scale)
    mass = dist.cdf(b) - dist.cdf(a)
    m1 = integrate.quad(lambda z: math.exp(z) * dist.pdf(z), a, b, points=[loc], limit=200)[0] / mass
    m2 = integrate.quad(lambda z: math.exp(2 * z) * dist.pdf(z), a, b, points=[loc], limit=200)[0] / mass
    return m1, math.sqrt(m2 - m1 * m1)


def hand_log_lik(model, thetas: dict, x, y) -> torch.Tensor:
    """log p(y | x, theta) by writing the network out by hand (weights, tanh, theta * mask)."""
    net = model.net
    h = x
    for lin, site in ((net[0], SITES[0]), (net[3], SITES[1])):
        layer = model.net[2] if site == SITES[0] else model.net[5]
        h = torch.tanh(h @ lin.weight.T + lin.bias) * thetas[site].float() * layer.mask
    logits = h @ net[6].weight.T + net[6].bias
    return torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- posterior and constant data


def test_draws_and_summaries_agree_with_quadrature():
    model, guide = make_model()
    params = moderate(guide)
    num = 4000
    idata = to_inference_data(model, guide, num_samples=num, seed=3)
    for site, width in zip(SITES, WIDTHS):
        da = idata.posterior[site]
        assert da.dims == ("chain", "draw", f"{site}_dim")
        assert da.shape == (1, num, width)
        np.testing.assert_array_equal(idata.posterior[f"{site}_dim"].values, np.arange(width))
        draws = da.values[0]
        assert np.all((draws > 0) & (draws <= 1))
        loc, scale = params[site]
        cd = idata.constant_data
        np.testing.assert_allclose(cd[f"{site}__loc"].values, loc.numpy(), rtol=1e-6)
        np.testing.assert_allclose(cd[f"{site}__scale"].values, scale.numpy(), rtol=1e-6)
        np.testing.assert_array_equal(cd[f"{site}__mask"].values, np.ones(width))
        for i in range(width):
            mean, sd = quad_moments(float(loc[i]), float(scale[i]))
            assert cd[f"{site}__mean"].values[i] == pytest.approx(mean, rel=1e-5)
            assert cd[f"{site}__sd"].values[i] == pytest.approx(sd, rel=1e-4)
            assert cd[f"{site}__snr"].values[i] == pytest.approx(mean / sd, rel=1e-4)
            x = draws[:, i]
            # Monte Carlo error of the sample mean and of the sample SD (delta method on s^2).
            se_mean = x.std() / math.sqrt(num)
            centred = x - x.mean()
            se_sd = math.sqrt(max(np.mean(centred**4) - x.var() ** 2, 0.0) / num) / (2 * x.std())
            assert abs(x.mean() - mean) < 5 * se_mean, (site, i)
            assert abs(x.std() - sd) < 5 * se_sd, (site, i)


def test_draws_are_seeded_and_leave_global_rng_alone():
    model, guide = make_model()
    moderate(guide)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = to_inference_data(model, guide, num_samples=50, seed=7)
    after = torch.rand(3)
    b = to_inference_data(model, guide, num_samples=50, seed=7)
    c = to_inference_data(model, guide, num_samples=50, seed=8)
    torch.testing.assert_close(after, expected_next)
    np.testing.assert_array_equal(a.posterior[SITES[0]].values, b.posterior[SITES[0]].values)
    assert not np.array_equal(a.posterior[SITES[0]].values, c.posterior[SITES[0]].values)


def test_reductions_stored_by_label_with_scores_and_keep():
    model, guide = make_model()
    moderate(guide)
    set_posterior(guide, SITES[0], torch.tensor([-18.0] * 4 + [-1.0] * 8), torch.tensor([2.0] * 4 + [0.3] * 8))
    bmrs = bmrs_fake(guide)
    snr = FakeReduction("snr", {s: torch.rand(w, dtype=torch.float64) for s, w in zip(SITES, WIDTHS)},
                        {s: torch.arange(w) % 3 != 0 for s, w in zip(SITES, WIDTHS)})
    idata = to_inference_data(model, guide, num_samples=20, reduction=[bmrs, snr])
    cd = idata.constant_data
    for site in SITES:
        np.testing.assert_array_equal(cd[f"{site}__bmrs_n__score"].values, bmrs.scores[site].numpy())
        np.testing.assert_array_equal(cd[f"{site}__bmrs_n__keep"].values, bmrs.keep[site].numpy())
        assert cd[f"{site}__snr__keep"].dtype == bool
        assert cd[f"{site}__snr__keep"].dims == (f"{site}_dim",)
    # dF >= 0 exactly for the four posteriors piled at the lower bound
    assert bmrs.keep[SITES[0]].tolist() == [False] * 4 + [True] * 8
    back = reductions_from_idata(idata)
    assert list(back) == ["bmrs_n", "snr"]
    assert back["bmrs_n"].options == {"reduced_scale": 1e-6}
    assert back["snr"].kept_per_layer == snr.kept_per_layer
    # a dict gives its own labels; a repeated method without labels is refused
    labelled = to_inference_data(model, guide, num_samples=5, reduction={"u8": bmrs, "u4": bmrs})
    assert set(reductions_from_idata(labelled)) == {"u8", "u4"}
    with pytest.raises(ValueError, match="labelled"):
        to_inference_data(model, guide, num_samples=5, reduction=[bmrs, bmrs])


# ---------------------------------------------------------------- log likelihood


@pytest.mark.parametrize("noise", ["example", "global"])
def test_log_likelihood_matches_hand_written_network(digits, noise):
    model, guide = make_model(noise)
    moderate(guide)
    _, (x, y) = digits
    x, y = x[:60], y[:60]
    model.net[2].mask[[1, 4]] = 0.0  # pruned structures must not contribute
    idata = to_inference_data(model, guide, num_samples=30, data=(x, y), log_likelihood_draws=12)
    ll = idata.log_likelihood["obs"]
    assert ll.dims == ("chain", "draw", "obs_dim") and ll.shape == (1, 12, 60)
    np.testing.assert_array_equal(idata.observed_data["obs"].values, y.numpy())
    for s in (0, 5, 11):
        thetas = {site: torch.as_tensor(idata.posterior[site].values[0, s]) for site in SITES}
        expected = hand_log_lik(model, thetas, x, y)
        np.testing.assert_allclose(ll.values[0, s], expected.detach().numpy(), atol=1e-4)
    assert model.net[2].mode == "sample" and model.net[2].mask[1] == 0  # state untouched
    # small forward passes (chunks of data and of draws) give the same numbers
    chunked = to_inference_data(model, guide, num_samples=30, data=(x, y), log_likelihood_draws=12, max_rows=25)
    np.testing.assert_allclose(chunked.log_likelihood["obs"].values, ll.values, atol=1e-5)


def test_log_likelihood_replays_bayesian_weights(digits):
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoGuideList, AutoNormal
    from pyro.nn import PyroModule, PyroSample

    from bmrs_pyro.guides import hide_noise_sites

    torch.manual_seed(0)
    out = PyroModule[torch.nn.Linear](8, 10)
    out.weight = PyroSample(dist.Normal(0.0, 1.0).expand([10, 8]).to_event(2))
    net = PyroModule[torch.nn.Sequential](torch.nn.Linear(64, 8), torch.nn.Tanh(), MultiplicativeNoise(8), out)
    model = NoisyClassifier(net)
    guide = AutoGuideList(model)
    guide.append(AutoTruncatedLogNormal(model))
    guide.append(AutoNormal(hide_noise_sites(model), init_scale=1e-6))  # weights ~ their median
    _, (x, y) = digits
    x, y = x[:40], y[:40]
    guide(x[:2], y[:2])
    set_posterior(guide[0], "net.2.theta", torch.linspace(-2.0, -0.5, 8), torch.full((8,), 0.5))
    idata = to_inference_data(model, guide, num_samples=6, data=(x, y))
    weight = guide[1].median(x, y)["net.3.weight"].detach()
    for s in range(6):
        theta = torch.as_tensor(idata.posterior["net.2.theta"].values[0, s]).float()
        h = torch.tanh(x @ net[0].weight.T + net[0].bias) * theta
        expected = torch.log_softmax(h @ weight.T + out.bias, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        np.testing.assert_allclose(idata.log_likelihood["obs"].values[0, s], expected.detach().numpy(), atol=1e-3)


def test_loo_waic_and_summary_run(digits):
    model, guide = make_model()
    moderate(guide)
    _, (x, y) = digits
    idata = to_inference_data(model, guide, num_samples=200, data=(x[:80], y[:80]))
    loo = az.loo(idata)
    waic = az.waic(idata)
    assert np.isfinite(loo.elpd_loo) and np.isfinite(waic.elpd_waic)
    # elpd_loo is at most the in-sample log pointwise predictive density, and close to it here
    ll = idata.log_likelihood["obs"].values[0]
    lppd = float(np.sum(np.log(np.mean(np.exp(ll), axis=0))))
    assert loo.elpd_loo <= lppd + 1e-8
    summary = az.summary(idata, var_names=list(SITES), kind="stats")
    assert len(summary) == sum(WIDTHS)
    assert summary.index[0] == f"{SITES[0]}[0]"
    np.testing.assert_allclose(summary["mean"].values[: WIDTHS[0]],
                               idata.posterior[SITES[0]].values[0].mean(0), atol=1e-3)


def test_compare_pruned_restores_masks_and_ranks(digits):
    model, guide = make_model()
    moderate(guide)
    _, (x, y) = digits
    before = model.net[5].mask.clone()
    model.net[5].mask[0] = 0.0
    held = model.net[5].mask.clone()
    keep_all = FakeReduction("bmrs_n", {}, {s: torch.ones(w, dtype=torch.bool) for s, w in zip(SITES, WIDTHS)})
    table = compare_pruned(model, guide, (x[:80], y[:80]), keep_all, num_samples=100)
    assert set(table.index) == {"unpruned", "pruned"}
    # same draws, same masks: identical elpd
    assert table.loc["pruned", "elpd_loo"] == pytest.approx(table.loc["unpruned", "elpd_loo"], abs=1e-9)
    torch.testing.assert_close(model.net[5].mask, held)
    # removing every structure of a layer makes the logits constant: log p = log softmax(bias)
    drop = FakeReduction("snr", {}, {SITES[1]: torch.zeros(WIDTHS[1], dtype=torch.bool)})
    table = compare_pruned(model, guide, (x[:80], y[:80]), drop, num_samples=50, ic="waic")
    by_hand = float(torch.log_softmax(model.net[6].bias.detach(), -1)[y[:80]].sum())
    assert table.loc["pruned", "elpd_waic"] == pytest.approx(by_hand, rel=1e-5)
    torch.testing.assert_close(model.net[5].mask, held)
    assert not torch.equal(held, before)


# ---------------------------------------------------------------- history and netCDF


def test_netcdf_round_trip_preserves_everything(tmp_path, digits):
    model, guide = make_model()
    moderate(guide)
    model.net[5].mask[2] = 0.0
    history = History(elbo=[-900.0, -500.5, -420.25], loss=[1000.0, 800.0, 600.0, 500.0, 430.0, 420.0],
                      seconds=[0.5, 0.4, 0.4],
                      events=[{"epoch": 1, "event": "prune", "method": "bmrs_n", "fraction_removed": 0.25}])
    _, (x, y) = digits
    red = bmrs_fake(guide)
    idata = to_inference_data(model, guide, num_samples=40, data=(x[:30], y[:30]), reduction=red, history=history)
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert set(back.groups()) == set(idata.groups()) == {
        "posterior", "constant_data", "log_likelihood", "observed_data", "training"}
    for group in idata.groups():
        a, b = idata[group], back[group]
        assert set(a.data_vars) == set(b.data_vars), group
        for name in a.data_vars:
            assert a[name].dims == b[name].dims
            np.testing.assert_array_equal(a[name].values, b[name].values)
        for key in ("sites", "reductions", "events"):
            if key in a.attrs:
                assert a.attrs[key] == b.attrs[key]
    hist = history_from_idata(back)
    assert hist["elbo"] == history.elbo and hist["loss"] == history.loss and hist["events"] == history.events
    assert back.training["elbo"].dims == ("epoch",)
    np.testing.assert_array_equal(back.training["epoch"].values, [1, 2, 3])
    assert masks_from_idata(back)[SITES[1]].tolist() == [True, True, False] + [True] * 5
    qs = posteriors_from_idata(back)
    loc, scale = guide.loc_scale(SITES[0])
    torch.testing.assert_close(qs[SITES[0]].loc, loc.detach().double())
    torch.testing.assert_close(qs[SITES[0]].mean, guide.posterior(SITES[0]).mean.detach().double(), rtol=1e-5, atol=0)
    red_back = reductions_from_idata(back)["bmrs_n"]
    for site in SITES:
        assert torch.equal(red_back.keep[site], red.keep[site])
        torch.testing.assert_close(red_back.scores[site], red.scores[site])


def test_history_as_plain_list(tmp_path):
    model, guide = make_model()
    idata = to_inference_data(model, guide, num_samples=5, history=[-3.0, -2.0])
    idata.to_netcdf(str(tmp_path / "h.nc"))
    hist = history_from_idata(az.from_netcdf(str(tmp_path / "h.nc")))
    assert hist == {"elbo": [-3.0, -2.0], "seconds": [], "loss": [], "events": [], "warm_start": []}


def test_with_real_reduce(digits):
    from bmrs_pyro.pruner import reduce

    model, guide = make_model()
    moderate(guide)
    set_posterior(guide, SITES[1], torch.tensor([-19.0] * 3 + [-1.0] * 5), torch.tensor([1.5] * 3 + [0.3] * 5))
    result = reduce(model, guide, "bmrs_n")
    idata = to_inference_data(model, guide, num_samples=10, reduction=result)
    back = reductions_from_idata(idata)["bmrs_n"]
    assert back.kept_per_layer == {SITES[0]: (12, 12), SITES[1]: (5, 8)}
    loc, scale = guide.loc_scale(SITES[1])
    np.testing.assert_allclose(back.scores[SITES[1]].numpy(),
                               delta_f_log_normal(loc.detach(), scale.detach(), -20.0, 0.0).numpy())


# ---------------------------------------------------------------- input checks


def test_bad_input_is_refused(digits):
    model, guide = make_model()
    _, (x, y) = digits
    with pytest.raises(ValueError, match="num_samples"):
        to_inference_data(model, guide, num_samples=0)
    with pytest.raises(ValueError, match="rows"):
        to_inference_data(model, guide, num_samples=5, data=(x[:10], y[:9]))
    with pytest.raises(ValueError, match="cannot exceed"):
        to_inference_data(model, guide, num_samples=5, data=(x[:10], y[:10]), log_likelihood_draws=6)
    with pytest.raises(ValueError, match="fields"):
        to_inference_data(model, guide, num_samples=5, reduction=object())
    with pytest.raises(ValueError, match="obs_site"):
        to_inference_data(model, guide, num_samples=5, data=(x[:10], y[:10]), obs_site="y")
    fresh = AutoTruncatedLogNormal(NoisyClassifier(torch.nn.Sequential(torch.nn.Linear(64, 4), MultiplicativeNoise(4))))
    with pytest.raises(ValueError, match="has not run"):
        to_inference_data(model, fresh, num_samples=5)
    with pytest.raises(ValueError, match="history"):
        to_inference_data(model, guide, num_samples=5, history=[])


def test_warm_start_round_trips_through_netcdf(tmp_path):
    from bmrs_pyro.infer import History

    model, guide = make_model()
    history = History(elbo=[-9.0, -8.0], warm_start=[-5.0, -4.0, -3.5],
                      events=[{"epoch": 2, "event": "warm_start_end", "epochs": 3}])
    idata = to_inference_data(model, guide, num_samples=5, history=history)
    idata.to_netcdf(str(tmp_path / "w.nc"))
    hist = history_from_idata(az.from_netcdf(str(tmp_path / "w.nc")))
    assert hist["warm_start"] == [-5.0, -4.0, -3.5] and hist["elbo"] == [-9.0, -8.0]
