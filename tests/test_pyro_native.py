"""Issue 12, points 1-5: the loss is a Pyro ELBO, Predictive shapes, kl_weight in the loss,
pruning as a callback, one freeze helper, one training loop and one evaluator."""

import ast
import inspect
import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Predictive, TraceMeanField_ELBO
from torch import nn

import bmrs_pyro
from bmrs_pyro import infer, runs
from bmrs_pyro.callbacks import PruneEvery
from bmrs_pyro.elbo import MeanFieldNoiseELBO, ScaleLatent, WeightedTrace_ELBO, WeightedTraceMeanField_ELBO
from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import TrainingDivergedError, evaluate, fit
from bmrs_pyro.nn import MultiplicativeNoise, noise_modules
from bmrs_pyro.optim import freeze_pruned


class MyModel(pyro.nn.PyroModule):  # the README's hand-written model, verbatim
    def __init__(self):
        super().__init__()
        self.fc1, self.noise1, self.out = nn.Linear(64, 50), MultiplicativeNoise(50), nn.Linear(50, 10)

    def forward(self, x, y=None):
        logits = self.out(self.noise1(torch.tanh(self.fc1(x.flatten(1)))))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", pyro.distributions.Categorical(logits=logits), obs=y)
        return logits


def _setup(model, x, y, **guide_options):
    guide = AutoTruncatedLogNormal(model, **guide_options)
    guide(x, y)
    return guide


def _params(model, guide):
    return list(model.parameters()) + list(guide.parameters())


@pytest.mark.parametrize("kl_weight", [1.0, 2.5, 0.0])
def test_loss_loss_and_grads_and_differentiable_loss_match_tracemeanfield(kl_weight):
    """All three ELBO methods give TraceMeanField_ELBO's value and gradients (with the KL times
    kl_weight on both sides: ours in the one pass, Pyro's through a latent-scale handler)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = MyModel()
    x, y = torch.randn(7, 64), torch.randint(0, 10, (7,))
    guide = _setup(model, x, y, init_loc=-1.0, init_scale=0.5)
    model.noise1.mask[3] = 0.0
    params = _params(model, guide)
    ours, theirs = MeanFieldNoiseELBO(kl_weight=kl_weight), WeightedTraceMeanField_ELBO(kl_weight=kl_weight)
    values, grads = [], []
    for elbo in (ours, theirs):
        pyro.set_rng_seed(4)
        values.append(elbo.loss(model, guide, x, y))
        for p in params:
            p.grad = None
        pyro.set_rng_seed(4)
        values.append(elbo.loss_and_grads(model, guide, x, y))
        grads.append([p.grad.clone() for p in params])
        pyro.set_rng_seed(4)
        values.append(elbo.differentiable_loss(model, guide, x, y).item())
    assert not ours.used_fallback
    assert values[1:] == pytest.approx([values[0]] * 5, rel=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the KL part really is weighted: against the unweighted loss minus (1 - w) * KL
    pyro.set_rng_seed(4)
    plain = TraceMeanField_ELBO().loss(model, guide, x, y)
    keep = model.noise1.mask.bool()
    kl = torch.distributions.kl_divergence(guide.posterior("noise1.theta"), _prior_one(model.noise1))
    assert values[0] == pytest.approx(plain - (1 - kl_weight) * kl[keep].sum().item(), rel=1e-5)


def _prior_one(layer):
    from bmrs_pyro.distributions import LogUniform

    return LogUniform(torch.tensor(layer.low), torch.tensor(layer.high)).expand((layer.num_structures,))


def test_weighted_trace_elbo_with_zero_weight_is_the_likelihood_alone():
    pyro.clear_param_store()
    model = MyModel()
    x, y = torch.randn(5, 64), torch.randint(0, 10, (5,))
    guide = _setup(model, x, y)
    pyro.set_rng_seed(1)
    loss = WeightedTrace_ELBO(kl_weight=0.0).loss(model, guide, x, y)
    pyro.set_rng_seed(1)
    trace = pyro.poutine.trace(pyro.poutine.replay(model, pyro.poutine.trace(guide).get_trace(x, y))).get_trace(x, y)
    assert loss == pytest.approx(-trace.nodes["obs"]["fn"].log_prob(y).sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match="kl_weight"):
        ScaleLatent(-1.0)


@pytest.mark.parametrize("which", ["readme", "zoo"])
def test_predictive_returns_num_samples_by_batch_for_obs(which, digits):
    (x, y), _ = digits
    pyro.clear_param_store()
    torch.manual_seed(0)
    if which == "readme":
        model = MyModel()
    else:
        from bmrs_pyro.models import mlp

        model = mlp(64, 10, hidden=(12, 8))
    guide = AutoTruncatedLogNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), MeanFieldNoiseELBO())
    svi.step(x[:32], y[:32])
    predictive = Predictive(model, guide=guide, num_samples=5, return_sites=["obs"])
    obs = predictive(x[:4])["obs"]
    assert obs.shape == (5, 4)
    assert obs.dtype == torch.long and bool(((obs >= 0) & (obs < 10)).all())
    # the noise sites add one plate dimension at most (the examples), none for the structures
    thetas = Predictive(model, guide=guide, num_samples=3)(x[:4])
    for site in noise_modules(model):
        assert thetas[site].shape[0] == 3 and thetas[site].shape[-1] == noise_modules(model)[site].num_structures


def test_kl_weight_is_the_losss_not_state_on_layers(noisy_mlp):
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    losses = {}
    for how in ("fit", "elbo"):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = noisy_mlp((5, 6, 3))
        guide = AutoTruncatedLogNormal(model)
        options = dict(kl_weight=3.0) if how == "fit" else dict(loss=MeanFieldNoiseELBO(kl_weight=3.0))
        losses[how] = fit(model, guide, (x, y), epochs=2, batch_size=8, progress=False, **options).loss
        assert all(not hasattr(layer, "kl_weight") for layer in noise_modules(model).values())
    assert losses["fit"] == losses["elbo"]
    with pytest.raises(ValueError, match="kl_weight"):
        fit(model, guide, (x, y), epochs=1, kl_weight=2.0, loss=MeanFieldNoiseELBO(), progress=False)


def _prune_run(noisy_mlp, **options):
    pyro.clear_param_store()
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = noisy_mlp((5, 8, 3))
    guide = AutoTruncatedLogNormal(model, init_loc=-8.0, init_scale=3.0)  # near the prior: prunable
    history = fit(model, guide, (x, y), epochs=5, batch_size=16, lr=0.05, progress=False, **options)
    return history, model, guide


def test_prune_every_is_a_callback_and_the_shorthand_builds_it(noisy_mlp):
    opts = {"joint_check": False, "margin": 5.0}
    short, m1, g1 = _prune_run(noisy_mlp, prune_every=2, prune_start=1, prune_options=opts)
    long, m2, g2 = _prune_run(noisy_mlp, callbacks=[PruneEvery(2, "bmrs_n", opts, start=1)])
    events = [e for e in long.events if e["event"] == "prune"]
    assert [e["epoch"] for e in events] == [0, 2, 4]
    assert events == [e for e in short.events if e["event"] == "prune"]
    assert short.loss == long.loss
    assert any(e["fraction_removed"] > 0 for e in events)  # not vacuous: it did prune
    for a, b in zip(noise_modules(m1).values(), noise_modules(m2).values()):
        assert torch.equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="prune_start"):
        PruneEvery(2, start=0)
    with pytest.raises(ValueError, match="fraction"):
        PruneEvery(2, "l2")


def test_training_does_not_import_the_pruner():
    """No function-local import anywhere in infer.py, and the module never names the pruner."""
    tree = ast.parse(inspect.getsource(infer))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(node)), node.name
    assert "pruner" not in {getattr(n, "module", None) for n in ast.walk(tree)}
    assert not hasattr(runs, "hold_pruned") and not hasattr(infer, "_freeze_masked")


def test_freeze_pruned_holds_values_and_zeroes_adams_first_moment(noisy_mlp):
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    model = noisy_mlp((5, 6, 3))
    guide = AutoTruncatedLogNormal(model)
    history = fit(model, guide, (x, y), epochs=2, batch_size=8, lr=0.05, progress=False)
    optimizer = history.optimizer
    model.noise[0].mask[[1, 4]] = 0.0
    frozen = freeze_pruned(model, guide, optimizer)
    assert len(frozen.entries) == 2  # loc and log scale of the one layer with pruned structures
    for p, dead, values in frozen.entries:
        assert torch.equal(optimizer.state[p]["exp_avg"][dead], torch.zeros(2))
        assert bool((optimizer.state[p]["exp_avg"][~dead] != 0).any())
        before = p.detach().clone()
        with torch.no_grad():
            p.add_(1.0)
        frozen.restore()
        assert torch.equal(p.detach()[dead], before[dead]) and not torch.equal(p.detach(), before)


def test_one_loop_for_the_baselines_and_one_evaluator(noisy_mlp):
    from bmrs_pyro.baselines.common import accuracy, make_deterministic, train_network

    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    model = noisy_mlp((5, 6, 3))
    make_deterministic(model)
    losses = train_network(model, (x, y), epochs=3, lr=0.01, batch_size=8)
    assert len(losses) == 3 and losses[-1] < losses[0]
    # accuracy and evaluate are the same evaluator (classify): same number on a deterministic net
    assert accuracy(model, (x, y)) == evaluate(model, None, (x, y))["accuracy"]
    with pytest.raises(TrainingDivergedError, match="epoch 0, step 0"):
        train_network(model, (x, y), epochs=1, penalty=lambda: torch.tensor(float("nan")))
    source = inspect.getsource(train_network)
    assert "run_epoch" in source and "backward" not in source


def test_readme_svi_loop_with_kl_weight_trains():
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = MyModel()
    guide = AutoTruncatedLogNormal(model)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), MeanFieldNoiseELBO(kl_weight=0.5))
    values = [svi.step(x, y) for _ in range(3)]
    assert all(math.isfinite(v) for v in values)
    assert bmrs_pyro.fit is fit
