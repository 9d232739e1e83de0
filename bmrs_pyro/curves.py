"""Post-training pruning: accuracy-vs-compression curves, and the parameter count behind them.

:func:`prune_curve` sweeps the fraction of structures removed by a criterion (ranking by its
score), evaluates each pruned network and, for threshold-free methods (BMRS_N, BMRS_U, SNR), adds
the method's own decision as a single ``stop_point``. :func:`count_parameters` counts the weights
that survive a set of masks, i.e. the parameters of the physically compacted network.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .atomic_io import jsonable
from .criteria import get_criterion
from .structures import NORM_TYPES, StructureLinks, example_input, structure_map
from .infer import evaluate, fit
from .nn import noise_modules
from .pruner import reduce


# ---------------------------------------------------------------- parameter count


def _check_masks(layers: dict, masks: Optional[dict]) -> dict[str, torch.Tensor]:
    if masks is None:
        return {site: layer.mask.detach().cpu() > 0 for site, layer in layers.items()}
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise ValueError(f"masks name unknown noise sites {unknown}; sites: {list(layers)}")
    out = {}
    for site, layer in layers.items():
        m = masks.get(site)
        m = layer.mask.detach().cpu() if m is None else torch.as_tensor(m).detach().cpu()
        if m.shape != (layer.num_structures,):
            raise ValueError(f"mask for {site} has shape {tuple(m.shape)}; expected ({layer.num_structures},)")
        out[site] = m > 0
    return out


def _count(model: nn.Module, links: dict[str, StructureLinks], keep: dict[str, torch.Tensor]) -> tuple[int, int]:
    out_kept: dict[int, int] = {}  # id(module) -> kept output channels
    in_removed: dict[int, int] = {}  # id(module) -> removed input columns
    for site, link in links.items():
        pruned = int((~keep[site]).sum())
        if link.producer is not None:
            out_kept[id(link.producer)] = link.layer.num_structures - pruned
            for _, norm in link.norms:
                out_kept[id(norm)] = link.layer.num_structures - pruned
        if link.consumer is not None:
            in_removed[id(link.consumer)] = in_removed.get(id(link.consumer), 0) + pruned * link.columns_per_structure
    kept = total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            n = p.numel()
            total += n
            if id(module) not in out_kept and id(module) not in in_removed:
                kept += n
                continue
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and name == "weight":
                rows, cols = p.shape[0], p.shape[1]
                per_entry = n // (rows * cols)  # kernel size for convolutions
                rows = out_kept.get(id(module), rows)
                cols -= in_removed.get(id(module), 0)
                kept += rows * cols * per_entry
            elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd) + NORM_TYPES) and p.dim() == 1:
                kept += out_kept.get(id(module), n)  # bias, BatchNorm weight and bias
            else:
                kept += n
    return kept, total


def count_parameters(model: nn.Module, masks: Optional[dict] = None, *, inputs=None) -> tuple[int, int]:
    """Parameters of ``model`` that survive ``masks`` (default: the layers' current masks).

    A pruned structure takes with it its incoming weights and bias (the producer's output row or
    filter), the affine parameters of a BatchNorm between producer and noise layer, and its
    outgoing weights in the next Linear/Conv (H*W input columns per channel after a
    conv -> flatten -> linear transition); a weight between two pruned structures is counted once.
    This is the parameter count of the physically compacted network. Only the model's own
    parameters are counted (not the guide's mu and log sigma). The layers around each noise layer
    are found by :func:`bmrs_pyro.criteria.structure_map` (Sequential-style backbones), traced on
    ``inputs`` (``(args, kwargs)``) or on the inputs the attached guide has seen.

    Returns ``(kept, total)``.
    """
    layers = noise_modules(model)
    keep = _check_masks(layers, masks)
    inputs = example_input(model) if inputs is None else inputs
    return _count(model, structure_map(model, inputs), keep)


# ---------------------------------------------------------------- curves


@dataclass
class CurvePoint:
    """One pruned network on an accuracy-vs-compression curve: the one point type of
    :class:`PruneCurve` (:func:`prune_curve`) and of the baselines'
    :class:`~bmrs_pyro.baselines.MethodResult`.

    ``structures_removed`` and ``parameters_removed`` are percentages (parameters: those of the
    physically compacted network, :func:`count_parameters`); ``accuracy`` is on the evaluation
    (test) data, after fine-tuning when asked (``accuracy_before_finetune`` then holds the value
    before it, for :func:`prune_curve`); ``val_accuracy`` on the validation split when there is
    one; ``step`` is the swept fraction (None at a method's own stopping point) or the round
    number of an iterative method; ``kept_per_layer`` maps each noise site to ``(kept, total)``
    and ``removed`` to the indices of its removed structures; ``nll`` the evaluation data's mean
    negative log-likelihood where it was measured.
    """

    structures_removed: float
    parameters_removed: float
    accuracy: float
    val_accuracy: Optional[float] = None
    step: Any = None
    kept_per_layer: dict = field(default_factory=dict)
    removed: dict = field(default_factory=dict)
    nll: Optional[float] = None
    accuracy_before_finetune: Optional[float] = None

    def to_dict(self) -> dict:
        """The point as a dict (``kept_per_layer`` values as lists)."""
        d = asdict(self)
        d["kept_per_layer"] = {k: list(v) for k, v in self.kept_per_layer.items()}
        return d


@dataclass
class PruneCurve:
    """An accuracy-vs-compression curve: the one curve type of the package.

    :func:`prune_curve` returns one for a criterion's sweep; every related-work method returns a
    :class:`~bmrs_pyro.baselines.MethodResult`, which is a ``PruneCurve`` plus the run's network,
    guide, wall time and details.

    Attributes:
        criterion: the criterion's or method's name.
        options: the criterion's options.
        mode: how the points were evaluated (``"mean"``/``"sample"`` for :func:`prune_curve`,
            ``"method"`` for a method's own run).
        baseline: the unpruned network's ``accuracy`` (and ``nll`` / ``val_accuracy`` where
            measured).
        points: :class:`CurvePoint` s in order of increasing compression.
        stop_point: the criterion's or method's own stopping point, or None (ranking only).
        num_structures, num_parameters: of the unpruned network.
        finetune_epochs: fine-tuning per point.
    """

    criterion: str
    options: dict
    mode: str
    baseline: dict
    points: list = field(default_factory=list)
    stop_point: Optional[CurvePoint] = None
    num_structures: int = 0
    num_parameters: int = 0
    finetune_epochs: int = 0

    def as_arrays(self) -> dict[str, np.ndarray]:
        """The curve as arrays (NaN where a point has no value): fraction (the points' ``step``),
        structures_removed, parameters_removed, accuracy, val_accuracy, nll."""
        keys = ("structures_removed", "parameters_removed", "accuracy", "val_accuracy", "nll")
        out = {"fraction": np.array([_number(p.step) for p in self.points], dtype=float)}
        out.update({k: np.array([_number(getattr(p, k)) for p in self.points], dtype=float) for k in keys})
        return out

    def to_dict(self) -> dict:
        """A JSON-friendly dict of the whole curve."""
        return {
            "criterion": self.criterion,
            "options": {k: (v if isinstance(v, (str, int, float, bool)) or v is None else repr(v))
                        for k, v in self.options.items()},
            "mode": self.mode,
            "baseline": jsonable(self.baseline),
            "num_structures": self.num_structures,
            "num_parameters": self.num_parameters,
            "finetune_epochs": self.finetune_epochs,
            "points": [_point_dict(p) for p in self.points],
            "stop_point": None if self.stop_point is None else _point_dict(self.stop_point),
        }

    def _title(self) -> str:
        return (f"prune_curve({self.criterion!r}, mode={self.mode!r}, finetune_epochs={self.finetune_epochs}): "
                f"unpruned accuracy {self.baseline['accuracy']:.4f}")

    def __str__(self) -> str:
        head = (f"{'step':>8}  {'struct. removed %':>17}  {'params removed %':>16}  {'accuracy':>8}  {'val acc':>8}  "
                f"{'nll':>8}")
        lines = [self._title(), head, "-" * len(head)]
        rows = [(p.step, p) for p in self.points] + ([("stop", self.stop_point)] if self.stop_point is not None else [])
        for tag, p in rows:
            tag = f"{tag:.3f}" if isinstance(tag, float) else str(tag)
            val = "" if p.val_accuracy is None else f"{p.val_accuracy:.4f}"
            nll = "" if p.nll is None else f"{p.nll:.4f}"
            lines.append(f"{tag:>8}  {p.structures_removed:>17.2f}  {p.parameters_removed:>16.2f}  "
                         f"{p.accuracy:>8.4f}  {val:>8}  {nll:>8}")
        return "\n".join(lines)

    __repr__ = __str__


def _number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else float("nan")


def _point_dict(p: CurvePoint) -> dict:
    d = p.to_dict()
    d["step"] = jsonable(p.step)
    return d


def sweep_fractions(num_structures: int, step: float = 0.05) -> list[float]:
    """The grid of shares of structures removed that a sweep evaluates: 0, step, 2 step, ... below 1,
    plus 1 - 1/S (all but one structure; ``min_keep`` then caps per layer). The one grid of
    :func:`prune_curve` and of the baselines' noise-criterion sweeps."""
    if not (isinstance(step, (int, float)) and not isinstance(step, bool) and 0 < step <= 1):
        raise ValueError(f"step must be in (0, 1], got {step!r}")
    out = [round(step * i, 10) for i in range(int(math.floor(1 / step + 1e-9)) + 1) if step * i < 1 - 1e-9]
    guard = 1.0 - 1.0 / num_structures
    if guard > out[-1]:
        out.append(guard)
    return out


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise ValueError(f"fractions must be numbers in [0, 1], got {f!r}")
        out.append(float(f))
    return sorted(set(out))


def _snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def prune_and_measure(fraction: Optional[float], prune: Callable[[Optional[float]], Any],
                      measure: Callable[[Optional[float], Any, Any], Any], *,
                      finetune: Optional[Callable[[Any], Any]] = None) -> Any:
    """One point of a sweep, left pruned: ``result = prune(fraction)`` (rank the structures and mask
    the lowest ``fraction``; None: the method's own rule), then ``extra = finetune(result)`` when
    given (None otherwise), then ``measure(fraction, result, extra)`` (evaluate, count parameters),
    whose value is returned. The caller restores the network when it wants to."""
    result = prune(fraction)
    extra = finetune(result) if finetune is not None else None
    return measure(fraction, result, extra)


def sweep(fractions: Sequence[Optional[float]], prune: Callable[[Optional[float]], Any],
          measure: Callable[[Optional[float], Any, Any], Any], restore: Callable[[], None], *,
          finetune: Optional[Callable[[Any], Any]] = None) -> list:
    """The one fraction sweep behind every accuracy-vs-compression curve (:func:`prune_curve`, the
    noise criteria and RNI of :mod:`bmrs_pyro.baselines`): for each fraction in order, one
    :func:`prune_and_measure` point (rank, remove, optionally fine-tune, evaluate, count), then
    ``restore()`` (masks and, after fine-tuning, weights back to the trained network). Returns the
    list of what ``measure`` returned. The callables fix what each step means (which criterion,
    which data, which optimiser), the order of the steps is the same for every method."""
    points = []
    for fraction in fractions:
        points.append(prune_and_measure(fraction, prune, measure, finetune=finetune))
        restore()
    return points


def prune_curve(
    model: nn.Module,
    guide,
    data,
    criterion: str,
    fractions: Optional[Sequence[float]] = None,
    *,
    finetune_epochs: int = 0,
    train_data=None,
    mode: str = "mean",
    score_data=None,
    finetune_options: Optional[dict] = None,
    num_samples: int = 32,
    **options,
) -> PruneCurve:
    """Sweep the share of structures removed by ``criterion`` and evaluate each pruned network.

    For every ``f`` in ``fractions`` (default :func:`sweep_fractions`) the masks are set as by
    ``reduce(model, guide, criterion, fraction=f, **options)`` starting from the current masks,
    and ``evaluate(model, guide, data, mode)`` is recorded with the structures and parameters
    removed (:func:`count_parameters`). Criteria with a rule of their own (``bmrs_n``, ``bmrs_u``,
    ``snr``) also get their decision as ``stop_point``; pass ``fractions=()`` for it alone.

    Args:
        data: evaluation data ``(X, y)``.
        finetune_epochs: if > 0, fine-tune each pruned network with :func:`bmrs_pyro.infer.fit` on
            ``train_data`` for this many epochs (masks fixed, ``finetune_options`` passed to fit)
            before evaluating; all weights and guide parameters are restored afterwards.
        score_data: data for data-dependent criteria (``activation``); defaults to ``train_data``,
            else ``data``.
        **options: passed to :func:`bmrs_pyro.pruner.reduce` (``scope``, ``min_keep``,
            ``respect_mask``, ``bits``, ...).

    The model's masks (and, with fine-tuning, its weights) are restored at the end.
    """
    crit = get_criterion(criterion)
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an int >= 0, got {finetune_epochs!r}")
    if finetune_epochs > 0 and train_data is None:
        raise ValueError("fine-tuning needs train_data=(X, y)")
    if "fraction" in options:
        raise ValueError("pass fractions=[...] (a list) to prune_curve, not fraction=")
    layers = noise_modules(model)
    if not layers:
        raise ValueError("the model has no MultiplicativeNoise layer: nothing to prune")
    num_structures = sum(layer.num_structures for layer in layers.values())
    fractions = sweep_fractions(num_structures) if fractions is None else _check_fractions(fractions)
    score_data = score_data if score_data is not None else (train_data if train_data is not None else data)
    finetune_options = dict(finetune_options or {})
    finetune_options.setdefault("progress", False)

    links = structure_map(model, example_input(model, guide, data))
    original_masks = {site: layer.mask.detach().clone() for site, layer in layers.items()}
    snapshots = (_snapshot(model), _snapshot(guide)) if finetune_epochs > 0 else None
    _, num_parameters = _count(model, links, _check_masks(layers, None))

    def restore() -> None:
        if snapshots is not None:
            model.load_state_dict(snapshots[0])
            guide.load_state_dict(snapshots[1])
        with torch.no_grad():
            for site, layer in layers.items():
                layer.mask.copy_(original_masks[site])

    def prune(fraction: Optional[float]):
        result = reduce(model, guide, crit, fraction=fraction, data=score_data, **options)
        result.apply()
        return result

    def finetune(result) -> Optional[float]:
        before = evaluate(model, guide, data, mode, num_samples=num_samples)["accuracy"]
        fit(model, guide, train_data, epochs=finetune_epochs, **finetune_options)
        return before

    def measure(fraction: Optional[float], result, before: Optional[float]) -> CurvePoint:
        kept, total = _count(model, links, result.keep)
        metrics = evaluate(model, guide, data, mode, num_samples=num_samples)
        return CurvePoint(
            step=fraction,
            structures_removed=100.0 * result.fraction_removed,
            parameters_removed=100.0 * (1.0 - kept / total) if total else 0.0,
            accuracy=metrics["accuracy"],
            nll=metrics["nll"],
            kept_per_layer=dict(result.kept_per_layer),
            accuracy_before_finetune=before,
        )

    tune = finetune if finetune_epochs > 0 else None
    try:
        baseline = evaluate(model, guide, data, mode, num_samples=num_samples)
        points = sweep(fractions, prune, measure, restore, finetune=tune)
        stop = prune_and_measure(None, prune, measure, finetune=tune) if crit.has_rule else None
    finally:
        restore()
    return PruneCurve(
        criterion=crit.name,
        options=dict(options),
        mode=mode,
        baseline=baseline,
        points=points,
        stop_point=stop,
        num_structures=num_structures,
        num_parameters=num_parameters,
        finetune_epochs=finetune_epochs,
    )


__all__ = ["CurvePoint", "PruneCurve", "count_parameters", "prune_and_measure", "prune_curve", "sweep",
           "sweep_fractions"]

