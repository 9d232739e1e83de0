"""Noise layer, guide and SVI training (issue 2, points 4-7)."""

import math

import numpy as np
import pyro
import pyro.distributions as pdist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from scipy.special import log_ndtr

from bmrs_pyro.distributions import LogUniform, TruncatedLogNormal
from bmrs_pyro.guides import AutoTruncatedLogNormal, hide_noise_sites
from bmrs_pyro.infer import TrainingDivergedError, evaluate, fit, minibatch_loss
from bmrs_pyro.nn import MultiplicativeNoise, noise_mode, noise_modules


def _trace(fn, *args):
    return poutine.trace(fn).get_trace(*args)


def kl_by_hand(loc, scale, a=-20.0, b=0.0):
    """KL(TN(loc, scale; a, b) || U(a, b)) from the textbook entropy of a truncated normal."""
    loc, scale = np.asarray(loc, float), np.asarray(scale, float)
    al, be = (a - loc) / scale, (b - loc) / scale
    log_z = np.log(np.exp(log_ndtr(be)) - np.exp(log_ndtr(al)))
    z = np.exp(log_z)
    phi = lambda t: np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    entropy = np.log(scale) + log_z + 0.5 * math.log(2 * math.pi * math.e) + (al * phi(al) - be * phi(be)) / (2 * z)
    return math.log(b - a) - entropy


class Wrap(pyro.nn.PyroModule):
    def __init__(self, noise):
        super().__init__()
        self.layer = noise

    def forward(self, x, y=None):
        return self.layer(x)


# ---------------------------------------------------------------- noise layer


@pytest.mark.parametrize("shape,channel_dim", [((5, 7), -1), ((5, 7, 3, 4), 1)])
def test_noise_multiplies_by_theta_broadcast(shape, channel_dim):
    layer = MultiplicativeNoise(7, channel_dim=channel_dim)
    model = Wrap(layer)
    x = torch.randn(shape)
    tr = _trace(model, x)
    site = tr.nodes["layer.theta"]
    # the structures are the site's event dimension; the examples its batch (one plate dim)
    assert isinstance(site["fn"].base_dist, LogUniform)
    assert site["fn"].batch_shape == (5,) and site["fn"].event_shape == (7,)
    assert [f.dim for f in site["cond_indep_stack"]] == [-1]
    theta = site["value"]
    assert theta.shape == (5, 7)  # one draw per example and structure
    assert bool((theta > 0).all()) and bool((theta <= 1).all())
    out = tr.nodes["_RETURN"]["value"]
    expected = x * theta.reshape((5, 7) + (1,) * (len(shape) - 2))
    torch.testing.assert_close(out, expected)


def test_global_noise_is_one_draw_per_batch():
    model = Wrap(MultiplicativeNoise(4, noise="global"))
    x = torch.ones(6, 4)
    tr = _trace(model, x)
    assert tr.nodes["layer.theta"]["value"].shape == (4,)
    out = tr.nodes["_RETURN"]["value"]
    assert torch.equal(out[0], out[5])


def test_mask_zeroes_pruned_structures_and_their_kl():
    layer = MultiplicativeNoise(4)
    layer.mask[:] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    model = Wrap(layer)
    guide = AutoTruncatedLogNormal(model)
    x = torch.ones(3, 4)
    guide(x)
    gtr = _trace(guide, x)
    mtr = _trace(poutine.replay(model, trace=gtr), x)
    out = mtr.nodes["_RETURN"]["value"]
    assert bool((out[:, 1] == 0).all()) and bool((out[:, 3] == 0).all())
    assert bool((out[:, 0] > 0).all())
    # TraceMeanField's KL covers the kept structures only.
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x)
    loc, scale = guide.loc_scale("layer.theta")
    expected = kl_by_hand(loc.detach()[[0, 2]].numpy(), scale.detach()[[0, 2]].numpy()).sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mean_mode_uses_posterior_mean_times_mask():
    layer = MultiplicativeNoise(3)
    model = Wrap(layer)
    guide = AutoTruncatedLogNormal(model, init_loc=-1.0, init_scale=0.5)
    x = torch.ones(2, 3)
    guide(x)
    layer.mask[2] = 0.0
    with noise_mode(model, "mean"):
        tr = _trace(model, x)
    assert "layer.theta" not in tr.nodes  # deterministic: no sample site
    out = tr.nodes["_RETURN"]["value"]
    # E[theta] for TN(-1, 0.5) on [-20, 0], by quadrature
    from scipy import integrate, stats

    tn = stats.truncnorm((-20 + 1) / 0.5, (0 + 1) / 0.5, loc=-1, scale=0.5)
    e_theta = integrate.quad(lambda z: math.exp(z) * tn.pdf(z), -20, 0, points=[-1])[0]
    np.testing.assert_allclose(out[0].detach().numpy(), [e_theta, e_theta, 0.0], rtol=1e-5)
    assert layer.mode == "sample"  # restored


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_structures=4, low=0.0, high=-20.0), "low"),
        (dict(num_structures=4, low=1.0, high=1.0), "low"),
        (dict(num_structures=0), "num_structures"),
        (dict(num_structures=4, noise="bogus"), "noise"),
        (dict(num_structures=4, channel_dim=0), "channel_dim"),
    ],
)
def test_noise_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiplicativeNoise(**kwargs)


def test_noise_inside_a_plate_is_a_clear_error():
    model = Wrap(MultiplicativeNoise(4))
    with pytest.raises(ValueError, match="outside pyro.plate"):
        with pyro.plate("data", 2):
            model(torch.ones(2, 4))


def test_noise_channel_dim_that_does_not_fit():
    model = Wrap(MultiplicativeNoise(4, channel_dim=1))
    with pytest.raises(ValueError, match="channel_dim"):
        model(torch.ones(2, 3, 5, 5))  # 3 channels, layer has 4
    with pytest.raises(ValueError, match="channel_dim"):
        Wrap(MultiplicativeNoise(4, channel_dim=5))(torch.ones(2, 4))


# ---------------------------------------------------------------- guide


def test_guide_finds_noise_sites_and_exposes_posteriors(noisy_mlp):
    model = noisy_mlp((8, 5, 6, 3))
    guide = AutoTruncatedLogNormal(model, init_loc=-2.0, init_scale=0.1)
    x = torch.randn(4, 8)
    guide(x)
    assert guide.site_names == ["noise.0.theta", "noise.1.theta"]
    q = guide.posterior("noise.1.theta")
    assert isinstance(q, TruncatedLogNormal)
    assert q.batch_shape == (6,)
    assert torch.allclose(q.loc, torch.full((6,), -2.0))
    assert torch.allclose(q.scale, torch.full((6,), 0.1))
    with pytest.raises(KeyError, match="unknown noise site"):
        guide.posterior("nope")


def test_guide_default_init_matches_design(noisy_mlp):
    model = noisy_mlp((8, 5, 3))
    guide = AutoTruncatedLogNormal(model)
    guide(torch.randn(2, 8))
    loc, scale = guide.loc_scale("noise.0.theta")
    assert torch.all(loc == 0) and torch.allclose(scale, torch.tensor(math.exp(-5)))


def test_a_new_guide_does_not_inherit_an_earlier_guides_values(noisy_mlp):
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    first = noisy_mlp((8, 5, 3))
    first_guide = AutoTruncatedLogNormal(first)
    fit(first, first_guide, (x, y), epochs=5, lr=0.05, progress=False)
    assert not torch.all(first_guide.loc_scale("noise.0.theta")[0] == 0)
    second = noisy_mlp((8, 5, 3))  # same site names, same param-store keys
    second_guide = AutoTruncatedLogNormal(second, init_loc=0.0)
    second_guide(x, y)
    loc, scale = second_guide.loc_scale("noise.0.theta")
    assert torch.all(loc == 0) and torch.allclose(scale, torch.tensor(math.exp(-5)))


def test_guide_without_noise_layers_is_an_error():
    def model(x, y=None):
        pyro.sample("w", pdist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no MultiplicativeNoise"):
        AutoTruncatedLogNormal(model)(torch.ones(2))


def test_guide_in_autoguidelist_with_bayesian_weights():
    class BayesNet(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.fc = pyro.nn.PyroModule[torch.nn.Linear](4, 3)
            self.fc.weight = pyro.nn.PyroSample(pdist.Normal(0.0, 1.0).expand([3, 4]).to_event(2))
            self.noise = MultiplicativeNoise(3)
            self.out = torch.nn.Linear(3, 2)

        def forward(self, x, y=None):
            logits = self.out(self.noise(torch.tanh(self.fc(x))))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", pdist.Categorical(logits=logits), obs=y)

    model = BayesNet()
    guide = AutoGuideList(model)
    guide.append(AutoNormal(hide_noise_sites(model)))  # model order: fc.weight, then noise.theta
    guide.append(AutoTruncatedLogNormal(model))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    hist = fit(model, guide, (x, y), epochs=3, batch_size=8, progress=False)
    assert len(hist.elbo) == 3 and all(math.isfinite(v) for v in hist.elbo)
    tr = _trace(guide, x)
    assert {"noise.theta", "fc.weight"} <= set(tr.nodes)
    assert guide[1].posterior("noise.theta").batch_shape == (3,)


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("noise", ["example", "global"])
@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_minibatch_loss_matches_hand_formula(noisy_mlp, noise, kl_weight):
    torch.manual_seed(1)
    model = noisy_mlp((6, 5, 4, 3), noise=noise)
    guide = AutoTruncatedLogNormal(model, init_loc=-0.5, init_scale=0.3)
    n, b = 50, 8
    x, y = torch.randn(b, 6), torch.randint(0, 3, (b,))
    guide(x, y)
    pyro.set_rng_seed(7)
    loss = minibatch_loss(model, guide, x, y, dataset_size=n, kl_weight=kl_weight)
    # Redraw the same thetas: the loss samples the guide first, with the same RNG state.
    pyro.set_rng_seed(7)
    thetas = _trace(guide, x, y)
    t0 = thetas.nodes["noise.0.theta"]["value"]
    t1 = thetas.nodes["noise.1.theta"]["value"]
    h = torch.tanh(model.hidden[0](x)) * t0
    h = torch.tanh(model.hidden[1](h)) * t1
    nll = F.cross_entropy(model.out(h), y, reduction="sum")
    kl = sum(
        kl_by_hand(*[t.detach().numpy() for t in guide.loc_scale(s)]).sum()
        for s in ("noise.0.theta", "noise.1.theta")
    )
    expected = (n / b) * nll.item() + kl_weight * kl
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_trace_elbo_agrees_with_meanfield_in_expectation(noisy_mlp):
    torch.manual_seed(0)
    model = noisy_mlp((4, 6, 3))
    guide = AutoTruncatedLogNormal(model, init_loc=-1.0, init_scale=0.8)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    guide(x, y)
    draws = {"meanfield": [], "trace": []}
    with torch.no_grad():
        for kind in draws:
            for s in range(600):
                pyro.set_rng_seed(s)
                draws[kind].append(minibatch_loss(model, guide, x, y, dataset_size=10, loss=kind).item())
    a, b = np.array(draws["meanfield"]), np.array(draws["trace"])
    se = math.sqrt(a.var() / a.size + b.var() / b.size)
    assert abs(a.mean() - b.mean()) < 4 * se
    # and the Monte Carlo KL really differs draw to draw (the comparison is not vacuous)
    assert b.std() > a.std()


# ---------------------------------------------------------------- training


def test_fit_reaches_95_percent_on_digits(noisy_mlp, digits):
    torch.set_num_threads(2)
    (xtr, ytr), (xte, yte) = digits
    model = noisy_mlp((64, 100, 100, 10))
    guide = AutoTruncatedLogNormal(model)
    hist = fit(model, guide, (xtr, ytr), epochs=40, batch_size=128, lr=3e-3, seed=0, progress=False)
    assert len(hist.elbo) == 40
    assert hist.elbo[-1] > hist.elbo[0]
    mean_metrics = evaluate(model, guide, (xte, yte), mode="mean")
    assert mean_metrics["accuracy"] >= 0.95, mean_metrics
    sample_metrics = evaluate(model, guide, (xte, yte), mode="sample", num_samples=8)
    assert sample_metrics["accuracy"] >= 0.93, sample_metrics
    assert 0 < sample_metrics["nll"] < 0.5


def test_fit_is_reproducible(noisy_mlp):
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    losses = []
    for _ in range(2):
        pyro.clear_param_store()
        torch.manual_seed(3)
        model = noisy_mlp((5, 4, 3))
        guide = AutoTruncatedLogNormal(model)
        losses.append(fit(model, guide, (x, y), epochs=2, batch_size=16, seed=5, progress=False).loss)
    assert losses[0] == losses[1]


def test_fit_refuses_nan_features_before_the_first_step(noisy_mlp):
    # NaN in the data is an input error found up front (bmrs_pyro.checks), not a divergence;
    # NaN that appears during training is tested in test_reliability.py.
    from bmrs_pyro.checks import InputError

    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    x[20] = float("nan")
    model = noisy_mlp((5, 4, 3))
    guide = AutoTruncatedLogNormal(model)
    with pytest.raises(InputError, match=r"5 non-finite value\(s\) \(NaN or inf\), the first \(nan\) at row 20, column 0"):
        fit(model, guide, (x, y), epochs=2, batch_size=8, progress=False)
    assert guide.prototype_trace is None  # no step was taken
    assert issubclass(TrainingDivergedError, ValueError)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epochs=0), "epochs"),
        (dict(epochs=2, lr=0.0), "lr"),
        (dict(epochs=2, lr=-1.0), "lr"),
        (dict(epochs=2, batch_size=0), "batch_size"),
        (dict(epochs=2, kl_weight=-1.0), "kl_weight"),
        (dict(epochs=2, loss="nope"), "loss"),
    ],
)
def test_fit_bad_arguments(noisy_mlp, kwargs, match):
    model = noisy_mlp((5, 4, 3))
    guide = AutoTruncatedLogNormal(model)
    with pytest.raises(ValueError, match=match):
        fit(model, guide, (torch.randn(8, 5), torch.zeros(8, dtype=torch.long)), progress=False, **kwargs)


def test_fit_bad_data(noisy_mlp):
    model = noisy_mlp((5, 4, 3))
    guide = AutoTruncatedLogNormal(model)
    with pytest.raises(ValueError, match="rows"):
        fit(model, guide, (torch.randn(8, 5), torch.zeros(7, dtype=torch.long)), epochs=1, progress=False)
    with pytest.raises(ValueError, match="tuple"):
        fit(model, guide, torch.randn(8, 5), epochs=1, progress=False)


def test_fit_accepts_a_dataloader(noisy_mlp):
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    model = noisy_mlp((5, 4, 3))
    guide = AutoTruncatedLogNormal(model)
    hist = fit(model, guide, loader, epochs=2, progress=False)
    assert len(hist.loss) == 6
    assert set(noise_modules(model)) == {"noise.0.theta"}


def test_one_pass_elbo_equals_tracemeanfield_value_and_gradients(noisy_mlp):
    from bmrs_pyro.elbo import MeanFieldNoiseELBO

    torch.manual_seed(2)
    model = noisy_mlp((6, 5, 4, 3))
    guide = AutoTruncatedLogNormal(model, init_loc=-0.7, init_scale=0.4)
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    guide(x, y)
    model.noise[1].mask[1] = 0.0  # a pruned structure must be left out of the KL by both
    params = [p for p in list(model.parameters()) + list(guide.parameters())]
    results = []
    for elbo in (MeanFieldNoiseELBO(), TraceMeanField_ELBO()):
        pyro.set_rng_seed(11)
        loss = elbo.differentiable_loss(model, guide, x, y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((loss, grads))
    (l1, g1), (l2, g2) = results
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6)
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_pass_elbo_falls_back_for_other_latent_sites():
    from bmrs_pyro.elbo import MeanFieldNoiseELBO

    class WithLatent(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.noise = MultiplicativeNoise(3)

        def forward(self, x, y=None):
            shift = pyro.sample("shift", pdist.Normal(0.0, 1.0))
            mean = self.noise(x).sum(-1) + shift  # noise layers go outside the data plate
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", pdist.Normal(mean, 1.0), obs=y)

    model = WithLatent()
    guide = AutoGuideList(model)
    guide.append(AutoTruncatedLogNormal(model))
    guide.append(AutoNormal(hide_noise_sites(model)))
    elbo = MeanFieldNoiseELBO()
    x, y = torch.randn(4, 3), torch.randn(4)
    assert torch.isfinite(elbo.differentiable_loss(model, guide, x, y))
    assert elbo.used_fallback


def test_guide_lr_gives_the_variational_parameters_their_own_rate(noisy_mlp):
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    model = noisy_mlp((5, 4, 3))
    guide = AutoTruncatedLogNormal(model)
    hist = fit(model, guide, (x, y), epochs=1, batch_size=16, lr=1e-3, guide_lr=0.1, progress=False)
    groups = hist.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 0.1]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in guide.parameters()}
    # one Adam step moves each parameter by about its learning rate
    loc, _ = guide.loc_scale("noise.0.theta")
    assert 0.05 < loc.detach().abs().max().item() <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="guide_lr"):
        fit(model, guide, (x, y), epochs=1, guide_lr=0.0, progress=False)


def test_evaluate_uses_running_batchnorm_statistics_and_restores_the_mode():
    from bmrs_pyro.nn import NoisyClassifier

    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                              MultiplicativeNoise(6), torch.nn.Linear(6, 3))
    model = NoisyClassifier(net)
    guide = AutoTruncatedLogNormal(model)
    x, y = torch.randn(20, 4) * 3 + 1, torch.randint(0, 3, (20,))
    guide(x, y)
    with torch.no_grad():
        net[1].running_mean.fill_(5.0)  # far from the batch mean: train-mode BN would ignore it
    before = net[1].running_mean.clone()
    metrics = evaluate(model, guide, (x, y))
    assert torch.equal(net[1].running_mean, before)  # no running-stat update: eval mode was used
    assert model.training  # restored
    model.eval()
    with noise_mode(model, "mean"):
        log_p = torch.log_softmax(model.logits(x), -1)
    expected = -log_p.gather(-1, y.unsqueeze(-1)).mean().item()
    assert metrics["nll"] == pytest.approx(expected, rel=1e-5)


def test_structures_masked_before_fit_keep_their_variational_parameters(noisy_mlp):
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    model = noisy_mlp((5, 6, 3))
    guide = AutoTruncatedLogNormal(model)
    fit(model, guide, (x, y), epochs=2, batch_size=8, lr=0.05, progress=False)
    layer = model.noise[0]
    layer.mask[[1, 4]] = 0.0
    before = [t.detach().clone() for t in guide.loc_scale("noise.0.theta")]
    fit(model, guide, (x, y), epochs=3, batch_size=8, lr=0.05, progress=False)
    after = guide.loc_scale("noise.0.theta")
    for b, a in zip(before, after):
        assert torch.equal(a.detach()[[1, 4]], b[[1, 4]])
        assert not torch.equal(a.detach()[[0, 2]], b[[0, 2]])


def test_the_one_pass_loss_is_a_pyro_elbo_that_plugs_into_svi(digits):
    """SVI(model, guide, pyro.optim.Adam, MeanFieldNoiseELBO()).step trains weights and posteriors
    (it used to raise TypeError: not callable), with the same loss value as TraceMeanField_ELBO."""
    from pyro.infer import ELBO, SVI, TraceMeanField_ELBO
    from pyro.optim import Adam

    from bmrs_pyro.elbo import MeanFieldNoiseELBO
    from bmrs_pyro.models import mlp

    (x, y), _ = digits
    x, y = x[:64], y[:64]
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = mlp(64, 10, hidden=(12,))
    guide = AutoTruncatedLogNormal(model)
    guide(x, y)
    assert isinstance(MeanFieldNoiseELBO(), ELBO)
    pyro.set_rng_seed(3)
    ours = MeanFieldNoiseELBO().loss(model, guide, x, y)
    pyro.set_rng_seed(3)
    theirs = TraceMeanField_ELBO().loss(model, guide, x, y)
    assert ours == pytest.approx(theirs, rel=1e-5)
    weights = [p.detach().clone() for p in model.parameters()]
    posterior = [p.detach().clone() for p in guide.parameters()]
    svi = SVI(model, guide, Adam({"lr": 0.01}), MeanFieldNoiseELBO())
    losses = [svi.step(x, y) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(posterior, guide.parameters()))
