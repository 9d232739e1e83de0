"""End to end (issue 3, point 5): continuous BMRS_N pruning of the 64-100-100-10 tanh MLP on digits.

What this measures (numbers for more settings: ``benchmarks/pruning_digits.py``). With the
variational parameters at lr 0.05 and the authors' per-structure KL weight (N / (layers * units)
= 7.2 here) most hidden units stop carrying signal: their posterior goes back to the prior (SNR < 1)
and the network ignores them, so masking all of them keeps the accuracy. For such a unit the data
say nothing either way, so the exact BMR evidence for removing it is dF ~ 0, and from below: the
posteriors stay tilted towards theta = 1 (loc near 0). BMRS_N therefore keeps them. The BMRS
reference code's dF is 0.5 log(2 pi) = 0.919 nats higher (DESIGN.md, section 3) and would prune
every one of them. The task's target (>= 30 % of hidden units removed by BMRS_N) is **not** met by
the exact rule in this setting; the test asserts what is true instead.
"""

import math

import pytest
import torch

from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import evaluate, fit
from bmrs_pyro.models import mlp
from bmrs_pyro.pruner import reduce

EPOCHS = 60
PRUNE_EVERY = 5
KL_WEIGHT = 7.2  # ~ the authors' loss: N / (layers * units) = 1437 / 200
LR, GUIDE_LR = 3e-3, 0.05
REFERENCE_OFFSET = 0.5 * math.log(2 * math.pi)


def train(train_data, prune_every, prune_options=None):
    torch.manual_seed(0)
    model = mlp(64, 10, hidden=(100, 100), activation="tanh")
    guide = AutoTruncatedLogNormal(model)
    x, y = train_data
    guide(x[:2], y[:2])  # create the variational parameters for their own learning rate
    optimizer = torch.optim.Adam([
        {"params": list(model.parameters()), "lr": LR},
        {"params": list(guide.parameters()), "lr": GUIDE_LR},
    ])
    history = fit(model, guide, train_data, epochs=EPOCHS, batch_size=128, lr=LR, kl_weight=KL_WEIGHT,
                  seed=0, optimizer=optimizer, prune_every=prune_every, prune_method="bmrs_n",
                  prune_options=prune_options, progress=False)
    return model, guide, history


@pytest.mark.slow
def test_continuous_bmrs_n_on_digits(digits):
    torch.set_num_threads(1)
    train_data, test_data = digits
    model0, guide0, _ = train(train_data, prune_every=None)
    unpruned = evaluate(model0, guide0, test_data)["accuracy"]
    assert unpruned >= 0.95

    model, guide, history = train(train_data, prune_every=PRUNE_EVERY)
    accuracy = evaluate(model, guide, test_data)["accuracy"]
    events = [e for e in history.events if e["event"] == "prune"]
    assert [e["epoch"] for e in events] == list(range(PRUNE_EVERY - 1, EPOCHS, PRUNE_EVERY))
    assert accuracy >= unpruned - 0.01

    final = reduce(model, guide, "bmrs_n", respect_mask=False)
    df = torch.cat(list(final.scores.values()))
    kept = sum(int(layer.mask.sum()) for layer in final.layers.values())
    assert kept == 200 - int((df >= 0).sum())  # the masks are BMRS_N's decisions

    # Units whose posterior went back to the prior: redundant (masking them keeps the accuracy) ...
    snr = reduce(model, guide, "snr", respect_mask=False)
    redundant = torch.cat([~k for k in snr.keep.values()])
    assert redundant.float().mean() >= 0.3
    saved = {s: layer.mask.clone() for s, layer in snr.layers.items()}
    snr.apply()
    assert evaluate(model, guide, test_data)["accuracy"] >= unpruned - 0.01
    for s, layer in snr.layers.items():
        layer.mask.copy_(saved[s])
    # ... yet with dF just below 0, so exact BMRS_N keeps them (the reference code's +0.919 would not)
    near_zero = (df < 0) & (df + REFERENCE_OFFSET >= 0)
    assert (redundant & near_zero).float().mean() >= 0.3


@pytest.mark.slow
def test_reference_code_variant_prunes_the_redundant_units(digits):
    """With the authors' dF (+0.919 nats) continuous BMRS_N meets the issue's target: >= 30 % of
    hidden units removed within 1 point. The exact rule does not (test above)."""
    torch.set_num_threads(1)
    train_data, test_data = digits
    model0, guide0, _ = train(train_data, prune_every=None)
    unpruned = evaluate(model0, guide0, test_data)["accuracy"]
    model, guide, _ = train(train_data, prune_every=PRUNE_EVERY, prune_options={"reference_code": True})
    kept = sum(int(layer.mask.sum()) for layer in guide.layers.values())
    assert 1 - kept / 200 >= 0.3
    assert evaluate(model, guide, test_data)["accuracy"] >= unpruned - 0.01
    exact = reduce(model, guide, "bmrs_n", respect_mask=False)
    reference = reduce(model, guide, "bmrs_n", respect_mask=False, reference_code=True)
    for site in exact.scores:
        torch.testing.assert_close(reference.scores[site] - exact.scores[site],
                                   torch.full_like(exact.scores[site], REFERENCE_OFFSET))
