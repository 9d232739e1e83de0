"""Self-compression in Bayesian neural networks: rank structures by their posterior-mean weights.

Carannante, Dera, Rasool & Bouaynaya, "Self-Compression in Bayesian Neural Networks" (arXiv
2111.05950, 2021): a Bayesian network drives the weights it does not need towards zero; the
structures whose posterior-mean weights have the smallest norm are removed, iteratively.
"""

from __future__ import annotations

import copy
from typing import Mapping

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal, init_to_value
from pyro.nn import PyroSample
from pyro.nn.module import to_pyro_module_
from torch import nn

from ..guides import deep_getattr
from ..infer import fit
from .common import (
    Budget,
    MethodResult,
    PruningMethod,
    build_deterministic,
    get_masks,
    last_within,
    links_of,
    make_point,
    per_layer_counts,
    remove_lowest,
    set_masks,
    snapshot,
    total_parameters,
)

_WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CRITERIA = ("norm", "snr")


def bayesian_copy(model: nn.Module, prior_scale: float = 1.0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of a deterministic zoo network whose Linear/Conv weights and biases are latent.

    Every ``weight`` and ``bias`` of a Linear/Conv becomes a ``PyroSample`` with prior
    Normal(0, prior_scale) per entry (sites named after the parameters, ``net.1.weight``); the
    noise layers stay bypassed (E[theta] = 1, "mean" mode), so their masks still prune. Returns
    the Bayesian model and the copied initial values by site (to start the guide from them).
    """
    if not prior_scale > 0:
        raise ValueError(f"prior_scale must be > 0, got {prior_scale!r}")
    bnn = copy.deepcopy(model)
    backbone = bnn.net if hasattr(bnn, "net") else bnn
    prefix = "net" if backbone is not bnn else ""
    to_pyro_module_(backbone)
    init = {}
    for name, module in backbone.named_modules():
        if not isinstance(module, _WEIGHT_TYPES):
            continue
        for pname in ("weight", "bias"):
            value = getattr(module, pname, None)
            if value is None:
                continue
            value = value.detach().clone()
            setattr(module, pname, PyroSample(dist.Normal(0.0, float(prior_scale)).expand(value.shape)
                                              .to_event(value.dim())))
            init[".".join(part for part in (prefix, name, pname) if part)] = value
    if not init:
        raise ValueError("the network has no Linear/Conv layer to make Bayesian")
    return bnn, init


def posterior_moments(guide: AutoNormal, sites) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per weight site, the (mean, standard deviation) of the mean-field Normal posterior."""
    return {s: (deep_getattr(guide.locs, s).detach().clone(), deep_getattr(guide.scales, s).detach().clone())
            for s in sites}


def load_posterior_means(model: nn.Module, moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy posterior means into the deterministic ``model``'s parameters of the same names."""
    with torch.no_grad():
        for site, (mean, _) in moments.items():
            model.get_parameter(site).copy_(mean)


def structure_importance(links, moments, criterion: str = "norm") -> dict[str, torch.Tensor]:
    """Importance of each structure from the posterior of its incoming weights (producer row).

    ``"norm"``: the Frobenius (L2) norm of the posterior-mean incoming weights, as the paper
    ranks kernels. ``"snr"``: the weight signal-to-noise ratio aggregated per structure,
    ``sqrt(sum_i mu_i^2) / sqrt(sum_i sigma_i^2)`` over the structure's incoming weights, i.e.
    the norm of the means over the root-mean-square posterior spread (a structure whose weights
    are all indistinguishable from noise scores low). Biases are not included.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    out = {}
    for site, link in links.items():
        name = _param_name(link.producer_name)
        mean, sd = moments[name]
        mean = mean.to(torch.float64).reshape(mean.shape[0], -1)
        if criterion == "norm":
            out[site] = mean.norm(dim=1)
        else:
            sd = sd.to(torch.float64).reshape(sd.shape[0], -1)
            out[site] = mean.norm(dim=1) / sd.norm(dim=1)
    return out


def _param_name(producer_name: str) -> str:
    return f"{producer_name}.weight"


class SelfCompression(PruningMethod):
    """Self-compression in Bayesian neural networks (Carannante, Dera, Rasool & Bouaynaya,
    arXiv 2111.05950, 2021).

    The zoo network's Linear/Conv weights and biases get Normal(0, ``prior_scale``) priors and a
    mean-field Normal posterior (Pyro ``AutoNormal``, started from the network's initial
    weights with sd ``init_scale``), fitted by SVI on the true ELBO
    (:func:`bmrs_pyro.infer.fit`). The noise layers stay bypassed (theta = 1, no noise sites, so
    no ``AutoGuideList`` is needed) and carry the masks. Structures (units, filters) are ranked by
    the norm of their posterior-mean incoming weights (``criterion="norm"``, as in the paper) or
    by their weights' aggregated signal-to-noise ratio (``"snr"``, see
    :func:`structure_importance`). Iterative: each round removes ``fraction`` of the remaining
    structures of every layer (at least one kept) and continues SVI for ``budget.round_epochs``.
    Predictions use the posterior-mean weights.

    Stopping point (not found in the paper; our choice): the last round before the first whose
    validation accuracy falls more than ``tolerance`` (default 1) points below the unpruned
    network's, i.e. where the next removal would cost more than that. The curve runs all
    ``budget.rounds`` rounds; the final model is the one at the stopping point.

    Deviations: SVI with a mean-field Normal posterior instead of the paper's extended
    variational inference (moment propagation through the layers); the prior, the per-round
    fraction and the stopping rule are not given in the paper and are ours; the final model is
    the deterministic network with posterior-mean weights and masks (``result.guide`` holds the
    weight posterior).
    """

    name = "self_compression"
    cite = ("Carannante, Dera, Rasool & Bouaynaya, 'Self-Compression in Bayesian Neural Networks', "
            "arXiv:2111.05950, 2021")
    defaults = {"criterion": "norm", "fraction": 0.2, "prior_scale": 1.0, "init_scale": 1e-3,
                "tolerance": 1.0}

    def _run(self, model_builder, data, seed: int, budget: Budget, options: dict) -> MethodResult:
        criterion = options["criterion"]
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        template = build_deterministic(model_builder)
        x_train = data.train[0]
        links = links_of(template, x_train)
        bnn, init = bayesian_copy(template, float(options["prior_scale"]))
        guide = AutoNormal(bnn, init_loc_fn=init_to_value(values=init), init_scale=float(options["init_scale"]))
        train = dict(batch_size=budget.batch_size, lr=budget.lr_or(1e-2), progress=False)
        history = fit(bnn, guide, data.train, epochs=budget.epochs, seed=seed, **train)

        def point(step: int):
            moments = posterior_moments(guide, init)
            load_posterior_means(template, moments)
            set_masks(template, get_masks(bnn))
            return make_point(template, data, step=step), moments

        first, moments = point(0)
        curve, states = [first], [snapshot(template)]
        for r in range(1, budget.rounds + 1):
            importance = structure_importance(links, moments, criterion)
            alive = get_masks(bnn)
            keep = remove_lowest(importance, alive, per_layer_counts(alive, float(options["fraction"])))
            set_masks(bnn, keep)
            fit(bnn, guide, data.train, epochs=budget.round_epochs, seed=seed + r, **train)
            pt, moments = point(r)
            curve.append(pt)
            states.append(snapshot(template))
        best = last_within(curve, first.val_accuracy, float(options["tolerance"]))
        template.load_state_dict(states[best])
        return MethodResult(
            method=self.name, unpruned_accuracy=first.accuracy, unpruned_val_accuracy=first.val_accuracy,
            curve=curve, stop=curve[best], model=template, guide=guide,
            num_structures=sum(k.numel() for k in get_masks(template).values()),
            num_parameters=total_parameters(template, x_train),
            info={"elbo": list(history.elbo), "stop_round": best, "criterion": criterion},
        )


__all__ = [
    "SelfCompression",
    "bayesian_copy",
    "load_posterior_means",
    "posterior_moments",
    "structure_importance",
]
