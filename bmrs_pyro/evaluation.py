"""The one evaluator: accuracy and negative log likelihood of a classifier, batch by batch.

:func:`evaluate` serves the Pyro models (deterministic E[theta] * mask, or the posterior
predictive); :func:`classify` is the loop under it and under the deterministic baselines'
``accuracy``: any function from a batch to class log probabilities.
"""

from __future__ import annotations

import math
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch

from .batching import Data, as_tensors, check_positive, iterate_batches
from .checks import check_data
from .nn import noise_mode


@torch.no_grad()
def classify(log_probs: Callable[[torch.Tensor], torch.Tensor], data: Data, *, batch_size: int = 1024,
             device="cpu") -> dict:
    """``{"accuracy", "nll"}`` (nll in nats per example) of ``log_probs(x)`` (class log
    probabilities or logits: they are log-softmaxed) on ``data``, in batches of ``batch_size``."""
    correct, nll, count = 0, 0.0, 0
    for x, y in iterate_batches(data, batch_size, shuffle=False, device=device):
        log_p = torch.log_softmax(log_probs(x), -1)
        nll -= log_p.gather(-1, y.long().unsqueeze(-1)).sum().item()
        correct += (log_p.argmax(-1) == y).sum().item()
        count += y.shape[0]
    return {"accuracy": correct / count, "nll": nll / count}


@torch.no_grad()
def evaluate(
    model: Callable,
    guide: Callable,
    data: Data,
    mode: str = "mean",
    *,
    num_samples: int = 32,
    batch_size: int = 1024,
    obs_site: str = "obs",
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Accuracy and negative log likelihood of a classifier on ``data``.

    ``mode="mean"``: deterministic, theta = E_q[theta] * mask (the BMRS test-time rule).
    ``mode="sample"``: the posterior predictive, p(y|x) averaged over ``num_samples`` draws of
    theta from the guide. Returns ``{"accuracy", "nll"}`` (nll in nats per example). Bad data
    raise :class:`~bmrs_pyro.checks.InputError` before the first batch (see :func:`fit`).
    """
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
    check_positive("num_samples", num_samples, int)
    data = as_tensors(data, "data")
    check_data(data, model, name="data", obs_site=obs_site, device=device)
    pyro.set_rng_seed(seed)
    # Evaluate with running BatchNorm statistics (and no dropout); restore the caller's mode.
    was_training = model.training if isinstance(model, torch.nn.Module) else False
    if was_training:
        model.eval()
    try:
        return _evaluate(model, guide, data, mode, num_samples, batch_size, obs_site, device)
    finally:
        if was_training:
            model.train()


def _evaluate(model, guide, data, mode, num_samples, batch_size, obs_site, device) -> dict:
    if mode == "mean" and not isinstance(model, torch.nn.Module):
        raise ValueError("mode='mean' needs the model to be a torch.nn.Module with noise layers")

    def log_probs(x: torch.Tensor) -> torch.Tensor:
        if mode == "mean":
            with noise_mode(model, "mean"):
                return class_log_probs(_observation(model, x, obs_site))
        draws = []
        for _ in range(num_samples):
            guide_trace = poutine.trace(guide).get_trace(x)
            draws.append(class_log_probs(_observation(poutine.replay(model, trace=guide_trace), x, obs_site)))
        return torch.logsumexp(torch.stack(draws), 0) - math.log(num_samples)

    return classify(log_probs, data, batch_size=batch_size, device=device)


def _observation(model, x, obs_site: str):
    trace = poutine.trace(model).get_trace(x)
    if obs_site not in trace.nodes:
        raise ValueError(f"the model has no site {obs_site!r}; pass obs_site=<name of the observation>")
    return trace.nodes[obs_site]["fn"]


def class_log_probs(fn) -> torch.Tensor:
    """Class log probabilities of a categorical observation distribution (through wrappers)."""
    base = fn
    while hasattr(base, "base_dist"):
        base = base.base_dist
    if not hasattr(base, "logits"):
        raise ValueError(f"evaluate needs a categorical observation, got {type(base).__name__}")
    return torch.log_softmax(base.logits, -1)
