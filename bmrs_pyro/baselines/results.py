"""What a pruning method is given and returns: the :class:`Budget` and the :class:`MethodResult`
of one method on one seed (a :class:`bmrs_pyro.curves.PruneCurve` with the run's network)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from torch import nn

from ..checks import check_int, is_number
from ..atomic_io import jsonable
from ..curves import CurvePoint, PruneCurve


@dataclass(frozen=True)
class Budget:
    """How much training a method may spend; small defaults that run in seconds on digits.

    Attributes:
        epochs: training before any pruning (SVI epochs for the Bayesian methods).
        finetune_epochs: fine-tuning after a one-shot pruning decision (each point of a swept
            curve, and the method's own stopping point).
        finetune_lr_factor: the fine-tuning's learning rates (weights and, for the noise methods,
            the variational parameters) as a share of the training's. 0.1: one epoch at the
            training rate moves a network trained at a constant rate by as much as its own
            epoch-to-epoch noise (LeNet-5 on mnist5k, nothing pruned: -0.5 to -1.7 points, seeds
            0-2), at a tenth of it by +0.2 to +0.4; the usual lower rate of fine-tuning.
        rounds: iterative methods: prune-retrain rounds (AIAP: attempts, accepted or not).
        round_epochs: iterative methods: retraining epochs after each removal.
        batch_size: minibatch size of every loop.
        lr: Adam learning rate; ``None`` lets each method use its own default.
    """

    epochs: int = 20
    finetune_epochs: int = 1
    finetune_lr_factor: float = 0.1
    rounds: int = 6
    round_epochs: int = 2
    batch_size: int = 64
    lr: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("finetune_epochs", "rounds", "round_epochs"):
            check_int(name, getattr(self, name), minimum=0)
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not self.lr > 0 or not math.isfinite(self.lr)):
            raise ValueError(f"budget lr must be a positive number or None, got {self.lr!r}")
        if not (is_number(self.finetune_lr_factor) and 0 < self.finetune_lr_factor <= 1):
            raise ValueError(f"budget finetune_lr_factor must be in (0, 1], got {self.finetune_lr_factor!r}")

    @classmethod
    def coerce(cls, budget: "Budget | Mapping[str, Any] | None") -> "Budget":
        """A Budget from ``None`` (defaults), a Budget, or a dict of its fields."""
        if budget is None:
            return cls()
        if isinstance(budget, cls):
            return budget
        if isinstance(budget, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(budget) - known)
            if unknown:
                raise ValueError(f"unknown budget field(s) {unknown}; accepted: {sorted(known)}")
            return cls(**budget)
        raise ValueError(f"budget must be a Budget, a dict of its fields or None, got {type(budget).__name__}")

    def lr_or(self, default: float) -> float:
        """The budget's learning rate, or the method's ``default`` when none was given."""
        return float(self.lr) if self.lr is not None else default


class MethodResult(PruneCurve):
    """What a :class:`PruningMethod` run produced: its accuracy-vs-compression curve (a
    :class:`~bmrs_pyro.curves.PruneCurve`, ``mode="method"``) and the run's network.

    Built as ``MethodResult(method, unpruned_accuracy, curve, stop, model, ...)``; besides the
    curve's own fields it has:

    Attributes:
        method: the method's registry name (the curve's ``criterion``).
        unpruned_accuracy, unpruned_val_accuracy: test / validation accuracy of the trained
            network before any structure was removed (the curve's ``baseline``).
        curve: the points, in order of increasing compression (a swept fraction, or the rounds of
            an iterative method; the curve's ``points``).
        stop: the method's own stopping point (its rule, or where its own criterion stops), or
            None for ranking-only criteria that have no rule (the curve's ``stop_point``).
        model: the final network, pruned at ``stop`` with its masks applied (the unpruned trained
            network when ``stop`` is None).
        wall_time: seconds the whole run took (training included).
        guide: the fitted guide, for the methods that have one (else None).
        info: method-specific details (options used, thresholds, attempts, ...).
    """

    def __init__(self, method: str, unpruned_accuracy: float, curve: list, stop: Optional[CurvePoint],
                 model: nn.Module, wall_time: float = 0.0, unpruned_val_accuracy: Optional[float] = None,
                 num_structures: int = 0, num_parameters: int = 0, guide: Any = None,
                 info: Optional[dict] = None) -> None:
        super().__init__(criterion=method, options={}, mode="method",
                         baseline={"accuracy": unpruned_accuracy, "val_accuracy": unpruned_val_accuracy},
                         points=curve, stop_point=stop, num_structures=num_structures,
                         num_parameters=num_parameters)
        self.model, self.wall_time, self.guide, self.info = model, wall_time, guide, dict(info or {})

    method = property(lambda self: self.criterion, doc="The method's registry name.")
    curve = property(lambda self: self.points, doc="The curve's points.")
    stop = property(lambda self: self.stop_point, doc="The method's own stopping point, or None.")
    unpruned_accuracy = property(lambda self: self.baseline["accuracy"], doc="Unpruned test accuracy.")
    unpruned_val_accuracy = property(lambda self: self.baseline.get("val_accuracy"),
                                     doc="Unpruned validation accuracy, or None.")

    def to_dict(self) -> dict:
        """A JSON-friendly summary: the curve's dict under the method's names (no model, no guide)."""
        d = super().to_dict()
        return {"method": self.method, "unpruned_accuracy": self.unpruned_accuracy,
                "unpruned_val_accuracy": self.unpruned_val_accuracy, "num_structures": self.num_structures,
                "num_parameters": self.num_parameters, "wall_time": self.wall_time, "curve": d["points"],
                "stop": d["stop_point"], "info": jsonable(self.info)}

    def _title(self) -> str:
        return f"{self.method}: unpruned test accuracy {self.unpruned_accuracy:.4f}, {self.wall_time:.1f} s"
