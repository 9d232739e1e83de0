"""The deterministic warm start of fit and the training recipe built on it (issue 11)."""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from bmrs_pyro.checkpoint import history_from_dict
from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import History, deterministic_loss, fit, minibatch_loss
from bmrs_pyro.nn import MultiplicativeNoise, noise_mode, noise_modules, set_mode


def _data(n=40, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _guide_values(guide):
    return {k: v.detach().clone() for k, v in guide.state_dict().items()}


# ---------------------------------------------------------------- the "off" mode


def test_off_mode_is_theta_one_times_mask_and_samples_nothing():
    layer = MultiplicativeNoise(4)
    layer.mask[1] = 0.0
    x = torch.randn(3, 4)
    layer.mode = "off"
    trace = poutine.trace(layer).get_trace(x)
    out = trace.nodes["_RETURN"]["value"]
    assert torch.equal(out, x * torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert not [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    layer.mode = "sample"
    assert [n for n, s in poutine.trace(layer).get_trace(x).nodes.items() if s["type"] == "sample"]


def test_set_mode_accepts_off_and_rejects_unknown(noisy_mlp):
    model = noisy_mlp((5, 4, 3))
    with noise_mode(model, "off"):
        assert {m.mode for m in noise_modules(model).values()} == {"off"}
    assert {m.mode for m in noise_modules(model).values()} == {"sample"}
    with pytest.raises(ValueError, match="mode"):
        set_mode(model, "deterministic")


def test_deterministic_loss_is_the_scaled_cross_entropy_at_theta_one(noisy_mlp):
    x, y = _data()
    model = noisy_mlp((5, 4, 3))
    loss = deterministic_loss(model, x[:8], y[:8], dataset_size=40)
    with noise_mode(model, "off"):
        logits = model(x[:8])
    assert torch.allclose(loss, 5.0 * F.cross_entropy(logits, y[:8], reduction="sum"))
    # and it differs from the SVI loss (noise + KL), so the test above is not vacuous
    guide = AutoTruncatedLogNormal(model)
    assert not torch.allclose(loss, minibatch_loss(model, guide, x[:8], y[:8], dataset_size=40))


def test_deterministic_loss_rejects_other_latent_sites():
    class Bayesian(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.noise = MultiplicativeNoise(2)

        def forward(self, x, y=None):
            w = pyro.sample("w", pyro.distributions.Normal(0.0, 1.0))
            logits = self.noise(x) * w
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", pyro.distributions.Categorical(logits=logits), obs=y)

    with pytest.raises(ValueError, match="only latent sites"):
        deterministic_loss(Bayesian(), torch.randn(4, 2), torch.zeros(4, dtype=torch.long), dataset_size=4)


# ---------------------------------------------------------------- fit(warm_start_epochs=k)


def test_warm_start_is_deterministic_adam_and_leaves_the_guide_untouched(noisy_mlp):
    """Warm-start epochs = Adam on -(N/B) sum log p(y|x, theta=1), step for step; no KL, guide fixed."""
    x, y = _data()
    torch.manual_seed(1)
    model = noisy_mlp((5, 4, 3))
    twin = noisy_mlp((5, 4, 3))
    twin.load_state_dict(model.state_dict())
    guide = AutoTruncatedLogNormal(model)
    hist = fit(model, guide, (x, y), epochs=3, batch_size=16, lr=1e-2, guide_lr=0.05, seed=7, progress=False,
               warm_start_epochs=3)
    # the guide kept its initial values: loc 0, log scale -5
    for key, value in _guide_values(guide).items():
        expected = 0.0 if "locs" in key else -5.0
        assert torch.allclose(value, torch.full_like(value, expected)), key
    # the same epochs by hand on the twin: theta = 1, no KL
    opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        order = torch.randperm(40, generator=gen)
        for start in range(0, 40, 16):
            idx = order[start:start + 16]
            with noise_mode(twin, "off"):
                loss = (40 / len(idx)) * F.cross_entropy(twin(x[idx]), y[idx], reduction="sum")
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert hist.elbo == [] and hist.loss == []
    assert len(hist.warm_start) == 3 and len(hist.seconds) == 3
    assert all(v < 0 for v in hist.warm_start)  # log likelihoods
    assert hist.events == [{"epoch": 2, "event": "warm_start_end", "epochs": 3}]


def test_warm_start_counts_inside_epochs_then_svi(noisy_mlp):
    x, y = _data()
    model = noisy_mlp((5, 4, 3))
    guide = AutoTruncatedLogNormal(model)
    hist = fit(model, guide, (x, y), epochs=5, batch_size=16, lr=1e-2, guide_lr=0.05, seed=0, progress=False,
               warm_start_epochs=2)
    assert len(hist.warm_start) == 2 and len(hist.elbo) == 3 and len(hist.seconds) == 5
    assert len(hist.loss) == 3 * 3  # three SVI epochs of three batches
    assert hist.events[0]["event"] == "warm_start_end" and hist.events[0]["epoch"] == 1
    moved = [not torch.allclose(v, torch.full_like(v, 0.0 if "locs" in k else -5.0))
             for k, v in _guide_values(guide).items()]
    assert all(moved)  # SVI did update the posteriors after the warm start


def test_warm_start_callbacks_see_every_epoch(noisy_mlp):
    x, y = _data()
    model = noisy_mlp((5, 4, 3))
    guide = AutoTruncatedLogNormal(model)
    seen = []
    fit(model, guide, (x, y), epochs=4, batch_size=16, seed=0, progress=False, warm_start_epochs=2,
        callbacks=[lambda epoch, history, m, g: seen.append((epoch, len(history.warm_start), len(history.elbo)))])
    assert seen == [(0, 1, 0), (1, 2, 0), (2, 2, 1), (3, 2, 2)]


def test_no_continuous_pruning_during_the_warm_start(noisy_mlp):
    x, y = _data(n=64)
    model = noisy_mlp((5, 6, 3))
    guide = AutoTruncatedLogNormal(model)
    hist = fit(model, guide, (x, y), epochs=6, batch_size=16, seed=0, progress=False, warm_start_epochs=3,
               prune_every=1, prune_method="snr")
    prunes = [e["epoch"] for e in hist.events if e["event"] == "prune"]
    assert prunes == [3, 4, 5]
    # the pruning warm-up counts from the end of the warm start: a quarter of the 4 SVI epochs (1),
    # so the first reduction follows epoch 3 (index 2), then every 2 epochs
    hist = fit(model, guide, (x, y), epochs=6, batch_size=16, seed=0, progress=False, warm_start_epochs=2,
               prune_every=2, prune_method="snr", history=History())
    assert [e["epoch"] for e in hist.events if e["event"] == "prune"] == [2, 4]


def test_warm_start_default_is_zero_and_unchanged(noisy_mlp):
    x, y = _data()
    losses = []
    for kwargs in ({}, {"warm_start_epochs": 0}):
        pyro.clear_param_store()
        torch.manual_seed(3)
        model = noisy_mlp((5, 4, 3))
        guide = AutoTruncatedLogNormal(model)
        losses.append(fit(model, guide, (x, y), epochs=2, batch_size=16, seed=5, progress=False, **kwargs).loss)
    assert losses[0] == losses[1] and len(losses[0]) == 6


@pytest.mark.parametrize("value", [-1, 4, 1.5, True, None])
def test_warm_start_bad_values(noisy_mlp, value):
    model = noisy_mlp((5, 4, 3))
    guide = AutoTruncatedLogNormal(model)
    with pytest.raises(ValueError, match="warm_start_epochs"):
        fit(model, guide, _data(), epochs=3, progress=False, warm_start_epochs=value)


def test_history_round_trips_the_warm_start():
    history = History(elbo=[-3.0], warm_start=[-5.0, -4.0], seconds=[0.1, 0.1, 0.1])
    again = history_from_dict(history.to_dict())
    assert again.warm_start == [-5.0, -4.0] and again.elbo == [-3.0]
    assert math.isclose(sum(again.seconds), 0.3)


# ---------------------------------------------------------------- the recipe in the noise criteria


def test_warm_start_epochs_for():
    from bmrs_pyro.infer import WARM_START_FRACTION, warm_start_epochs_for

    assert warm_start_epochs_for(80) == round(80 * WARM_START_FRACTION)
    assert warm_start_epochs_for(80, 0.0) == 0 and warm_start_epochs_for(81, 0.5) == 40
    assert warm_start_epochs_for(2, 0.9) == 1  # at least one SVI epoch
    for bad in (-0.1, 1.0, True, "half"):
        with pytest.raises(ValueError, match="warm-start fraction"):
            warm_start_epochs_for(10, bad)


def test_noise_criteria_warm_start_by_default_inside_the_budget():
    from bmrs_pyro.baselines import METHODS
    from bmrs_pyro.baselines.common import Budget
    from bmrs_pyro.data import load
    from bmrs_pyro.infer import WARM_START_FRACTION
    from bmrs_pyro.models import mlp

    data = load("digits", seed=1, subset=240)
    method = METHODS["bmrs_n"]
    assert method.defaults["warm_start"] == WARM_START_FRACTION
    budget = Budget(epochs=4, finetune_epochs=0)
    fitted = method.fit_noise_model(lambda: mlp(64, 10, hidden=(10,)), data, 0, budget, method.check_options({}))
    warm = round(4 * WARM_START_FRACTION)
    assert warm >= 1 and len(fitted.history.warm_start) == warm and len(fitted.history.elbo) == 4 - warm
    fitted = method.fit_noise_model(lambda: mlp(64, 10, hidden=(10,)), data, 0, budget,
                                    method.check_options({"warm_start": 0.0}))
    assert fitted.history.warm_start == [] and len(fitted.history.elbo) == 4


def test_shared_fit_refuses_methods_with_different_warm_starts():
    from bmrs_pyro.compare import iter_noise_methods
    from bmrs_pyro.data import load
    from bmrs_pyro.models import mlp

    data = load("digits", seed=1, subset=240)
    with pytest.raises(ValueError, match="warm_start"):
        next(iter_noise_methods(["bmrs_n", "snr"], lambda: mlp(64, 10, hidden=(6,)), data,
                                budget={"epochs": 2}, options={"snr": {"warm_start": 0.0}}))


@pytest.mark.slow
def test_recipe_beats_svi_from_scratch_on_mnist1d():
    """The default recipe against the pre-issue-11 training, same budget, same code path (~50 s).

    32 epochs: the quarter warm start leaves 24 SVI epochs (at 16 epochs, 4 + 12, the two were
    within 2 points: 42.3 against 40.6 % validation; at 32, 54.1 against 47.9 %)."""
    from bmrs_pyro.baselines import METHODS
    from bmrs_pyro.baselines.common import Budget
    from bmrs_pyro.data import load
    from bmrs_pyro.models import mlp

    torch.set_num_threads(1)
    data = load("mnist1d", seed=0)
    method = METHODS["bmrs_n"]
    budget = Budget(epochs=32, batch_size=64, finetune_epochs=0)
    scores = {}
    for name, options in (("old", {"warm_start": 0.0}), ("recipe", {})):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        fitted = method.fit_noise_model(lambda: mlp(40, 10, hidden=(100, 100)), data, 0, budget,
                                        method.check_options(options))
        scores[name] = (fitted.unpruned_val, fitted.unpruned_test)
    assert scores["recipe"][0] > scores["old"][0] + 0.02, scores
    assert scores["recipe"][1] > scores["old"][1] + 0.02, scores


def test_compare_passes_warm_start_to_the_noise_criteria_only():
    from bmrs_pyro.compare import CompareConfig

    config = CompareConfig(methods=("bmrs_n", "iap"), warm_start=0.25, name="x")
    assert config.method_options("bmrs_n")["warm_start"] == 0.25
    assert "warm_start" not in config.method_options("iap")
    assert "warm_start" not in CompareConfig(methods=("bmrs_n",), name="x").method_options("bmrs_n")
    with pytest.raises(ValueError, match="warm_start"):
        CompareConfig(methods=("bmrs_n",), warm_start=1.0, name="x")


def test_kl_weight_zero_drops_exactly_the_kl(noisy_mlp):
    """kl_weight=0 (allowed by fit) used to crash in poutine.scale; now the KL term is just absent."""
    from torch.distributions import kl_divergence

    from bmrs_pyro.distributions import LogUniform

    x, y = _data(n=16)
    model = noisy_mlp((5, 4, 3))
    guide = AutoTruncatedLogNormal(model)
    guide(x, y)  # create the parameters first: the setup pass draws from the random state
    losses = {}
    for weight in (0.0, 1.0):
        pyro.set_rng_seed(11)
        losses[weight] = minibatch_loss(model, guide, x, y, dataset_size=16, kl_weight=weight)
    kl = sum(kl_divergence(guide.posterior(s), LogUniform(-20.0, 0.0)).sum() for s in guide.site_names)
    assert torch.allclose(losses[1.0] - losses[0.0], kl, rtol=1e-4)
    assert float(kl.detach()) > 1.0  # the difference is not vacuous
    hist = fit(model, guide, (x, y), epochs=1, batch_size=8, kl_weight=0.0, progress=False)
    assert len(hist.elbo) == 1 and math.isfinite(hist.elbo[0])
