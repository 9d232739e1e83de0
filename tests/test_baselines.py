"""Baseline pruning methods from related work behind one interface (issue 6, point 1).

Each method must remove the structures it should on a constructed case (units made dead by
zero incoming weights, a ReLU that never fires, or a bounded-BN importance driven low), its
pieces must match independent computations (hand derivatives, numpy norms, a scripted accuracy
sequence), and every ``run`` must return a well-formed :class:`MethodResult`.
"""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from bmrs_pyro.pruner import keep_fraction
from bmrs_pyro.baselines import METHODS, Budget, MethodResult, PruningMethod, get_method, register_method
from bmrs_pyro.baselines.aiap import (
    ThresholdSchedule,
    adaptive_rounds,
    layer_thresholds,
    remaining_weights,
    threshold_keep,
)
from bmrs_pyro.baselines.common import (
    accuracy,
    get_masks,
    incoming_weight_norm,
    last_within,
    links_of,
    make_deterministic,
    mean_activation,
    per_layer_counts,
    remove_lowest,
)
from bmrs_pyro.baselines.rni import (
    BoundedBatchNorm1d,
    BoundedBatchNorm2d,
    add_bounded_batchnorm,
    push_peak,
    rni_penalty,
    to_plain_batchnorm,
)
from bmrs_pyro.baselines.self_compression import structure_importance
from bmrs_pyro.curves import CurvePoint, count_parameters
from bmrs_pyro.data import load
from bmrs_pyro.infer import evaluate
from bmrs_pyro.models import lenet5, mlp
from bmrs_pyro.nn import MultiplicativeNoise, NoisyClassifier, noise_modules

DEAD = [1, 4, 7, 10]  # dead hidden units of the first layer (width 16) in the constructed cases
WIDTH = 16
DET = {"epochs": 8, "rounds": 1, "round_epochs": 1, "lr": 1e-2}  # deterministic nets: one pruning round


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These networks are tiny: a second thread only adds contention on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_data():
    return load("digits")


@pytest.fixture(scope="module")
def tiny_data():
    return load("digits", subset=500)


def first_site(model) -> str:
    return next(iter(noise_modules(model)))


def dead_mlp(kind: str, activation: str = "relu"):
    """A builder of mlp(64, 10, (16, 16)) whose first-layer units ``DEAD`` are dead.

    ``"silent"``: bias -50, so the ReLU never fires (zero activation, no gradient reaches them).
    ``"zero"``: zero incoming weights and bias, held at zero by gradient hooks (zero L1 norm;
    under BatchNorm their normalised output is exactly 0).
    ``"zero_active"``: zero incoming weights held at zero, bias 1: a constant, non-zero output.
    """

    def build():
        model = mlp(64, 10, hidden=(WIDTH, WIDTH), activation=activation)
        lin = model.net[1]
        rows = torch.zeros(WIDTH, 1)
        rows[DEAD] = 1.0
        with torch.no_grad():
            if kind == "silent":
                lin.bias[DEAD] = -50.0
            else:
                lin.weight[DEAD] = 0.0
                lin.bias[DEAD] = 1.0 if kind == "zero_active" else 0.0
                lin.weight.register_hook(lambda g: g * (1 - rows))
                lin.bias.register_hook(lambda g: g * (1 - rows[:, 0]))
        return model

    return build


def removed_units(model) -> list[int]:
    keep = get_masks(model)[first_site(model)]
    return torch.nonzero(~keep).flatten().tolist()


# ---------------------------------------------------------------- registry and interface


def test_registry_names_citations_and_docstrings():
    expected = {"bmrs_n", "bmrs_n_strict", "bmrs_n_ref", "bmrs_u8", "bmrs_u4", "snr", "e_theta", "l2", "rni", "self_compression",
                "iap", "aiap", "ilp"}
    assert set(METHODS) == expected
    for name, method in METHODS.items():
        assert isinstance(method, PruningMethod) and method.name == name
        assert get_method(name) is method
        surname = method.cite.split(",")[0].split()[0]  # first author
        doc = method.__doc__
        assert surname in doc, (name, surname)
        assert re_year(method.cite), method.cite
        assert "deviations" in doc.lower(), name
    with pytest.raises(ValueError, match="unknown pruning method"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_method(METHODS["iap"])


def re_year(text: str) -> bool:
    return any(str(y) in text for y in range(2015, 2026))


def test_bad_arguments_raise_value_errors(tiny_data):
    method = METHODS["iap"]
    build = lambda: mlp(64, 10, hidden=(8,))  # noqa: E731
    with pytest.raises(ValueError, match="unknown option"):
        method.run(build, tiny_data, fractions=0.3)
    with pytest.raises(ValueError, match="budget"):
        method.run(build, tiny_data, budget={"epoch": 1})
    with pytest.raises(ValueError, match="epochs"):
        Budget(epochs=0)
    with pytest.raises(ValueError, match="train"):
        method.run(build, (tiny_data.train, tiny_data.test))
    with pytest.raises(ValueError, match="MultiplicativeNoise"):
        method.run(lambda: NoisyClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))), tiny_data)


# ---------------------------------------------------------------- shared pieces against hand computations


def test_mean_activation_and_weight_norms_against_a_hand_forward():
    torch.manual_seed(3)
    model = mlp(6, 3, hidden=(5, 4), activation="tanh")
    make_deterministic(model)
    x = torch.randn(37, 6)
    net = model.net
    h1 = torch.tanh(x @ net[1].weight.T + net[1].bias)
    h2 = torch.tanh(h1 @ net[4].weight.T + net[4].bias)
    s1, s2 = list(noise_modules(model))
    act = mean_activation(model, x, batch_size=10)  # several batches
    np.testing.assert_allclose(act[s1].numpy(), h1.abs().mean(0).detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(act[s2].numpy(), h2.abs().mean(0).detach().numpy(), rtol=1e-6)
    links = links_of(model, x)
    l1 = incoming_weight_norm(links, p=1.0)
    np.testing.assert_allclose(l1[s1].numpy(), np.abs(net[1].weight.detach().numpy()).sum(1), rtol=1e-6)
    # conv filters: the norm runs over input channels and the kernel
    conv = lenet5(1, 10, 8)
    make_deterministic(conv)
    links = links_of(conv, torch.randn(2, 1, 8, 8))
    l2 = incoming_weight_norm(links)
    w = conv.net[0].weight.detach().numpy()
    np.testing.assert_allclose(l2[first_site(conv)].numpy(), np.sqrt((w ** 2).sum((1, 2, 3))), rtol=1e-6)


def test_masking_helpers_rank_within_layers_and_globally():
    imp = {"a": torch.tensor([5.0, 1.0, 3.0, 0.5]), "b": torch.tensor([0.1, 0.2, 9.0])}
    alive = {"a": torch.tensor([True, True, True, False]), "b": torch.ones(3, dtype=torch.bool)}
    counts = per_layer_counts(alive, 0.5)
    assert counts == {"a": 1, "b": 1}  # floor(0.5 * 3) each
    keep = remove_lowest(imp, alive, counts)
    assert keep["a"].tolist() == [True, False, True, False]  # the dead 0.5 is not counted again
    assert keep["b"].tolist() == [False, True, True]
    assert per_layer_counts({"c": torch.ones(2, dtype=torch.bool)}, 1.0) == {"c": 1}  # one always stays
    # global: the 4 lowest of 7 are b0, b1, a3, a1 -- but min_keep=2 leaves b two structures
    keep = keep_fraction(imp, 4 / 7, scope="global", min_keep=2)
    assert keep["a"].tolist() == [True, False, True, False]
    assert keep["b"].tolist() == [False, True, True]
    assert int(sum((~k).sum() for k in keep.values())) == 3  # one short: the floor per layer binds


def test_last_within_stops_before_the_first_loss_beyond_tolerance():
    pts = [CurvePoint(0, 0, 0.9, v) for v in (0.90, 0.905, 0.893, 0.88, 0.90)]
    assert last_within(pts, 0.90, 1.0) == 2  # 0.88 is 2 points below; 0.90 after it does not count
    assert last_within(pts, 0.90, 0.5) == 1
    assert last_within(pts[:1], 0.95, 1.0) == 0


# ---------------------------------------------------------------- the multiplicative-noise criteria


@pytest.mark.parametrize("factor", [0.1, 0.5])
def test_fine_tuning_runs_at_a_share_of_the_training_rates(factor, tiny_data, monkeypatch):
    import bmrs_pyro.baselines.noise_criteria as nc
    calls = []
    real_fit = nc.fit

    def recording_fit(*args, **kwargs):
        calls.append((kwargs.get("lr"), kwargs.get("guide_lr"), kwargs.get("epochs")))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(nc, "fit", recording_fit)
    METHODS["snr"].run(lambda: mlp(64, 10, hidden=(8,)), tiny_data,
                       fractions=[0.0, 0.25], guide_lr=0.04,
                       budget={"epochs": 2, "finetune_epochs": 1, "finetune_lr_factor": factor, "lr": 2e-3})
    training, tuning = calls[0], calls[1:]
    assert training == (2e-3, 0.04, 2)
    assert len(tuning) == 3  # two curve points and the stop
    for lr, guide_lr, epochs in tuning:
        assert lr == pytest.approx(factor * 2e-3) and guide_lr == pytest.approx(factor * 0.04) and epochs == 1
    for bad in (0.0, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="finetune_lr_factor"):
            Budget(finetune_lr_factor=bad)


def test_rni_fine_tunes_at_a_share_of_its_rate(tiny_data, monkeypatch):
    import bmrs_pyro.baselines.rni as rni
    rates = []
    real = rni.train_network

    def recording(*args, **kwargs):
        rates.append((kwargs["lr"], kwargs["epochs"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(rni, "train_network", recording)
    METHODS["rni"].run(lambda: mlp(64, 10, hidden=(8,)), tiny_data, fractions=[0.25],
                       budget={"epochs": 1, "finetune_epochs": 1, "finetune_lr_factor": 0.2, "lr": 5e-3})
    assert rates[0] == (5e-3, 1)
    assert len(rates) == 3 and all(r == pytest.approx(1e-3) and e == 1 for r, e in rates[1:])


@pytest.mark.parametrize("name", ["bmrs_n", "bmrs_u8", "bmrs_u4", "snr", "e_theta", "l2"])
def test_noise_criteria_remove_dead_units_first(name, digits_data):
    # A unit with zero output gets no likelihood gradient: only the KL moves its posterior (towards
    # more spread, a lower E[theta] and SNR, a higher dF), and its incoming weights stay at zero.
    # dF, SNR and E[theta] rank globally (4 of 32), L2 within each layer (4 of 16 per layer).
    fraction = 0.25 if name == "l2" else 0.125
    result = METHODS[name].run(dead_mlp("zero", "tanh"), digits_data, fractions=[0.0, fraction], guide_lr=1e-2,
                               budget={"epochs": 2, "finetune_epochs": 0, "lr": 1e-2})
    site = first_site(result.model)
    assert result.curve[1].removed[site] == DEAD
    if name != "l2":
        assert result.curve[1].kept_per_layer[site] == (WIDTH - len(DEAD), WIDTH)
        assert all(not r for s, r in result.curve[1].removed.items() if s != site)


# ---------------------------------------------------------------- RNI


def test_rni_penalty_gradient_sign_vanishing_and_peak():
    import mpmath

    lam, b = 1e-4, 3.0
    w = torch.linspace(-40.0, 30.0, 1401, dtype=torch.float64, requires_grad=True)
    value = rni_penalty(w, lam, b)
    (grad,) = torch.autograd.grad(value, w)
    # hand derivative, at 40 digits: d/dw [u (1 - log u)] = u'(1 - log u) - u' = -u (1 - u) log u
    mpmath.mp.dps = 40

    def hand(wi):
        u = 1 / (1 + mpmath.exp(-(mpmath.mpf(wi) + b)))
        return -lam * u * (1 - u) * mpmath.log(u), lam * u * (1 - mpmath.log(u))

    ref = [hand(wi) for wi in w.detach().tolist()]
    np.testing.assert_allclose(grad.numpy(), [float(g) for g, _ in ref], rtol=1e-9, atol=0)
    assert value.item() == pytest.approx(float(sum(v for _, v in ref)), rel=1e-12)
    assert (grad > 0).all()  # gradient descent only ever pushes importances down, even far in the tails
    peak = grad.max().item()
    assert grad[-1].item() < 1e-9 * peak and grad[0].item() < 1e-9 * peak  # vanishes at both extremes
    # the push peaks where the importance sigmoid(w) is about 0.015 for b = 3 (the authors' figure):
    # located here as a root of the derivative of the mpmath gradient, independently of push_peak's bisection
    w_star = mpmath.findroot(lambda x: mpmath.diff(lambda t: hand(t)[0], x), -4.0)
    assert push_peak(b) == pytest.approx(float(1 / (1 + mpmath.exp(-w_star))), rel=1e-8)
    assert push_peak(b) == pytest.approx(0.015, abs=5e-4)
    w0 = mpmath.findroot(lambda x: mpmath.diff(lambda t: hand(t - b)[0], x), -1.0)  # hand(t - b): b = 0
    assert push_peak(0.0) == pytest.approx(float(1 / (1 + mpmath.exp(-w0))), rel=1e-8)


def test_bounded_batchnorm_forward_and_plain_conversion():
    torch.manual_seed(0)
    bn = BoundedBatchNorm1d(5)
    x = torch.randn(64, 5) * 3 + 2
    y = bn(x)
    xhat = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(y, torch.sigmoid(bn.logit) * xhat)
    assert ((y.abs().amax(0) / xhat.abs().amax(0)) < 1).all()  # scale in (0, 1), no shift
    assert [n for n, _ in bn.named_parameters()] == ["logit"]
    model = lenet5(1, 10, 8)
    make_deterministic(model)
    x = torch.randn(16, 1, 8, 8)
    bounded = add_bounded_batchnorm(model, x)
    assert [type(m) for m in bounded.values()] == [BoundedBatchNorm2d, BoundedBatchNorm2d,
                                                   BoundedBatchNorm1d, BoundedBatchNorm1d]
    model.train()
    model.logits(x)  # running statistics move
    model.eval()
    before = model.logits(x)
    assert to_plain_batchnorm(model) == 4
    assert not any(isinstance(m, (BoundedBatchNorm1d, BoundedBatchNorm2d)) for m in model.modules())
    torch.testing.assert_close(model.logits(x), before)


def test_rni_importance_of_dead_units_recedes_and_they_alone_are_pruned(digits_data):
    result = METHODS["rni"].run(dead_mlp("zero", "tanh"), digits_data, seed=1,
                                budget={"epochs": 10, "finetune_epochs": 0, "lr": 1e-2}, fractions=[0.0, 0.125])
    site = next(iter(result.info["importance"]))
    imp = torch.tensor(result.info["importance"][site])
    live = [i for i in range(WIDTH) if i not in DEAD]
    assert imp[DEAD].max() < push_peak(3.0) < imp[live].min()  # only the dead ones receded
    assert sorted(torch.argsort(imp)[: len(DEAD)].tolist()) == DEAD
    assert removed_units(result.model) == DEAD  # the stopping rule s < 0.015 removes exactly them
    assert result.stop.structures_removed == pytest.approx(100 * len(DEAD) / (2 * WIDTH))
    # the global quantile at 4/32 removes the same four: they are the lowest of both layers
    assert result.curve[1].kept_per_layer[site] == (WIDTH - len(DEAD), WIDTH)


# ---------------------------------------------------------------- self-compression


def test_self_compression_importance_by_hand():
    model = mlp(6, 3, hidden=(4,))
    make_deterministic(model)
    links = links_of(model, torch.randn(2, 6))
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(4, 6))
    sd = rng.uniform(0.1, 2.0, size=(4, 6))
    moments = {"net.1.weight": (torch.tensor(mean), torch.tensor(sd))}
    site = first_site(model)
    norm = structure_importance(links, moments, "norm")[site].numpy()
    snr = structure_importance(links, moments, "snr")[site].numpy()
    np.testing.assert_allclose(norm, [math.sqrt(sum(v * v for v in row)) for row in mean.tolist()], rtol=1e-12)
    np.testing.assert_allclose(snr, np.sqrt((mean ** 2).sum(1) / (sd ** 2).sum(1)), rtol=1e-12)
    with pytest.raises(ValueError, match="criterion"):
        structure_importance(links, moments, "l1")


def test_self_compression_removes_units_whose_posterior_mean_weights_shrank(digits_data):
    # A ReLU unit that never fires gets no likelihood gradient: the KL pulls its posterior-mean
    # weights to the prior mean 0, so the first round (25 % of 16 = 4 per layer) removes it.
    result = METHODS["self_compression"].run(
        dead_mlp("silent"), digits_data, budget={"epochs": 3, "rounds": 1, "round_epochs": 1}, fraction=0.25,
        tolerance=100.0)
    assert removed_units(result.model) == DEAD
    assert result.curve[1].kept_per_layer[first_site(result.model)] == (WIDTH - len(DEAD), WIDTH)
    assert result.stop is result.curve[1]


# ---------------------------------------------------------------- IAP, ILP


def test_iap_removes_silent_units_first(digits_data):
    # tanh units with zero weights and bias output exactly 0; a live tanh unit never averages 0
    result = METHODS["iap"].run(dead_mlp("zero", "tanh"), digits_data, fraction=0.25, tolerance=100.0,
                                budget=DET)
    assert removed_units(result.model) == DEAD
    assert result.unpruned_accuracy > 0.8 and result.stop.accuracy > 0.8  # the informative units stay


def test_ilp_removes_zero_weight_units_first_even_when_they_fire(digits_data):
    result = METHODS["ilp"].run(dead_mlp("zero_active"), digits_data, fraction=0.25, tolerance=100.0,
                                budget=DET)
    assert removed_units(result.model) == DEAD
    assert result.stop.accuracy > 0.8


def test_iterative_stopping_point_is_the_last_round_within_tolerance(tiny_data):
    result = METHODS["ilp"].run(lambda: mlp(64, 10, hidden=(16, 16)), tiny_data, fraction=0.5, tolerance=1.0,
                                budget={"epochs": 4, "rounds": 4, "round_epochs": 1})
    base = result.unpruned_val_accuracy
    losses = [100 * (base - p.val_accuracy) for p in result.curve]
    i = result.info["stop_round"]
    assert all(loss <= 1.0 + 1e-9 for loss in losses[: i + 1])
    assert i == len(losses) - 1 or losses[i + 1] > 1.0
    kept = [int(k.sum()) for k in get_masks(result.model).values()]
    assert kept == [k for k, _ in result.stop.kept_per_layer.values()]  # the final model is that round's


# ---------------------------------------------------------------- AIAP


def test_aiap_threshold_update_and_rollback_on_a_scripted_accuracy_sequence():
    baseline, tolerance = 0.90, 1.0
    script = iter([0.90, 0.895, 0.85, 0.80, 0.891, 0.70, 0.70, 0.70, 0.99])
    state = {"applied": ()}
    tried, loads = [], []

    def prune(t):
        tried.append(t)
        state["applied"] = state["applied"] + (t,)

    def load(saved):
        loads.append(saved)
        state["applied"] = saved

    schedule = ThresholdSchedule(threshold=0.5, step=0.5)
    log = adaptive_rounds(schedule, attempts=20, baseline=baseline, tolerance=tolerance, prune=prune,
                          retrain=lambda: None, validate=lambda: next(script),
                          save=lambda: state["applied"], load=load)
    # accept 0.5, accept 1.0 (0.5 points lost), reject 1.5 (5 points): lambda 0.25 -> retry 1.25,
    # reject: lambda 0.125 -> 1.125, accept (0.9 points): -> 1.25, then three rejections in a row end it
    assert tried == pytest.approx([0.5, 1.0, 1.5, 1.25, 1.125, 1.25, 1.1875, 1.15625])
    assert [r["accepted"] for r in log] == [True, True, False, False, True, False, False, False]
    # every rollback restores the network of the last accepted round
    assert loads == [(0.5, 1.0), (0.5, 1.0), (0.5, 1.0, 1.125), (0.5, 1.0, 1.125), (0.5, 1.0, 1.125)]
    assert state["applied"] == (0.5, 1.0, 1.125)
    assert schedule.accepted == 1.125 and schedule.failures == 3
    # a budget of attempts ends the loop as well
    script = iter([0.9] * 10)
    log = adaptive_rounds(ThresholdSchedule(0.1, 0.1), attempts=3, baseline=0.9, tolerance=1.0,
                          prune=lambda t: None, retrain=lambda: None, validate=lambda: next(script),
                          save=lambda: None, load=lambda s: None)
    assert [r["threshold"] for r in log] == pytest.approx([0.1, 0.2, 0.3])


def test_aiap_layer_thresholds_follow_remaining_weights():
    net = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), MultiplicativeNoise(6),
                        nn.Linear(6, 4), nn.ReLU(), MultiplicativeNoise(4), nn.Linear(4, 3))
    model = NoisyClassifier(net)
    make_deterministic(model)
    links = links_of(model, torch.randn(2, 10))
    s1, s2 = list(links)
    keep = {s1: torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool), s2: torch.tensor([1, 0, 1, 1], dtype=torch.bool)}
    n = remaining_weights(links, keep)
    assert n == {s1: 4 * 10, s2: 3 * 4}  # layer 2 lost the inputs of layer 1's two pruned units
    t = layer_thresholds(2.0, n)
    assert t == pytest.approx({s1: 2.0 * 40 / 52, s2: 2.0 * 12 / 52})
    imp = {s1: torch.tensor([1.0, 0.2, 9.0, 1.8, 0.0, 1.0]), s2: torch.tensor([0.1, 5.0, 0.1, 0.1])}
    out = threshold_keep(imp, keep, {s1: 0.5, s2: 2.0})
    # s1: alive mean = (1 + 0.2 + 1.8 + 1) / 4 = 1; 0.2 < 0.5 goes. s2: all equal (relative 1 < 2),
    # but the most important one stays
    assert out[s1].tolist() == [True, False, False, True, False, True]
    assert int(out[s2].sum()) == 1


def test_aiap_prunes_silent_units_in_its_first_round(digits_data):
    result = METHODS["aiap"].run(dead_mlp("zero", "tanh"), digits_data, threshold=0.05, step=0.05,
                                 tolerance=100.0, budget=DET)
    assert result.info["attempts"][0]["accepted"]
    assert removed_units(result.model) == DEAD
    assert result.stop is result.curve[-1] and len(result.curve) == 2


# ---------------------------------------------------------------- every method's run


TINY = {"epochs": 4, "finetune_epochs": 0, "rounds": 2, "round_epochs": 1, "batch_size": 64, "lr": 1e-2}
SWEEP = {"fractions": [0.0, 0.3, 0.6, 0.9]}


@pytest.mark.parametrize("name", sorted(["bmrs_n", "bmrs_u8", "bmrs_u4", "snr", "e_theta", "l2", "rni",
                                         "self_compression", "iap", "aiap", "ilp"]))
def test_every_method_returns_a_well_formed_result(name, tiny_data):
    method = METHODS[name]
    options = SWEEP if name in ("bmrs_n", "bmrs_u8", "bmrs_u4", "snr", "e_theta", "l2", "rni") else {}
    result = method.run(lambda: mlp(64, 10, hidden=(16, 16)), tiny_data, budget=TINY, **options)
    assert isinstance(result, MethodResult) and result.method == name
    assert 0.3 < result.unpruned_accuracy <= 1.0  # chance is 0.1
    assert result.wall_time > 0 and result.num_structures == 32 and result.num_parameters > 0
    arrays = result.as_arrays()
    assert arrays["structures_removed"][0] == 0.0 and arrays["parameters_removed"][0] == 0.0
    for key in ("structures_removed", "parameters_removed"):
        assert (np.diff(arrays[key]) >= -1e-9).all(), (key, arrays[key])
    assert ((arrays["accuracy"] >= 0) & (arrays["accuracy"] <= 1)).all()
    if name in ("e_theta", "l2"):
        assert result.stop is None  # ranking-only criteria have no rule of their own
    else:
        stop = result.stop
        lo, hi = arrays["structures_removed"].min(), arrays["structures_removed"].max()
        assert lo - 1e-9 <= stop.structures_removed <= hi + 1e-9
        lo, hi = arrays["parameters_removed"].min(), arrays["parameters_removed"].max()
        assert lo - 1e-9 <= stop.parameters_removed <= hi + 1e-9
        # the final model is the network at the stopping point
        masks = get_masks(result.model)
        removed = sum(int((~k).sum()) for k in masks.values())
        assert 100 * removed / 32 == pytest.approx(stop.structures_removed)
        if result.guide is not None and name != "self_compression":
            final = evaluate(result.model, result.guide, tiny_data.test)["accuracy"]
        else:
            final = accuracy(result.model, tiny_data.test)
        assert final == pytest.approx(stop.accuracy)
    json.dumps(result.to_dict())
    assert name in str(result)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rni", "self_compression", "iap", "aiap"])
def test_lenet_runs_and_the_final_model_compacts(name, tiny_data):
    from bmrs_pyro.compaction import compact

    budget = dict(TINY, rounds=1)
    options = {"fractions": [0.0, 0.5]} if name == "rni" else {}
    if name == "aiap":
        options = {"threshold": 1.0, "tolerance": 100.0}
    result = METHODS[name].run(lambda: lenet5(1, 10, 8), tiny_data, budget=budget, **options)
    x = tiny_data.test[0][:16]
    small = compact(result.model, example_input=x)
    result.model.eval()
    torch.testing.assert_close(small(x), result.model.logits(x), atol=1e-4, rtol=1e-4)
    kept, _ = count_parameters(result.model, inputs=((x[:2],), {}))
    assert small.stats["params_after"] == kept  # the count behind the curve is the compacted network's
    if name != "rni":  # RNI's curve counts one bounded-BN parameter per channel, the final plain BN two
        assert 100 * (1 - kept / result.num_parameters) == pytest.approx(result.stop.parameters_removed)
