"""End to end (issue 10): BMRS decides with the evidence margin and prunes, safely.

Measured on the 64-100-100-10 tanh MLP on digits (``bmrs run`` defaults). A structure the data do
not need ends with a posterior close to the prior, for which the exact dF of removing it is a
near-tie in (-1, 0): the strict rule dF >= 0 keeps it, the default margin of 1 nat removes it.
Continuous pruning waits a warm-up, keeps one structure per layer and holds every reduction to
its margin jointly on the training data, so that a network whose posteriors never left the prior
(every structure a near-tie, yet all of them together carrying the fit) is not emptied.
"""

import json
import math

import pyro
import pytest
import torch

from bmrs_pyro.cli import main
from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import evaluate, fit
from bmrs_pyro.models import mlp
from bmrs_pyro.nn import noise_modules
from bmrs_pyro.pruner import reduce

EPOCHS = 100
PRUNE_EVERY = 5


def train(train_data, prune_every, prune_options=None, init=(0.0, math.exp(-5.0)), seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = mlp(64, 10, hidden=(100, 100), activation="tanh")
    guide = AutoTruncatedLogNormal(model, init_loc=init[0], init_scale=init[1])
    history = fit(model, guide, train_data, epochs=EPOCHS, batch_size=128, lr=1e-2, guide_lr=0.05, seed=seed,
                  prune_every=prune_every, prune_options=prune_options, progress=False)
    return model, guide, history


def kept(model) -> int:
    return sum(int(layer.mask.sum()) for layer in noise_modules(model).values())


@pytest.mark.slow
def test_started_at_the_prior_default_continuous_bmrs_n_keeps_the_accuracy(digits):
    """Posteriors initialised at the prior (loc at the interval's centre, scale e^5). Every
    structure is a near-tie all the way: without the safeguards the default margin (and the
    published rule) would empty the network at the first reduction."""
    torch.set_num_threads(1)
    train_data, test_data = digits
    at_prior = (-10.0, math.exp(5.0))
    model0, guide0, _ = train(train_data, None, init=at_prior)
    unpruned = evaluate(model0, guide0, test_data)["accuracy"]
    df = torch.cat(list(reduce(model0, guide0, "bmrs_n", margin=0).scores.values()))
    assert ((df >= -1) & (df < 0)).float().mean() > 0.9  # the case: nearly everything in the tie band

    model, guide, history = train(train_data, PRUNE_EVERY, init=at_prior)
    assert evaluate(model, guide, test_data)["accuracy"] >= unpruned - 0.01
    events = [e for e in history.events if e["event"] == "prune"]
    assert events[0]["epoch"] + 1 == math.ceil(0.25 * EPOCHS)  # the warm-up
    assert all(e["kept"][s] >= 1 for e in events for s in e["kept"])  # never an empty layer
    assert all(e["joint_check"]["removed"] <= e["joint_check"]["proposed"] for e in events)

    # what the safeguards prevent: the same rule without the joint check empties the network
    bare, bare_guide, _ = train(train_data, PRUNE_EVERY, {"joint_check": False}, init=at_prior)
    assert kept(bare) == 2  # min_keep: one structure per layer
    assert evaluate(bare, bare_guide, test_data)["accuracy"] < unpruned - 0.3


@pytest.mark.slow
def test_margin_zero_and_reference_code_reproduce_the_earlier_decisions_in_training(digits):
    """Without the joint check, continuous pruning with margin 0 is the strict rule dF >= 0 and
    ``reference_code=True`` the published rule (the authors' dF, exact + 0.5 log 2pi, >= 0).

    Pruned structures are frozen, so their final dF is the one they were removed with, and the
    last reduction follows the last epoch: the final masks must equal the rule applied to the
    final posteriors, checked here with dF from the reduction functions (through ``reduce`` with
    ``respect_mask=False``) and the offset added by hand.
    """
    torch.set_num_threads(1)
    train_data, _ = digits
    offset = 0.5 * math.log(2 * math.pi)
    for options, shift in (({"margin": 0.0}, 0.0), ({"reference_code": True}, offset)):
        model, guide, history = train(train_data, PRUNE_EVERY, dict(options, joint_check=False))
        assert history.events[-1]["epoch"] == EPOCHS - 1  # a reduction after the last epoch
        exact = reduce(model, guide, "bmrs_n", margin=0.0, respect_mask=False)
        for site, layer in noise_modules(model).items():
            decided = exact.scores[site] + shift
            assert torch.equal(layer.mask.bool(), decided < 0), options


@pytest.mark.slow
def test_bmrs_run_default_prunes_half_the_units_within_a_point_of_method_none(tmp_path, capsys):
    """``bmrs run`` with no arguments against ``bmrs run --method none`` (same training, nothing removed)."""
    assert main(["run", "--output", str(tmp_path), "--name", "bmrs", "--quiet", "--no-report"]) == 0
    assert main(["run", "--output", str(tmp_path), "--name", "none", "--method", "none", "--quiet",
                 "--no-report"]) == 0
    capsys.readouterr()
    pruned = json.loads((tmp_path / "bmrs" / "metrics.json").read_text())
    baseline = json.loads((tmp_path / "none" / "metrics.json").read_text())
    assert baseline["structures"]["removed_pct"] == 0.0 and baseline["accuracy_before"] == pytest.approx(
        pruned["accuracy_before"], abs=0.02)
    assert pruned["structures"]["removed_pct"] >= 50.0
    assert pruned["accuracy_after"] >= baseline["accuracy_after"] - 0.01
    band = pruned["decision"]["tie_band"]
    assert pruned["decision"]["margin"] == 1.0 and band["band"] == [-1.0, 0.0] and band["count"] > 0
