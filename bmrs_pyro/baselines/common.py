"""What every baseline pruning method shares: the interface, the result, the budget and the loops.

A method is a :class:`PruningMethod`; its :meth:`~PruningMethod.run` takes a model builder and a
:class:`~bmrs_pyro.data.DataSplits` and returns a :class:`MethodResult`. The loops the baselines
share live here: a deterministic training loop over a zoo network whose noise layers are bypassed
(E[theta] fixed at 1, "mean" mode, so the masks still work), accuracy, per-structure importances
(activations, weight norms), masking by importance within each layer or globally, and the
compression a set of masks gives (:func:`bmrs_pyro.curves.count_parameters`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from typing import Any, Callable, Mapping, Optional, Sequence

import pyro
import torch
import torch.nn.functional as F
from torch import nn

from ..batching import iterate_batches
from ..checks import check_int
from ..structures import StructureLinks, mean_abs_activation, weight_norm, structure_map
from ..curves import CurvePoint, count_parameters
from ..evaluation import classify
from ..infer import run_epoch
from ..optim import adam
from ..nn import MultiplicativeNoise, noise_modules, set_mode
from .results import Budget, MethodResult


Pair = tuple[torch.Tensor, torch.Tensor]
ModelBuilder = Callable[[], nn.Module]


# ---------------------------------------------------------------- budget, points, results


# ---------------------------------------------------------------- the interface


class PruningMethod:
    """A structured-pruning method from the literature behind one interface.

    Subclasses set ``name``, ``cite`` (the paper) and ``defaults`` (their options and default
    values), document the paper and every deviation from it in their docstring, and implement
    :meth:`_run`. :meth:`run` checks the arguments, seeds every generator, times the run and
    fills in ``wall_time``.
    """

    name: str = ""
    cite: str = ""
    defaults: Mapping[str, Any] = {}

    def run(self, model_builder: ModelBuilder, data, *, seed: int = 0,
            budget: "Budget | Mapping[str, Any] | None" = None, **options: Any) -> MethodResult:
        """Train, prune and evaluate a fresh model from ``model_builder`` on ``data``.

        Args:
            model_builder: ``model_builder()`` returns a fresh network, a
                :class:`~bmrs_pyro.nn.NoisyClassifier` from the zoo (``lambda: mlp(64, 10)``).
            data: a :class:`~bmrs_pyro.data.DataSplits` (``.train``, ``.val``, ``.test``).
            seed: seeds torch, Pyro, NumPy and Python's ``random`` before the model is built.
                The run uses a fresh Pyro param store; the caller's is restored afterwards.
            budget: a :class:`Budget` (or a dict of its fields): epochs, rounds, batch size, lr.
            **options: the method's own options (see its ``defaults``); others raise ValueError.
        """
        if not callable(model_builder):
            raise ValueError("model_builder must be a callable returning a fresh model, e.g. lambda: mlp(64, 10)")
        check_data(data)
        check_int("seed", seed, minimum=0)
        budget = Budget.coerce(budget)
        opts = self.check_options(options)
        start = time.perf_counter()
        # PyroModule parameters live in the global param store under their module names: a second
        # run would silently start from the first one's values, so each run gets a fresh store and
        # the caller's store comes back afterwards.
        with pyro.get_param_store().scope():
            seed_all(seed)
            result = self._run(model_builder, data, seed, budget, opts)
        result.wall_time = time.perf_counter() - start
        result.info.setdefault("options", dict(opts))
        result.info.setdefault("budget", asdict(budget))
        return result

    def check_options(self, options: Mapping[str, Any]) -> dict:
        """``defaults`` updated by ``options``; an unknown name raises ValueError."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {unknown}; accepted: {sorted(self.defaults) or 'none'}")
        merged = dict(self.defaults)
        merged.update(options)
        return merged

    def _run(self, model_builder: ModelBuilder, data, seed: int, budget: Budget, options: dict) -> MethodResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_data(data) -> None:
    """ValueError unless ``data`` has ``train``, ``val`` and ``test`` splits of (X, y) tensors."""
    for split in ("train", "val", "test"):
        pair = getattr(data, split, None)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(torch.is_tensor(t) for t in pair)):
            raise ValueError(f"data needs a .{split} split (X, y) of tensors: pass bmrs_pyro.data.load(...)")
        if pair[0].shape[0] == 0 or pair[0].shape[0] != pair[1].shape[0]:
            raise ValueError(f"data.{split} is empty or X and y differ in length")


def seed_all(seed: int) -> None:
    """Seed torch, Pyro, NumPy and ``random`` (Pyro's seeding covers all of them)."""
    pyro.set_rng_seed(seed)


# ---------------------------------------------------------------- the deterministic network


def make_deterministic(model: nn.Module) -> dict[str, MultiplicativeNoise]:
    """Bypass the noise of every noise layer: E[theta] fixed at 1, ``"mean"`` mode; masks still apply.

    Returns the noise layers by site. Raises ValueError if the model has none (nothing to prune).
    """
    layers = noise_modules(model)
    if not layers:
        raise ValueError("the model has no MultiplicativeNoise layer: the baselines prune the structures "
                         "those layers mark (build it from the zoo, bmrs_pyro.models)")
    for layer in layers.values():
        layer.set_posterior_mean(torch.ones(layer.num_structures))
    set_mode(model, "mean")
    return layers


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network's logits (``model.logits`` for a NoisyClassifier, else ``model(x)``)."""
    return model.logits(x) if hasattr(model, "logits") else model(x)


def accuracy(model: nn.Module, data: Pair, batch_size: int = 1024) -> float:
    """Share of ``data`` classified right, in eval mode (BatchNorm on running statistics);
    :func:`bmrs_pyro.evaluation.classify`, the evaluator ``evaluate`` uses too."""
    was_training = model.training
    model.eval()
    try:
        return classify(lambda x: logits(model, x), data, batch_size=batch_size)["accuracy"]
    finally:
        model.train(was_training)


def train_network(
    model: nn.Module,
    data: Pair,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    penalty: Optional[Callable[[], torch.Tensor]] = None,
    param_groups: Optional[list] = None,
) -> list[float]:
    """Train a deterministic network by Adam on the mean cross-entropy (+ ``penalty()``).

    The loop of :func:`bmrs_pyro.fit` (:func:`bmrs_pyro.infer.run_epoch`: batching, the fused
    Adam, the divergence check) on this loss. A fresh optimizer each call, so a round of an
    iterative method restarts its schedule. ``param_groups`` overrides the default single group
    of all trainable parameters. Returns the mean loss of every epoch.
    """
    check_int("epochs", epochs, minimum=0)
    params = param_groups if param_groups is not None else [p for p in model.parameters() if p.requires_grad]
    if epochs == 0 or not params:
        return []
    if not isinstance(params[0], dict):
        params = [{"params": params}]
    optimizer = adam([{"lr": lr, **group} for group in params])
    generator = torch.Generator().manual_seed(seed)

    def step_loss(x, y):
        loss = F.cross_entropy(logits(model, x), y)
        return loss + penalty() if penalty is not None else loss

    losses = []
    model.train()
    for epoch in range(epochs):
        values = run_epoch(step_loss, optimizer, iterate_batches(data, batch_size, shuffle=True, generator=generator),
                           name=lambda i, e=epoch: f"epoch {e}, step {i}")
        losses.append(sum(values) / len(values))
    model.eval()
    return losses


def snapshot(model: nn.Module) -> dict:
    """A copy of the state dict (weights, BatchNorm statistics and the noise layers' masks)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore(model: nn.Module, state: dict) -> None:
    """Load a :func:`snapshot` back."""
    model.load_state_dict(state)


# ---------------------------------------------------------------- masks and compression


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per noise site, a bool tensor: True for structures still in the network."""
    return {site: layer.mask.detach().cpu() > 0 for site, layer in noise_modules(model).items()}


def set_masks(model: nn.Module, keep: Mapping[str, torch.Tensor]) -> None:
    """Write ``keep`` (bool per structure) into the noise layers' masks."""
    layers = noise_modules(model)
    unknown = sorted(set(keep) - set(layers))
    if unknown:
        raise ValueError(f"masks name unknown noise sites {unknown}; sites: {list(layers)}")
    with torch.no_grad():
        for site, k in keep.items():
            layers[site].mask.copy_(torch.as_tensor(k).to(layers[site].mask))


def example_inputs(x: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a two-example batch for tracing (structure_map, count_parameters)."""
    return (x[:2],), {}


def links_of(model: nn.Module, x: torch.Tensor) -> dict[str, StructureLinks]:
    """:func:`bmrs_pyro.criteria.structure_map` traced on a batch of ``x``; every site needs a producer."""
    links = structure_map(model, example_inputs(x))
    missing = [site for site, link in links.items() if link.producer is None]
    if missing:
        raise ValueError(f"no Linear/Conv layer produces the structures of {missing}; the baselines need "
                         "Linear/Conv -> (norm) -> activation -> noise")
    return links


def compression(model: nn.Module, keep: Mapping[str, torch.Tensor], x: torch.Tensor) -> tuple[float, float]:
    """(structures removed %, parameters removed %) of ``model`` pruned to ``keep``."""
    kept, total = count_parameters(model, dict(keep), inputs=example_inputs(x))
    n = sum(int(k.numel()) for k in keep.values())
    removed = sum(int((~k.bool()).sum()) for k in keep.values())
    return 100.0 * removed / n, 100.0 * (1.0 - kept / total)


def total_parameters(model: nn.Module, x: torch.Tensor) -> int:
    """Parameters of ``model`` with every structure kept (as :func:`compression` counts them)."""
    ones = {site: torch.ones(layer.num_structures, dtype=torch.bool) for site, layer in noise_modules(model).items()}
    return count_parameters(model, ones, inputs=example_inputs(x))[1]


def make_point(model: nn.Module, data, *, step: Any = None, count_model: Optional[nn.Module] = None,
               eval_model: Optional[nn.Module] = None) -> CurvePoint:
    """Evaluate the masked ``model`` (test and validation) and count its compression.

    ``count_model`` (same architecture, deterministic) is counted instead when ``model``'s weights
    are not parameters (Bayesian weights); ``eval_model`` is evaluated instead of ``model``.
    """
    keep = get_masks(model)
    s, p = compression(count_model if count_model is not None else model, keep, data.train[0])
    target = eval_model if eval_model is not None else model
    return CurvePoint(structures_removed=s, parameters_removed=p, accuracy=accuracy(target, data.test),
                 val_accuracy=accuracy(target, data.val), step=step,
                 kept_per_layer={site: (int(k.sum()), int(k.numel())) for site, k in keep.items()},
                 removed=removed_indices(keep))


def removed_indices(keep: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """Per site, the indices of the structures that ``keep`` removes."""
    return {site: torch.nonzero(~torch.as_tensor(k).bool()).flatten().tolist() for site, k in keep.items()}


def remove_lowest(importance: Mapping[str, torch.Tensor], alive: Mapping[str, torch.Tensor],
                  counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Per site, remove the ``counts[site]`` least important structures still alive.

    Ties keep the lower index first (stable order). Returns the new keep masks.
    """
    keep = {}
    for site, imp in importance.items():
        k = alive[site].clone().bool()
        n = int(counts.get(site, 0))
        if n > 0:
            candidates = torch.nonzero(k).flatten()
            order = candidates[torch.sort(imp[candidates].to(torch.float64), stable=True).indices]
            k[order[:n]] = False
        keep[site] = k
    return keep


def per_layer_counts(alive: Mapping[str, torch.Tensor], fraction: float, min_keep: int = 1) -> dict[str, int]:
    """How many structures to remove per layer: ``floor(fraction * alive)``, leaving ``min_keep``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    counts = {}
    for site, a in alive.items():
        n_alive = int(a.sum())
        counts[site] = max(0, min(math.floor(fraction * n_alive + 1e-9), n_alive - min(min_keep, n_alive)))
    return counts


def incoming_weight_norm(links: Mapping[str, StructureLinks], p: float = 2.0,
                         weights: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Per site, the L``p`` norm of each structure's incoming weights (producer row or filter).

    ``weights`` (site -> weight tensor) replaces the producers' own weights (e.g. posterior means).
    The bias is not included.
    """
    return {site: weight_norm(weights[site] if weights is not None else link.producer.weight, p)
            for site, link in links.items()}


@torch.no_grad()
def mean_activation(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Per site, the mean |output| of each structure of its noise layer over ``x`` (and positions).

    The attention map with power p = 1 of Zhao, Jain & Zhao (2022), measured after the
    activation, in eval mode. Masked structures score 0.
    """
    def run() -> None:
        was_training = model.training
        model.eval()
        try:
            for start in range(0, x.shape[0], batch_size):
                logits(model, x[start:start + batch_size])
        finally:
            model.train(was_training)

    return mean_abs_activation(noise_modules(model), run)[0]


def last_within(points: Sequence[CurvePoint], baseline: float, tolerance: float) -> int:
    """Index of the last point before the first whose validation accuracy falls more than
    ``tolerance`` (accuracy points, i.e. percent) below ``baseline``; 0 if the first already does.
    """
    best = 0
    for i, p in enumerate(points):
        if p.val_accuracy is None:
            raise ValueError("last_within needs validation accuracies on the points")
        if 100.0 * (baseline - p.val_accuracy) > tolerance + 1e-9:
            break
        best = i
    return best


def build_deterministic(model_builder: ModelBuilder) -> nn.Module:
    """A fresh model from ``model_builder`` with its noise bypassed (:func:`make_deterministic`)."""
    model = model_builder()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model_builder() must return an nn.Module, got {type(model).__name__}")
    make_deterministic(model)
    return model


def clone(model: nn.Module) -> nn.Module:
    """A deep copy (noise layers keep their fixed E[theta] and masks)."""
    return copy.deepcopy(model)


__all__ = [
    "Budget",
    "MethodResult",
    "PruningMethod",
    "accuracy",
    "build_deterministic",
    "check_data",
    "clone",
    "compression",
    "example_inputs",
    "get_masks",
    "incoming_weight_norm",
    "last_within",
    "links_of",
    "logits",
    "make_deterministic",
    "make_point",
    "mean_activation",
    "per_layer_counts",
    "remove_lowest",
    "removed_indices",
    "restore",
    "seed_all",
    "set_masks",
    "snapshot",
    "total_parameters",
    "train_network",
]
