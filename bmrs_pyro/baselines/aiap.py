"""AIAP, Adaptive Iterative Activation-based Pruning: a threshold that grows while accuracy holds.

Zhao, Jain & Zhao, "Iterative Activation-based Structured Pruning" (arXiv 2201.09881, 2022),
adaptive variant: layer l prunes the structures whose importance is below
T_l = T * n_l / sum_k n_k (n_l: remaining weights of layer l); after each round T grows by
lambda if the accuracy loss is within target, else the last good network is reloaded and lambda
halved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..structures import StructureLinks
from .common import (
    Budget,
    MethodResult,
    PruningMethod,
    accuracy,
    build_deterministic,
    get_masks,
    links_of,
    make_point,
    mean_activation,
    restore,
    set_masks,
    snapshot,
    total_parameters,
    train_network,
)
from .iterative import _ZHAO


@dataclass
class ThresholdSchedule:
    """AIAP's global threshold T and its step lambda.

    ``threshold`` is the next T to try and ``accepted`` the last T whose round was accepted
    (``threshold - step`` at the start: the unpruned network). :meth:`accept` moves on,
    T <- T + lambda; :meth:`reject` halves lambda and retries from the last accepted T,
    T <- accepted + lambda / 2, and says whether ``max_failures`` rejections in a row were reached.
    """

    threshold: float
    step: float
    max_failures: int = 3
    failures: int = 0

    def __post_init__(self) -> None:
        if not self.step > 0:
            raise ValueError(f"step (lambda) must be > 0, got {self.step!r}")
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold!r}")
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) or self.max_failures < 1:
            raise ValueError(f"max_failures must be an int >= 1, got {self.max_failures!r}")
        self.accepted = self.threshold - self.step

    def accept(self) -> None:
        """The round at ``threshold`` kept accuracy: T <- T + lambda, failures reset."""
        self.accepted = self.threshold
        self.threshold = self.threshold + self.step
        self.failures = 0

    def reject(self) -> bool:
        """The round failed: lambda <- lambda / 2, T <- accepted + lambda; True when giving up."""
        self.failures += 1
        self.step /= 2.0
        self.threshold = self.accepted + self.step
        return self.failures >= self.max_failures


def adaptive_rounds(
    schedule: ThresholdSchedule,
    *,
    attempts: int,
    baseline: float,
    tolerance: float,
    prune: Callable[[float], None],
    retrain: Callable[[], None],
    validate: Callable[[], float],
    save: Callable[[], Any],
    load: Callable[[Any], None],
    on_accept: Callable[[int], None] = lambda attempt: None,
) -> list[dict]:
    """AIAP's control loop, with the network operations passed in (so it can be tested alone).

    Each attempt prunes at ``schedule.threshold``, retrains and validates. If the validation
    accuracy is within ``tolerance`` points (percent) of ``baseline`` the state is saved and the
    schedule accepts; otherwise the last saved state is loaded back and the schedule rejects,
    and the loop ends after ``schedule.max_failures`` rejections in a row. At most ``attempts``
    attempts. Returns one record per attempt: threshold, validation accuracy, accepted.
    """
    log = []
    good = save()
    for attempt in range(attempts):
        threshold = schedule.threshold
        prune(threshold)
        retrain()
        acc = float(validate())
        ok = 100.0 * (baseline - acc) <= tolerance + 1e-9
        log.append({"attempt": attempt, "threshold": threshold, "val_accuracy": acc, "accepted": ok})
        if ok:
            good = save()
            schedule.accept()
            on_accept(attempt)
        else:
            load(good)
            if schedule.reject():
                break
    return log


def remaining_weights(links: Mapping[str, StructureLinks], keep: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Per site, the weights its producer still has: kept rows times kept input columns (x kernel).

    Input columns are removed where the producer consumes another site's pruned structures.
    """
    removed_cols: dict[int, int] = {}
    for site, link in links.items():
        if link.consumer is not None:
            pruned = int((~keep[site].bool()).sum()) * link.columns_per_structure
            removed_cols[id(link.consumer)] = removed_cols.get(id(link.consumer), 0) + pruned
    out = {}
    for site, link in links.items():
        w = link.producer.weight
        per_entry = w[0, 0].numel()
        cols = w.shape[1] - removed_cols.get(id(link.producer), 0)
        out[site] = int(keep[site].sum()) * cols * per_entry
    return out


def layer_thresholds(threshold: float, remaining: Mapping[str, int]) -> dict[str, float]:
    """T_l = T * n_l / sum_k n_k."""
    total = sum(remaining.values())
    if total <= 0:
        raise ValueError("no weights remain in any prunable layer")
    return {site: threshold * n / total for site, n in remaining.items()}


def threshold_keep(importance: Mapping[str, torch.Tensor], alive: Mapping[str, torch.Tensor],
                   thresholds: Mapping[str, float], min_keep: int = 1) -> dict[str, torch.Tensor]:
    """Per site, remove the alive structures whose importance, divided by the mean importance of
    the layer's alive structures, is below the layer's threshold; the ``min_keep`` most
    important alive structures always stay.
    """
    keep = {}
    for site, imp in importance.items():
        a = alive[site].bool()
        k = a.clone()
        n_alive = int(a.sum())
        if n_alive > 0:
            imp = imp.to(torch.float64)
            mean = imp[a].mean()
            rel = imp / mean if mean > 0 else torch.zeros_like(imp)
            k &= ~(rel < thresholds[site])
            if int(k.sum()) < min(min_keep, n_alive):
                idx = torch.nonzero(a).flatten()
                top = idx[torch.sort(imp[idx], descending=True, stable=True).indices[:min_keep]]
                k[top] = True
        keep[site] = k
    return keep


class AIAP(PruningMethod):
    """AIAP, Adaptive Iterative Activation-based Pruning (Zhao, Jain & Zhao, arXiv 2201.09881, 2022).

    Importance as in IAP (mean post-activation magnitude over the validation split), divided
    by the mean importance of the layer's remaining structures so that one T fits every layer.
    Layer l prunes the structures below T_l = T * n_l / sum_k n_k, n_l the weights its producer
    still has (:func:`remaining_weights`), keeping at least one. After each round (prune, retrain
    ``budget.round_epochs`` with a fresh Adam) the validation accuracy is compared with the
    unpruned network's: within ``tolerance`` points (default 1) the round is accepted and
    T <- T + lambda; otherwise the last accepted network is reloaded, lambda halved and the
    round retried from the last accepted T; three rejections in a row (``max_failures``) end it,
    as do ``budget.rounds`` attempts. Stopping point: the last accepted round. The curve holds the
    unpruned network and every accepted round; ``info["attempts"]`` every attempt.

    Deviations: the per-layer normalisation of importances, T's start (``threshold``, default
    0.5) and lambda (``step``, 0.5) are ours (not found); only the accuracy target is
    implemented (not parameter or FLOPs targets); Adam (lr ``budget.lr`` or 3e-3) instead of the
    paper's SGD schedule; structures are masked, not cut out.
    """

    name = "aiap"
    cite = _ZHAO + " (AIAP)"
    defaults = {"threshold": 0.5, "step": 0.5, "tolerance": 1.0, "max_failures": 3}

    def _run(self, model_builder, data, seed: int, budget: Budget, options: dict) -> MethodResult:
        model = build_deterministic(model_builder)
        x_train = data.train[0]
        links = links_of(model, x_train)
        train = dict(lr=budget.lr_or(3e-3), batch_size=budget.batch_size)
        losses = train_network(model, data.train, epochs=budget.epochs, seed=seed, **train)
        curve = [make_point(model, data, step=0)]
        schedule = ThresholdSchedule(float(options["threshold"]), float(options["step"]),
                                     int(options["max_failures"]))
        counter = {"round": 0}

        def prune(threshold: float) -> None:
            alive = get_masks(model)
            thresholds = layer_thresholds(threshold, remaining_weights(links, alive))
            set_masks(model, threshold_keep(mean_activation(model, data.val[0]), alive, thresholds))

        def retrain() -> None:
            counter["round"] += 1
            train_network(model, data.train, epochs=budget.round_epochs, seed=seed + counter["round"], **train)

        def on_accept(attempt: int) -> None:
            curve.append(make_point(model, data, step=attempt + 1))

        log = adaptive_rounds(
            schedule, attempts=budget.rounds, baseline=curve[0].val_accuracy, tolerance=float(options["tolerance"]),
            prune=prune, retrain=retrain, validate=lambda: accuracy(model, data.val),
            save=lambda: snapshot(model), load=lambda state: restore(model, state), on_accept=on_accept,
        )
        return MethodResult(
            method=self.name, unpruned_accuracy=curve[0].accuracy, unpruned_val_accuracy=curve[0].val_accuracy,
            curve=curve, stop=curve[-1], model=model,
            num_structures=sum(k.numel() for k in get_masks(model).values()),
            num_parameters=total_parameters(model, x_train),
            info={"attempts": log, "final_threshold": schedule.accepted, "train_loss": losses},
        )


__all__ = ["AIAP", "ThresholdSchedule", "adaptive_rounds", "layer_thresholds", "remaining_weights",
           "threshold_keep"]
