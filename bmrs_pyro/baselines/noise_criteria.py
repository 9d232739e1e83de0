"""The multiplicative-noise criteria (BMRS_N, BMRS_U-8, BMRS_U-4, SNR, E[theta], L2) as methods.

All six share one procedure: fit the noise model by SVI (:func:`bmrs_pyro.infer.fit` with an
:class:`~bmrs_pyro.guides.AutoTruncatedLogNormal` guide), then sweep the share of structures
removed (``reduce(..., fraction=f)``, ranking by the criterion's score) into a post-training
curve, each point evaluated in ``"mean"`` mode. The threshold-free criteria add their own
decision as the stopping point: BMRS prunes where dF >= -margin (1 nat), SNR where SNR < 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..criteria import get_criterion
from ..curves import CurvePoint, prune_and_measure, sweep, sweep_fractions
from ..guides import AutoTruncatedLogNormal
from ..infer import ANNEAL_FRACTION, WARM_START_FRACTION, anneal_epochs_for, evaluate, fit, warm_start_epochs_for
from ..nn import noise_modules
from ..pruner import reduce
from .common import (Budget, MethodResult, PruningMethod, compression, last_within, removed_indices,
                     snapshot, total_parameters)


class NoiseCriterionMethod(PruningMethod):
    """Post-training pruning of a multiplicative-noise network by one of the registry criteria.

    Procedure (Wright, Igel & Selvan, "BMRS: Bayesian Model Reduction for Structured Pruning",
    NeurIPS 2024, Section 5, post-training curves): train the noise model by SVI without
    pruning; for a grid of fractions rank the structures by the criterion, mask the lowest
    ``fraction`` (globally for dF, SNR and E[theta], within each layer for L2, as
    :func:`bmrs_pyro.pruner.reduce` defaults), optionally fine-tune, and test. Stopping point:
    the criterion's own rule (BMRS_N / BMRS_U: prune where dF >= -1, the default evidence margin;
    SNR: prune where SNR < 1);
    E[theta] and L2 have none (``stop`` is None) unless ``stop_tolerance`` asks for the largest
    swept compression whose validation accuracy is within that many points of the unpruned one.

    Deviations from the paper: a coarser grid (``fraction_step``, default 10 % steps instead of
    100 percentiles); fine-tuning per point is ``budget.finetune_epochs`` SVI epochs at
    ``budget.finetune_lr_factor`` of the training's learning rates (the paper: 1 epoch; 0 skips
    it); the loss is the true ELBO (``kl_weight=1``) unless ``kl_weight`` is given, where the
    authors' code weighs the KL far more heavily; the default BMRS_U lower bound is the layer's ``low`` rather than the code's
    log 2^-23 (see :func:`bmrs_pyro.criteria.bmrs_u_score`).

    Training recipe (issue 11): the first ``warm_start`` share of ``budget.epochs`` (0.25,
    :data:`bmrs_pyro.infer.WARM_START_FRACTION`) trains the deterministic twin (theta = 1, no KL),
    the rest SVI, inside the same epoch budget as every other method (``fit(...,
    warm_start_epochs=k)``); ``warm_start=0`` is SVI from the start, as before. The last ``anneal``
    share (0.1, :data:`bmrs_pyro.infer.ANNEAL_FRACTION`) trains the weights at a tenth of their
    rate (``fit(..., anneal_epochs=k)``); ``anneal=0`` keeps the rate constant.

    Options: ``kl_weight`` (1.0), ``guide_lr`` (0.05, Adam rate of the variational parameters),
    ``warm_start`` (0.25, share of the epochs trained deterministically first), ``anneal`` (0.1,
    share of the epochs, at the end, with the weights at a tenth of their rate), ``fraction_step`` (0.1), ``fractions`` (None: the grid),
    ``stop_tolerance`` (None), ``criterion_options`` (dict passed to ``reduce``, merged over the
    method's own, e.g. ``{"bits": 8}``).
    """

    # guide_lr: the variational parameters need a larger Adam rate than the weights to converge
    # in a small budget (see bmrs_pyro.infer.fit).
    defaults = {"kl_weight": 1.0, "guide_lr": 0.05, "warm_start": WARM_START_FRACTION, "anneal": ANNEAL_FRACTION,
                "fraction_step": 0.1,
                "fractions": None, "stop_tolerance": None, "criterion_options": None}

    def __init__(self, name: str, criterion: str, cite: str, criterion_options: Optional[dict] = None,
                 lr: float = 1e-3) -> None:
        self.name = name
        self.criterion = get_criterion(criterion).name
        self.cite = cite
        self.criterion_options = dict(criterion_options or {})
        self.lr = lr
        # Each registered method documents its own paper and criterion above the shared procedure.
        self.__doc__ = (f"{name}: {cite}.\n\nCriterion: {get_criterion(criterion).doc}\n\n"
                        f"{type(self).__doc__}")

    def _run(self, model_builder, data, seed: int, budget: Budget, options: dict) -> MethodResult:
        return self.sweep(self.fit_noise_model(model_builder, data, seed, budget, options), data, seed, budget,
                          options)

    def fit_noise_model(self, model_builder, data, seed: int, budget: Budget, options: dict) -> "FittedNoiseModel":
        """Train the multiplicative-noise model by SVI; the part several criteria can share."""
        model = model_builder()
        layers = noise_modules(model)
        if not layers:
            raise ValueError(f"{self.name}: the model has no MultiplicativeNoise layer to prune")
        guide = AutoTruncatedLogNormal(model)
        train_options = dict(batch_size=budget.batch_size, lr=budget.lr_or(self.lr), guide_lr=float(options["guide_lr"]),
                             kl_weight=float(options["kl_weight"]), progress=False)
        # The warm start is counted inside budget.epochs (the same budget as every other method);
        # the fine-tuning fits of the sweep (train_options) are SVI only.
        warm = warm_start_epochs_for(budget.epochs, float(options["warm_start"]))
        anneal = min(anneal_epochs_for(budget.epochs, float(options["anneal"])), budget.epochs - warm)
        history = fit(model, guide, data.train, epochs=budget.epochs, seed=seed, warm_start_epochs=warm,
                      anneal_epochs=anneal, **train_options)
        return FittedNoiseModel(
            model=model, guide=guide, history=history, train_options=train_options,
            num_structures=sum(layer.num_structures for layer in layers.values()),
            unpruned_test=evaluate(model, guide, data.test)["accuracy"],
            unpruned_val=evaluate(model, guide, data.val)["accuracy"],
            trained=(snapshot(model), snapshot(guide)))

    def sweep(self, fitted: "FittedNoiseModel", data, seed: int, budget: Budget, options: dict) -> MethodResult:
        """This criterion's curve and stopping point, starting from the trained snapshot of ``fitted``."""
        crit = get_criterion(self.criterion)
        crit_options = dict(self.criterion_options, **(options["criterion_options"] or {}))
        model, guide, x_train = fitted.model, fitted.guide, data.train[0]
        fractions = options["fractions"]
        fractions = sweep_fractions(fitted.num_structures, options["fraction_step"]) if fractions is None else sorted(
            float(f) for f in fractions)
        _load(model, guide, fitted.trained)

        def prune(fraction: Optional[float]):
            result = reduce(model, guide, crit, fraction=fraction, **crit_options)
            result.apply()
            # counted before fine-tuning: tracing the network runs it once
            return result, compression(model, result.keep, x_train)

        factor = budget.finetune_lr_factor
        tune_options = dict(fitted.train_options, lr=factor * fitted.train_options["lr"],
                            guide_lr=factor * fitted.train_options["guide_lr"])

        def finetune(pruned) -> None:
            fit(model, guide, data.train, epochs=budget.finetune_epochs, seed=seed + 1, **tune_options)

        def measure(fraction: Optional[float], pruned, _) -> CurvePoint:
            result, (s, p) = pruned
            return CurvePoint(structures_removed=s, parameters_removed=p,
                         accuracy=evaluate(model, guide, data.test)["accuracy"],
                         val_accuracy=evaluate(model, guide, data.val)["accuracy"],
                         step=fraction, kept_per_layer=dict(result.kept_per_layer),
                         removed=removed_indices(result.keep))

        tune = finetune if budget.finetune_epochs > 0 else None
        curve = sweep(fractions, prune, measure, lambda: _load(model, guide, fitted.trained), finetune=tune)
        stop: Optional[CurvePoint] = None
        if crit.has_rule:
            stop = prune_and_measure(None, prune, measure, finetune=tune)
        elif options["stop_tolerance"] is not None:
            best = last_within(curve, fitted.unpruned_val, float(options["stop_tolerance"]))
            stop = prune_and_measure(curve[best].step, prune, measure, finetune=tune)
        return MethodResult(
            method=self.name, unpruned_accuracy=fitted.unpruned_test, unpruned_val_accuracy=fitted.unpruned_val,
            curve=curve, stop=stop, model=model, guide=guide, num_structures=fitted.num_structures,
            num_parameters=total_parameters(model, x_train),
            info={"criterion": crit.name, "criterion_options": crit_options, "elbo": list(fitted.history.elbo),
                  "fractions": fractions},
        )


@dataclass
class FittedNoiseModel:
    """A trained noise model and its guide, with the snapshot every sweep starts from."""

    model: Any
    guide: Any
    history: Any
    train_options: dict
    num_structures: int
    unpruned_test: float
    unpruned_val: float
    trained: tuple


def _load(model, guide, states) -> None:
    model.load_state_dict(states[0])
    guide.load_state_dict(states[1])


_BMRS = ("Wright, Igel & Selvan, 'BMRS: Bayesian Model Reduction for Structured Pruning', NeurIPS 2024")
_SBP = ("Neklyudov, Molchanov, Ashukha & Vetrov, 'Structured Bayesian Pruning via Log-Normal Multiplicative "
        "Noise', NeurIPS 2017 (SNR < 1 rule); as a baseline in " + _BMRS)


def noise_methods() -> dict[str, NoiseCriterionMethod]:
    """The multiplicative-noise methods by name.

    The BMRS entries decide with the default evidence margin of 1 nat (prune where dF >= -1);
    ``bmrs_n_strict`` is BMRS_N with margin 0 (the strict Bayes-factor rule dF >= 0) and
    ``bmrs_n_ref`` the authors' public-code decisions (their dF lacks -0.5 log 2pi: margin 0.919).
    """
    return {
        "bmrs_n": NoiseCriterionMethod("bmrs_n", "bmrs_n", _BMRS + " (BMRS_N)"),
        "bmrs_n_strict": NoiseCriterionMethod("bmrs_n_strict", "bmrs_n", _BMRS + " (BMRS_N with margin 0, the strict "
                                              "rule dF >= 0; for comparison)", {"margin": 0.0}),
        "bmrs_n_ref": NoiseCriterionMethod("bmrs_n_ref", "bmrs_n", _BMRS + " (BMRS_N with the authors' "
                                           "public-code dF, 0.919 nats higher; for comparison)",
                                           {"reference_code": True}),
        "bmrs_u8": NoiseCriterionMethod("bmrs_u8", "bmrs_u", _BMRS + " (BMRS_U-8)", {"bits": 8}),
        "bmrs_u4": NoiseCriterionMethod("bmrs_u4", "bmrs_u", _BMRS + " (BMRS_U-4)", {"bits": 4}),
        "snr": NoiseCriterionMethod("snr", "snr", _SBP),
        "e_theta": NoiseCriterionMethod("e_theta", "e_theta", _BMRS + " (E[theta] baseline)"),
        "l2": NoiseCriterionMethod("l2", "l2", _BMRS + " (L2 weight-norm baseline); Li, Kadav, Durdanovic, "
                                   "Samet & Graf, 'Pruning Filters for Efficient ConvNets', ICLR 2017"),
    }


__all__ = ["FittedNoiseModel", "NoiseCriterionMethod", "noise_methods"]
