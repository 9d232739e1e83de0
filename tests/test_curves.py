"""Post-training pruning curves and the parameter count (issue 3, point 3)."""

import json

import numpy as np
import pyro
import pytest
import torch
from scipy import stats
from torch import nn

from bmrs_pyro.compaction import compact
from bmrs_pyro.curves import PruneCurve, count_parameters, sweep_fractions, prune_curve
from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import evaluate, fit
from bmrs_pyro.models import lenet5, mlp
from bmrs_pyro.nn import MultiplicativeNoise, NoisyClassifier, noise_modules
from bmrs_pyro.pruner import reduce


def run_guide_once(model, x):
    guide = AutoTruncatedLogNormal(model)
    guide(x, torch.zeros(x.shape[0], dtype=torch.long))
    return guide


def set_masks(model, pruned: dict):
    for site, layer in noise_modules(model).items():
        layer.mask.fill_(1.0)
        layer.mask[pruned.get(site, [])] = 0.0


# ---------------------------------------------------------------- parameter count


def test_count_parameters_mlp_by_hand():
    net = nn.Sequential(nn.Linear(64, 20), nn.Tanh(), MultiplicativeNoise(20),
                        nn.Linear(20, 20), nn.Tanh(), MultiplicativeNoise(20), nn.Linear(20, 10))
    model = NoisyClassifier(net)
    run_guide_once(model, torch.randn(3, 64))
    s0, s1 = list(noise_modules(model))
    set_masks(model, {s0: list(range(5)), s1: list(range(3, 10))})
    k0, k1 = 15, 13
    expected = (k0 * 64 + k0) + (k1 * k0 + k1) + (10 * k1 + 10)
    total = (20 * 64 + 20) + (20 * 20 + 20) + (10 * 20 + 10)
    assert count_parameters(model) == (expected, total)
    # explicit masks override the layers' own; None means "unpruned"
    assert count_parameters(model, {s0: torch.ones(20), s1: torch.ones(20)}) == (total, total)


def test_count_parameters_conv_batchnorm_flatten_by_hand():
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), MultiplicativeNoise(6, channel_dim=1),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), MultiplicativeNoise(8, channel_dim=1), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 12), nn.ReLU(), MultiplicativeNoise(12), nn.Linear(12, 10),
    )
    model = NoisyClassifier(net)
    run_guide_once(model, torch.randn(2, 1, 8, 8))
    s0, s1, s2 = list(noise_modules(model))
    set_masks(model, {s0: [0, 3], s1: [1, 2, 5], s2: [0]})
    c0, c1, f = 4, 5, 11
    expected = (
        c0 * 1 * 9 + c0 + 2 * c0  # conv1 filters, bias, BatchNorm weight and bias
        + c1 * c0 * 9 + c1  # conv2
        + f * (c1 * 4) + f  # fc1: each conv2 channel owns 2*2 input columns
        + 10 * f + 10
    )
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (expected, total)


@pytest.mark.parametrize("build, x", [
    (lambda: mlp(64, 10, hidden=(30, 20), activation="relu"), torch.rand(4, 64)),
    (lambda: lenet5(1, 10, input_size=8), torch.rand(4, 1, 8, 8)),
])
def test_count_parameters_equals_the_compacted_model(build, x):
    torch.manual_seed(0)
    model = build()
    guide = run_guide_once(model, x)
    gen = torch.Generator().manual_seed(1)
    for layer in noise_modules(model).values():
        mask = (torch.rand(layer.num_structures, generator=gen) < 0.6).float()
        mask[0] = 1.0  # no layer pruned away (compaction keeps a placeholder for those)
        layer.mask.copy_(mask)
    kept, total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert kept < total
    small = compact(model, guide)
    assert sum(p.numel() for p in small.parameters()) == kept


# ---------------------------------------------------------------- curves


@pytest.fixture(scope="module")
def trained(digits):
    torch.set_num_threads(1)  # the test machines are shared; threads only contend
    pyro.clear_param_store()  # module-scoped: set up before conftest's per-test clearing
    (xtr, ytr), (xte, yte) = digits
    model = mlp(64, 10, hidden=(32, 32), activation="tanh")
    guide = AutoTruncatedLogNormal(model)
    fit(model, guide, (xtr, ytr), epochs=4, batch_size=128, lr=2e-2, seed=0, progress=False)
    return model, guide, (xtr, ytr), (xte, yte)


def test_prune_curve_sweeps_and_restores_masks(trained):
    model, guide, _, test = trained
    layers = noise_modules(model)
    first = list(layers)[0]
    layers[first].mask[5] = 0.0  # an earlier decision; the sweep starts from it and restores it
    before = {s: layer.mask.clone() for s, layer in layers.items()}
    try:
        unpruned = evaluate(model, guide, test)
        curve = prune_curve(model, guide, test, "e_theta")
        for s, layer in layers.items():
            assert torch.equal(layer.mask, before[s])
    finally:
        layers[first].mask.fill_(1.0)
    assert isinstance(curve, PruneCurve) and curve.stop_point is None
    assert [p.step for p in curve.points] == sweep_fractions(64)
    assert curve.points[0].accuracy == unpruned["accuracy"] == curve.baseline["accuracy"]
    arrays = curve.as_arrays()
    # structures removed: floor(f * 64), at least the one already masked, one unit left per layer
    expected = [max(np.floor(f * 64 + 1e-9), 1) for f in arrays["fraction"]]
    expected[-1] = 62
    assert np.allclose(arrays["structures_removed"], 100 * np.array(expected) / 64)
    assert np.all(np.diff(arrays["parameters_removed"]) >= 0)
    assert arrays["accuracy"][0] > 0.85 and arrays["accuracy"][-1] < 0.5
    assert stats.spearmanr(arrays["fraction"], arrays["accuracy"]).statistic < -0.8
    for p in curve.points:
        assert count_parameters(model, {s: torch.ones(32) for s in layers})[1] == curve.num_parameters
        assert 0 <= p.parameters_removed <= 100
    json.dumps(curve.to_dict())
    text = str(curve)
    assert "e_theta" in text and len(text.splitlines()) == 3 + len(curve.points)


def test_prune_curve_bmrs_stop_point(trained):
    model, guide, _, test = trained
    site = list(noise_modules(model))[1]
    store = list(guide.parameters())
    saved = [p.detach().clone() for p in store]
    try:
        params = dict(guide.named_parameters())
        raw_loc, raw_ls = params[f"locs.{site}_unconstrained"], params[f"log_scales.{site}_unconstrained"]
        with torch.no_grad():  # 10 units of the second layer sit at theta ~ e^-20
            raw_loc[:10] = -20.0
            raw_ls[:10] = 0.0
        own = reduce(model, guide, "bmrs_n")
        curve = prune_curve(model, guide, test, "bmrs_n", fractions=[0.0, 0.1, 0.2])
    finally:
        with torch.no_grad():
            for p, v in zip(store, saved):
                p.copy_(v)
    stop = curve.stop_point
    assert stop is not None and stop.step is None
    assert stop.structures_removed == pytest.approx(100 * own.fraction_removed)
    assert own.kept_per_layer[site][0] <= 22  # the ten at low are pruned
    assert stop.kept_per_layer == own.kept_per_layer
    kept, total = count_parameters(model, own.keep)
    assert stop.parameters_removed == pytest.approx(100 * (1 - kept / total))
    # ranked by -dF, the first 10 % removed are exactly units at low: accuracy barely moves
    assert abs(curve.points[1].accuracy - curve.points[0].accuracy) < 0.02
    assert "stop" in str(curve)


def test_prune_curve_finetuning_restores_all_weights(trained):
    model, guide, train, test = trained
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gstate = {k: v.clone() for k, v in guide.state_dict().items()}
    curve = prune_curve(model, guide, test, "l2", fractions=[0.6], finetune_epochs=1, train_data=train,
                        finetune_options={"lr": 3e-3, "batch_size": 128})
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, v in guide.state_dict().items():
        assert torch.equal(v, gstate[k]), k
    point = curve.points[0]
    assert point.accuracy_before_finetune is not None
    assert point.accuracy >= point.accuracy_before_finetune
    assert point.kept_per_layer == {s: (13, 32) for s in noise_modules(model)}  # per-layer scope


def test_prune_curve_activation_uses_training_data(trained):
    model, guide, train, test = trained
    curve = prune_curve(model, guide, test, "activation", fractions=[0.0, 0.5], train_data=train)
    assert curve.points[1].structures_removed == 50.0
    assert curve.points[0].accuracy > curve.points[1].accuracy - 0.5


@pytest.mark.parametrize("kwargs, match", [
    ({"criterion": "nope"}, "unknown pruning method"),
    ({"criterion": "e_theta", "fractions": [0.5, 1.2]}, "fractions must be"),
    ({"criterion": "e_theta", "finetune_epochs": 1}, "train_data"),
    ({"criterion": "e_theta", "mode": "median"}, "mode must be"),
    ({"criterion": "e_theta", "fraction": 0.3}, "fractions="),
])
def test_prune_curve_errors(trained, kwargs, match):
    model, guide, _, test = trained
    with pytest.raises(ValueError, match=match):
        prune_curve(model, guide, test, **kwargs)


def test_sweep_fractions_is_the_one_grid_of_curves_and_baselines():
    assert sweep_fractions(10, 0.25) == [0.0, 0.25, 0.5, 0.75, 0.9]  # 0.9 = all but one of 10
    assert sweep_fractions(4, 0.25) == [0.0, 0.25, 0.5, 0.75]  # 1 - 1/4 is already on the grid
    assert sweep_fractions(100) == [round(0.05 * i, 10) for i in range(20)] + [0.99]
    with pytest.raises(ValueError, match="step"):
        sweep_fractions(10, 0.0)
