"""compact(model, guide) on the README's hand-written ``MyModel`` (a PyroModule with a data plate and
an ``obs`` site): the class is taken verbatim from README.md, trained a few steps, reduced, compacted;
the compacted network must compute the masked noise network's mean-mode output."""
from __future__ import annotations

import re
from pathlib import Path

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

import bmrs_pyro
from bmrs_pyro.compaction.network_part import NetworkPart, ObservationsOff, observation_sites
from bmrs_pyro.nn import MultiplicativeNoise, noise_mode, noise_modules

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_my_model():
    """The ``class MyModel`` code block of README.md, executed as written."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (code,) = [b for b in blocks if "class MyModel" in b]
    scope = {"pyro": pyro, "torch": torch, "nn": nn, "MultiplicativeNoise": MultiplicativeNoise}
    exec(compile(code, str(README), "exec"), scope)
    return scope["MyModel"]


def _trained_and_reduced(train):
    pyro.set_rng_seed(0)
    model = readme_my_model()()
    guide = bmrs_pyro.AutoTruncatedLogNormal(model)
    bmrs_pyro.fit(model, guide, train, epochs=3, batch_size=128, lr=3e-3, guide_lr=0.05, progress=False)
    # A few SVI steps leave every posterior near where it started, so BMRS's rule would keep all
    # 50 units; rank by dF and remove 40% instead (the compaction is what is tested here).
    result = bmrs_pyro.reduce(model, guide, "bmrs_n", fraction=0.4)
    result.apply()
    return model, guide


def test_readme_my_model_compacts_to_its_masked_mean_mode_network(digits):
    train, (x, _) = digits
    model, guide = _trained_and_reduced(train)
    layer = model.noise1
    kept = int(layer.mask.sum())
    assert kept == 30, "the test needs a reduction that removes some but not all units"

    small = bmrs_pyro.compact(model, guide, example_input=x[:8])
    assert isinstance(small.body, NetworkPart)  # the graph engine compacted the network part

    # Reference computed independently of compaction: the model's own layers in mean mode,
    # E[theta] * mask written out by hand.
    m = guide.posterior("noise1.theta").mean.detach() * layer.mask
    with torch.no_grad():
        hidden = torch.tanh(model.fc1(x.flatten(1))) * m
        expected = model.out(hidden)
        got = small(x)
        with noise_mode(model, "mean"):
            logits = model(x)  # the model itself returns the logits in mean mode
    assert torch.allclose(logits, expected, atol=1e-5)
    assert got.shape == (x.shape[0], 10)
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    assert small.stats["layers"]["noise1.theta"]["kept"] == kept
    assert small.stats["params_after"] < small.stats["params_before"]
    assert small.stats["max_abs_diff"] < 1e-5
    # No noise layer and no sample site is left in the compacted network.
    assert not noise_modules(small)
    trace = poutine.trace(small).get_trace(x[:4])
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample"] == []


def test_observation_sites_finds_the_data_plate_and_obs_without_drawing(digits):
    model = readme_my_model()()
    guide = bmrs_pyro.AutoTruncatedLogNormal(model)
    guide(digits[0][0][:2])
    before = torch.random.get_rng_state()
    assert observation_sites(model, digits[0][0][:5]) == ["obs"]
    assert torch.equal(torch.random.get_rng_state(), before)  # nothing was sampled
    assert model.training  # eval only while probing


def test_observations_off_keeps_an_observed_value_and_hides_the_site():
    def toy(y):
        with pyro.plate("data", 3):
            return pyro.sample("obs", pyro.distributions.Normal(0.0, 1.0), obs=y)

    y = torch.tensor([1.0, 2.0, 3.0])
    silencer = ObservationsOff()
    with poutine.trace() as tracer, silencer:
        value = toy(y)
    assert torch.equal(value, y) and silencer.silenced == ["obs"]
    assert [n for n, s in tracer.trace.nodes.items() if s["type"] == "sample"] == []
    with pytest.raises(ValueError, match="torch.nn.Module"):
        NetworkPart(object())


def test_compact_without_example_input_still_asks_for_one(digits):
    model = readme_my_model()()
    guide = bmrs_pyro.AutoTruncatedLogNormal(model)
    guide(digits[0][0][:2])
    with pytest.raises(ValueError, match="example_input"):
        bmrs_pyro.compact(model, guide)
