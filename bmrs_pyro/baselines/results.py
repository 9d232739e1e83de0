"""What a pruning method is given and returns: the :class:`Budget` and the :class:`MethodResult`
of one method on one seed (its points are :class:`bmrs_pyro.curves.CurvePoint` s)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ..checks import check_int
from ..curves import CurvePoint


@dataclass(frozen=True)
class Budget:
    """How much training a method may spend; small defaults that run in seconds on digits.

    Attributes:
        epochs: training before any pruning (SVI epochs for the Bayesian methods).
        finetune_epochs: fine-tuning after a one-shot pruning decision (each point of a swept
            curve, and the method's own stopping point).
        rounds: iterative methods: prune-retrain rounds (AIAP: attempts, accepted or not).
        round_epochs: iterative methods: retraining epochs after each removal.
        batch_size: minibatch size of every loop.
        lr: Adam learning rate; ``None`` lets each method use its own default.
    """

    epochs: int = 20
    finetune_epochs: int = 1
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


@dataclass
class MethodResult:
    """What a :class:`PruningMethod` run produced.

    Attributes:
        method: the method's registry name.
        unpruned_accuracy, unpruned_val_accuracy: test / validation accuracy of the trained
            network before any structure was removed.
        curve: the accuracy-vs-compression points, in order of increasing compression (a swept
            fraction, or the rounds of an iterative method).
        stop: the method's own stopping point (its rule, or where its own criterion stops), or
            None for ranking-only criteria that have no rule.
        model: the final network, pruned at ``stop`` with its masks applied (the unpruned trained
            network when ``stop`` is None).
        wall_time: seconds the whole run took (training included).
        num_structures, num_parameters: prunable structures and parameters of the unpruned network.
        guide: the fitted guide, for the methods that have one (else None).
        info: method-specific details (options used, thresholds, attempts, ...).
    """

    method: str
    unpruned_accuracy: float
    curve: list
    stop: Optional[CurvePoint]
    model: nn.Module
    wall_time: float = 0.0
    unpruned_val_accuracy: Optional[float] = None
    num_structures: int = 0
    num_parameters: int = 0
    guide: Any = None
    info: dict = field(default_factory=dict)

    def as_arrays(self) -> dict[str, np.ndarray]:
        """The curve as arrays: structures_removed, parameters_removed, accuracy, val_accuracy."""
        keys = ("structures_removed", "parameters_removed", "accuracy", "val_accuracy")
        return {k: np.array([np.nan if getattr(p, k) is None else getattr(p, k) for p in self.curve], dtype=float)
                for k in keys}

    def to_dict(self) -> dict:
        """A JSON-friendly summary (no model, no guide)."""
        return {
            "method": self.method,
            "unpruned_accuracy": self.unpruned_accuracy,
            "unpruned_val_accuracy": self.unpruned_val_accuracy,
            "num_structures": self.num_structures,
            "num_parameters": self.num_parameters,
            "wall_time": self.wall_time,
            "curve": [_point_dict(p) for p in self.curve],
            "stop": None if self.stop is None else _point_dict(self.stop),
            "info": {k: _jsonable(v) for k, v in self.info.items()},
        }

    def __str__(self) -> str:
        head = f"{'step':>8}  {'struct. removed %':>17}  {'params removed %':>16}  {'test acc':>8}  {'val acc':>8}"
        lines = [f"{self.method}: unpruned test accuracy {self.unpruned_accuracy:.4f}, "
                 f"{self.wall_time:.1f} s", head, "-" * len(head)]
        rows = [(p.step, p) for p in self.curve] + ([("stop", self.stop)] if self.stop is not None else [])
        for tag, p in rows:
            tag = f"{tag:.3f}" if isinstance(tag, float) else str(tag)
            val = "" if p.val_accuracy is None else f"{p.val_accuracy:.4f}"
            lines.append(f"{tag:>8}  {p.structures_removed:>17.2f}  {p.parameters_removed:>16.2f}  "
                         f"{p.accuracy:>8.4f}  {val:>8}")
        return "\n".join(lines)

    __repr__ = __str__


def _point_dict(p: CurvePoint) -> dict:
    d = p.to_dict()
    d["step"] = _jsonable(p.step)
    return d


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return repr(v)
