"""The network inside a hand-written Pyro model: ``x -> output`` without its observation statements.

A model written as in the README (a ``PyroModule`` whose ``forward(x, y=None)`` computes logits,
opens a data plate and declares ``obs``) is not a network by itself: calling it also samples (or
scores) the observation. :class:`NetworkPart` runs such a model with every sample statement other
than the noise layers' silenced by :class:`ObservationsOff` -- nothing is drawn, no outer Pyro
handler (trace, SVI) sees a site, and the plate's index draw is kept so that the plate still
works -- so what remains is the deterministic map from ``x`` to the value ``forward`` returns.
:func:`bmrs_pyro.compact` wraps a model in it when a trace on ``example_input`` finds such sites.
"""

from __future__ import annotations

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from ..guides import is_noise_site
from ..nn import noise_mode

__all__ = ["NetworkPart", "ObservationsOff", "observation_sites"]


class ObservationsOff(Messenger):
    """Inside it, sample statements other than noise sites and plate indices return a placeholder.

    The placeholder (an empty tensor) is never drawn from the distribution, and the message is
    stopped here, so handlers outside this one record nothing. ``silenced`` lists the site names
    met, in order (a site met twice is listed twice).
    """

    def __init__(self) -> None:
        super().__init__()
        self.silenced: list[str] = []

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or is_noise_site(msg):
            return
        msg["stop"] = True  # no outer handler sees the site
        if site_is_subsample(msg):
            return  # a plate's indices: drawn as usual (a plain arange without subsampling)
        self.silenced.append(msg["name"])
        if msg["value"] is None:
            msg["value"] = torch.empty(0)
        msg["done"] = True


def observation_sites(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Sample sites other than noise sites and plate indices that ``model(example_input)`` declares,
    found in ``"mean"`` mode and eval mode (no BatchNorm statistics change), without drawing them."""
    was_training = model.training
    model.eval()
    silencer = ObservationsOff()
    try:
        with torch.no_grad(), noise_mode(model, "mean"), silencer:
            model(example_input)
    finally:
        model.train(was_training)
    return list(dict.fromkeys(silencer.silenced))


class NetworkPart(nn.Module):
    """``model`` as a network ``x -> model(x)``, its observation statements silenced (:class:`ObservationsOff`).

    ``model`` is registered as the child ``model``, so its parameters, buffers and noise layers
    (and their site names) are the model's own.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"NetworkPart expects a torch.nn.Module, got {type(model).__name__}")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with ObservationsOff():
            return self.model(x)
