"""Iterative prune-and-retrain: IAP (activation importance) and ILP (L1 weight norm).

Zhao, Jain & Zhao, "Iterative Activation-based Structured Pruning" (arXiv 2201.09881, 2022): in
each round the least important structures of every layer are removed and the network is
retrained. IAP measures importance by the mean activation magnitude, ILP by the L1 norm of the
structure's incoming weights (Li, Kadav, Durdanovic, Samet & Graf, "Pruning Filters for
Efficient ConvNets", ICLR 2017).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .common import (
    Budget,
    MethodResult,
    PruningMethod,
    build_deterministic,
    get_masks,
    incoming_weight_norm,
    last_within,
    links_of,
    make_point,
    mean_activation,
    per_layer_counts,
    remove_lowest,
    restore,
    set_masks,
    snapshot,
    total_parameters,
    train_network,
)

_ZHAO = ("Zhao, Jain & Zhao, 'Iterative Activation-based Structured Pruning', arXiv:2201.09881, 2022")
_LI = ("Li, Kadav, Durdanovic, Samet & Graf, 'Pruning Filters for Efficient ConvNets', ICLR 2017")


class IterativePruning(PruningMethod):
    """The shared loop of IAP and ILP; subclasses define :meth:`importance`.

    Train the deterministic network (noise bypassed) for ``budget.epochs``; then for
    ``budget.rounds`` rounds: score the structures, remove ``floor(fraction * alive)`` of the
    least important alive structures of every layer (at least one kept per layer), retrain for
    ``budget.round_epochs`` with a fresh Adam optimizer (the schedule restarts, the weights are
    not reset) and record test and validation accuracy. Stopping point: the last round whose
    validation accuracy is within ``tolerance`` points of the unpruned network's (the first
    round beyond it ends the method; the curve still runs every round). The final model is the
    network at the stopping point.
    """

    defaults = {"fraction": 0.2, "tolerance": 1.0}

    def importance(self, model: nn.Module, links: Mapping, data) -> dict[str, torch.Tensor]:
        """Per noise site, one importance per structure (higher = keep)."""
        raise NotImplementedError

    def _run(self, model_builder, data, seed: int, budget: Budget, options: dict) -> MethodResult:
        model = build_deterministic(model_builder)
        x_train = data.train[0]
        links = links_of(model, x_train)
        lr = budget.lr_or(3e-3)
        train = dict(lr=lr, batch_size=budget.batch_size)
        losses = train_network(model, data.train, epochs=budget.epochs, seed=seed, **train)
        curve = [make_point(model, data, step=0)]
        states = [snapshot(model)]
        fraction = float(options["fraction"])
        for r in range(1, budget.rounds + 1):
            alive = get_masks(model)
            scores = self.importance(model, links, data)
            set_masks(model, remove_lowest(scores, alive, per_layer_counts(alive, fraction)))
            train_network(model, data.train, epochs=budget.round_epochs, seed=seed + r, **train)
            curve.append(make_point(model, data, step=r))
            states.append(snapshot(model))
        best = last_within(curve, curve[0].val_accuracy, float(options["tolerance"]))
        restore(model, states[best])
        return MethodResult(
            method=self.name, unpruned_accuracy=curve[0].accuracy, unpruned_val_accuracy=curve[0].val_accuracy,
            curve=curve, stop=curve[best], model=model,
            num_structures=sum(k.numel() for k in get_masks(model).values()),
            num_parameters=total_parameters(model, x_train),
            info={"stop_round": best, "train_loss": losses},
        )


class IAP(IterativePruning):
    """IAP, Iterative Activation-based Pruning (Zhao, Jain & Zhao, arXiv 2201.09881, 2022).

    Importance of a unit / filter: its mean post-activation magnitude over the held-out
    validation split (mean over examples and spatial positions; the attention map with p = 1),
    measured after the activation (the noise layer's output) in eval mode. Each round prunes
    ``fraction`` (default 0.2) of the remaining structures of every layer and retrains; see
    :class:`IterativePruning` for the loop and the stopping point.

    Deviations: the per-round fraction is not given in the paper (0.2 is ours); retraining uses
    Adam (lr ``budget.lr`` or 3e-3) restarted every round instead of the paper's SGD schedule;
    structures are masked, not cut out (parameters removed are counted as compacted).
    """

    name = "iap"
    cite = _ZHAO + " (IAP)"

    def importance(self, model, links, data):
        """Mean |activation| of each structure over the validation inputs."""
        return mean_activation(model, data.val[0])


class ILP(IterativePruning):
    """ILP, Iterative L1-norm Pruning (Li et al., ICLR 2017), as the baseline of Zhao, Jain & Zhao
    (arXiv 2201.09881, 2022).

    Importance of a unit / filter: the L1 norm of its incoming weights (the producer's output
    row or filter over input channels and kernel, bias excluded). Same iterative loop, fraction
    and stopping point as :class:`IAP`.

    Deviations: Li et al. prune once (or layer by layer) with retraining; the iterative
    schedule follows Zhao et al.'s use of it, whose per-round fraction is not known (0.2 is
    ours); Adam restarted every round; structures are masked, not cut out.
    """

    name = "ilp"
    cite = _LI + "; iterative, as in " + _ZHAO

    def importance(self, model, links, data):
        """L1 norm of each structure's incoming weights."""
        return incoming_weight_norm(links, p=1.0)


__all__ = ["IAP", "ILP", "IterativePruning"]
