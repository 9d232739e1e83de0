"""The learning-rate anneal of fit, the second half of the training recipe (issue 11)."""

import math

import pyro
import pytest
import torch

import bmrs_pyro.infer as infer
from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import ANNEAL_FACTOR, ANNEAL_FRACTION, anneal_epochs_for, fit


def _data(n=48, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def _record_rates(monkeypatch):
    """Per epoch run by fit, the (weights' rate, guide's rate) its optimizer steps with."""
    seen = []
    original = infer.run_epoch

    def recording(step_loss, optimizer, batches, **kwargs):
        seen.append(tuple(g["lr"] for g in optimizer.param_groups))
        return original(step_loss, optimizer, batches, **kwargs)

    monkeypatch.setattr(infer, "run_epoch", recording)
    return seen


def test_anneal_lowers_the_weights_rate_for_the_last_epochs_only(noisy_mlp, monkeypatch):
    seen = _record_rates(monkeypatch)
    model = noisy_mlp((5, 4, 3))
    guide = AutoTruncatedLogNormal(model)
    hist = fit(model, guide, _data(), epochs=6, batch_size=16, lr=1e-2, guide_lr=0.05, seed=0, progress=False,
               warm_start_epochs=1, anneal_epochs=2, anneal_factor=0.25)
    # groups: the weights, then the variational parameters (bmrs_pyro.optim.param_groups)
    assert seen == [(1e-2, 0.05)] * 4 + [(1e-2 * 0.25, 0.05)] * 2
    assert [e for e in hist.events if e["event"] == "anneal_start"] == [
        {"epoch": 4, "event": "anneal_start", "epochs": 2, "factor": 0.25}]


def test_anneal_with_one_group_anneals_both(noisy_mlp, monkeypatch):
    seen = _record_rates(monkeypatch)
    model = noisy_mlp((5, 4, 3))
    fit(model, AutoTruncatedLogNormal(model), _data(), epochs=3, batch_size=16, lr=1e-2, seed=0, progress=False,
        anneal_epochs=1)
    assert seen == [(1e-2,), (1e-2,), (1e-2 * ANNEAL_FACTOR,)]


def test_no_anneal_leaves_a_given_optimizers_rates_alone(noisy_mlp, monkeypatch):
    x, y = _data()
    losses = []
    for kwargs in ({}, {"anneal_epochs": 0}):
        pyro.clear_param_store()
        torch.manual_seed(3)
        model = noisy_mlp((5, 4, 3))
        losses.append(fit(model, AutoTruncatedLogNormal(model), (x, y), epochs=2, batch_size=16, seed=5,
                          progress=False, **kwargs).loss)
    assert losses[0] == losses[1] and len(losses[0]) == 6
    model = noisy_mlp((5, 4, 3))
    guide = AutoTruncatedLogNormal(model)
    hist = fit(model, guide, (x, y), epochs=1, batch_size=16, lr=1e-2, guide_lr=0.05, seed=0, progress=False)
    for group in hist.optimizer.param_groups:
        group["lr"] = 0.123
    seen = _record_rates(monkeypatch)
    fit(model, guide, (x, y), epochs=2, batch_size=16, lr=1e-2, seed=0, progress=False, optimizer=hist.optimizer,
        start_epoch=1)
    assert seen == [(0.123, 0.123)] * 2


def test_a_run_resumed_inside_the_anneal_ends_bit_identical(noisy_mlp):
    x, y = _data(n=64)

    def fresh():
        pyro.clear_param_store()
        torch.manual_seed(7)
        model = noisy_mlp((5, 6, 3))
        return model, AutoTruncatedLogNormal(model)

    common = dict(batch_size=16, lr=1e-2, guide_lr=0.05, seed=2, progress=False)
    model, guide = fresh()
    whole = fit(model, guide, (x, y), epochs=7, warm_start_epochs=2, anneal_epochs=3, **common)
    expected = {k: v.clone() for k, v in {**model.state_dict(), **guide.state_dict()}.items()}

    model, guide = fresh()
    first = fit(model, guide, (x, y), epochs=7, warm_start_epochs=2, anneal_epochs=3, **common,
                callbacks=[lambda epoch, *_: epoch == 4])  # interrupted after the first annealed epoch
    rest = fit(model, guide, (x, y), epochs=2, start_epoch=5, anneal_epochs=2, optimizer=first.optimizer,
               history=first, rng_state=first.rng_state, **common)  # what bmrs_pyro.runs.train passes
    got = {**model.state_dict(), **guide.state_dict()}
    assert rest.loss == whole.loss
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert sum(e["event"] == "anneal_start" for e in rest.events) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"anneal_epochs": -1}, "anneal_epochs"), ({"anneal_epochs": 1.5}, "anneal_epochs"),
    ({"anneal_epochs": True}, "anneal_epochs"), ({"anneal_epochs": 4}, "anneal_epochs"),
    ({"anneal_epochs": 2, "warm_start_epochs": 2}, "anneal_epochs"),
    ({"anneal_epochs": 1, "anneal_factor": 0.0}, "anneal_factor"),
    ({"anneal_epochs": 1, "anneal_factor": math.nan}, "anneal_factor"),
])
def test_anneal_bad_values(noisy_mlp, kwargs, match):
    model = noisy_mlp((5, 4, 3))
    with pytest.raises(ValueError, match=match):
        fit(model, AutoTruncatedLogNormal(model), _data(), epochs=3, progress=False, **kwargs)


def test_anneal_epochs_for():
    assert anneal_epochs_for(80) == round(80 * ANNEAL_FRACTION) == 8
    assert anneal_epochs_for(100) == 10 and anneal_epochs_for(3) == 0 and anneal_epochs_for(10, 0.0) == 0
    for bad in (-0.1, 1.0, True, "a tenth"):
        with pytest.raises(ValueError, match="anneal fraction"):
            anneal_epochs_for(10, bad)


def test_noise_criteria_anneal_by_default_at_the_end_of_the_budget():
    from bmrs_pyro.baselines import METHODS
    from bmrs_pyro.baselines.common import Budget
    from bmrs_pyro.data import load
    from bmrs_pyro.models import mlp

    data = load("digits", seed=1, subset=240)
    method = METHODS["bmrs_n"]
    budget = Budget(epochs=10, finetune_epochs=0)
    fitted = method.fit_noise_model(lambda: mlp(64, 10, hidden=(10,)), data, 0, budget, method.check_options({}))
    assert [(e["epoch"], e["epochs"]) for e in fitted.history.events if e["event"] == "anneal_start"] == [(9, 1)]
    fitted = method.fit_noise_model(lambda: mlp(64, 10, hidden=(10,)), data, 0, budget,
                                    method.check_options({"anneal": 0.0}))
    assert not any(e["event"] == "anneal_start" for e in fitted.history.events)


def test_compare_passes_the_anneal_to_the_noise_criteria_only():
    from bmrs_pyro.compare import CompareConfig, iter_noise_methods
    from bmrs_pyro.data import load
    from bmrs_pyro.models import mlp

    config = CompareConfig(methods=("bmrs_n", "iap"), anneal=0.2, name="x")
    assert config.method_options("bmrs_n")["anneal"] == 0.2 and "anneal" not in config.method_options("iap")
    assert config.to_dict()["anneal"] == 0.2
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="anneal"):
            CompareConfig(methods=("bmrs_n",), anneal=bad, name="x")
    data = load("digits", seed=1, subset=240)
    with pytest.raises(ValueError, match="anneal"):
        next(iter_noise_methods(["bmrs_n", "snr"], lambda: mlp(64, 10, hidden=(6,)), data,
                                budget={"epochs": 2}, options={"snr": {"anneal": 0.0}}))


def test_run_config_resolves_and_checks_the_anneal():
    from bmrs_pyro.run_config import RunConfig

    cfg = RunConfig(epochs=50).resolved()
    assert cfg.anneal_epochs == 5 and cfg.warm_start_epochs == 12
    assert RunConfig(epochs=50, anneal_epochs=0).resolved().anneal_epochs == 0
    with pytest.raises(ValueError, match="anneal_epochs"):
        RunConfig(epochs=10, warm_start_epochs=5, anneal_epochs=6).resolved().validate()
    with pytest.raises(ValueError, match="anneal_epochs"):
        RunConfig(epochs=10, anneal_epochs=-1).resolved().validate()


def test_elbo_plot_marks_the_anneal():
    from analysis.plots_training import plot_elbo

    events = [{"epoch": 8, "event": "anneal_start", "epochs": 2, "factor": 0.1}]
    fig = plot_elbo({"elbo": [-float(100 - i) for i in range(10)], "events": events})
    labels = fig.axes[0].get_legend().get_texts()
    assert any("rate x 0.1" in t.get_text() for t in labels)
