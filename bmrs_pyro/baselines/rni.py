"""Receding Neuron Importances (RNI): bounded BatchNorm scales as importances, one-shot pruning.

Suteu & Guo, "Regularizing Deep Neural Networks with Receding Neuron Importances" (arXiv
2204.06404, 2022). Each structure gets a bounded BatchNorm whose scale sigmoid(w_c) lies in
(0, 1) and is its importance; a regulariser pushes only the already unimportant scales down.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from ..pruner import keep_fraction
from .common import (
    Budget,
    MethodResult,
    PruningMethod,
    build_deterministic,
    links_of,
    make_point,
    restore,
    set_masks,
    snapshot,
    total_parameters,
    train_network,
)
from ..curves import CurvePoint, prune_and_measure, sweep, sweep_fractions


class _Bounded:
    """Bounded BatchNorm: ``sigmoid(w_c) * (x - mean_B) / sqrt(var_B + eps)``, no shift.

    Built on the affine-free torch BatchNorm (running statistics, eval mode as usual) with the
    logit ``w_c`` as the layer's only parameter, initialised N(0, 1) as in the paper.
    """

    logit: nn.Parameter

    def _init_logit(self, num_features: int) -> None:
        self.logit = nn.Parameter(torch.randn(num_features))

    def importance(self) -> torch.Tensor:
        """The channel importances s_c = sigmoid(w_c)."""
        return torch.sigmoid(self.logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # type: ignore[misc]
        shape = [1, -1] + [1] * (x.dim() - 2)
        return y * torch.sigmoid(self.logit).view(shape)


class BoundedBatchNorm1d(_Bounded, nn.BatchNorm1d):
    """Bounded BatchNorm over (N, C) or (N, C, L) inputs (hidden units of an MLP)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False)
        self._init_logit(num_features)


class BoundedBatchNorm2d(_Bounded, nn.BatchNorm2d):
    """Bounded BatchNorm over (N, C, H, W) inputs (convolution channels)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=False)
        self._init_logit(num_features)


BOUNDED_TYPES = (BoundedBatchNorm1d, BoundedBatchNorm2d)


class _RecedingTerm(torch.autograd.Function):
    """``u (1 - log u)`` with u = sigmoid(z), and its exact derivative.

    Autograd of the plain formula adds u'(1 - log u) and -u', which cancel to -u' log u: for large
    z the sum is rounding noise and can even come out negative, which Adam would turn into a
    full-size step the wrong way. The backward pass here uses the cancelled form
    u (1 - u) softplus(-z) = sigmoid(z) sigmoid(-z) softplus(-z), every factor accurate.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return torch.sigmoid(z) * (1.0 + F.softplus(-z))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return grad * torch.sigmoid(z) * torch.sigmoid(-z) * F.softplus(-z)


def rni_penalty(logits: torch.Tensor, lam: float = 1e-4, b: float = 3.0) -> torch.Tensor:
    """The RNI regulariser ``lam * sum_c u_c (1 - log u_c)``, ``u_c = sigmoid(w_c + b)``.

    Its derivative in w_c is ``-lam u_c (1 - u_c) log u_c >= 0``: it only pushes importances down,
    and the push vanishes for w_c -> +inf (u -> 1) and w_c -> -inf (u log u -> 0). The gradient
    is computed in that cancelled form, so it stays >= 0 and accurate far into both tails.
    """
    return lam * _RecedingTerm.apply(logits + b).sum()


def push_peak(b: float = 3.0) -> float:
    """The importance sigmoid(w*) at which the regulariser's downward push is largest.

    With u = sigmoid(w + b) the push is f(u) = -u (1 - u) log u; df/dw = 0 where
    (1 - 2u) log u + (1 - u) = 0, solved here by bisection on u in (0, 1/2). For b = 3 this is
    about 0.015, the value quoted by the authors.
    """
    lo, hi = 1e-6, 0.5 - 1e-12
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (1 - 2 * mid) * math.log(mid) + (1 - mid) < 0:
            lo = mid
        else:
            hi = mid
    u = 0.5 * (lo + hi)
    w = math.log(u / (1 - u)) - b
    return 1.0 / (1.0 + math.exp(-w))


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def _bounded_for(producer: nn.Module, num: int) -> nn.Module:
    if isinstance(producer, nn.Linear):
        return BoundedBatchNorm1d(num)
    if isinstance(producer, nn.Conv2d):
        return BoundedBatchNorm2d(num)
    raise ValueError(f"RNI supports Linear and Conv2d producers, got {type(producer).__name__}")


def add_bounded_batchnorm(model: nn.Module, x: torch.Tensor) -> dict[str, nn.Module]:
    """Give every noise layer's structures a bounded BatchNorm right after their producer.

    An ordinary BatchNorm already there is replaced by a bounded one; otherwise the producer
    ``P`` becomes ``nn.Sequential(P, bounded BN)``. Returns ``{site: bounded BN}``.
    """
    links = links_of(model, x)
    bounded = {}
    for site, link in links.items():
        num = link.layer.num_structures
        bn = _bounded_for(link.producer, num)
        if link.norms:
            name, norm = link.norms[-1]  # nearest the producer
            _set_child(model, name, bn)
        else:
            _set_child(model, link.producer_name, nn.Sequential(link.producer, bn))
        bounded[site] = bn
    return bounded


def to_plain_batchnorm(model: nn.Module) -> int:
    """Replace every bounded BatchNorm by the ordinary affine BatchNorm computing the same
    function (weight = sigmoid(w_c), bias = 0, same running statistics), so that the network
    can be compacted by :func:`bmrs_pyro.compact`. Returns how many were replaced.
    """
    replaced = []
    for name, module in model.named_modules():
        if isinstance(module, BOUNDED_TYPES):
            kind = nn.BatchNorm1d if isinstance(module, BoundedBatchNorm1d) else nn.BatchNorm2d
            plain = kind(module.num_features, eps=module.eps, momentum=module.momentum)
            with torch.no_grad():
                plain.weight.copy_(module.importance())
                plain.bias.zero_()
                plain.running_mean.copy_(module.running_mean)
                plain.running_var.copy_(module.running_var)
                plain.num_batches_tracked.copy_(module.num_batches_tracked)
            plain.train(module.training)
            replaced.append((name, plain))
    for name, plain in replaced:
        _set_child(model, name, plain)
    return len(replaced)


class RNI(PruningMethod):
    """Receding Neuron Importances (Suteu & Guo, arXiv 2204.06404, 2022).

    Every structure (hidden unit, conv channel) gets a bounded BatchNorm
    ``y = sigmoid(w_c) (x - mean_B) / sqrt(var_B + eps)`` (no shift, w_c ~ N(0, 1)) right after
    the Linear/Conv producing it (``BatchNorm1d`` form for MLP units); its importance is
    s_c = sigmoid(w_c). Training adds ``lam * sum_c u_c (1 - log u_c)``, u_c = sigmoid(w_c + b)
    (defaults lam = 1e-4, b = 3) to the mean cross-entropy. Pruning is one shot with ONE global
    quantile threshold on the importances, keeping at least ``min(3, width)`` channels per layer,
    then fine-tuning without the regulariser.

    Curve: the global quantile is swept (``fraction_step``); each point is pruned from the
    trained network and fine-tuned ``budget.finetune_epochs`` epochs (at ``budget.finetune_lr_factor``
    of the learning rate). Stopping point (the paper
    has none; our choice): prune every channel whose importance has receded below the peak of
    the regulariser's push, s_c < sigmoid(w*) (:func:`push_peak`, 0.0146 for b = 3). Past that
    point the push is still downward and the data gradient has not held the channel up, so it is
    on its way to zero; the threshold follows from b alone, with no tuning. ``stop_threshold``
    overrides it.

    Deviations from the paper: Adam (lr ``budget.lr`` or 3e-3; bounded-BN logits at
    ``bn_lr_factor`` = 10 times that, as the paper gives them 10x lr) for ``budget.epochs``
    epochs, no weight decay, instead of SGD with Nesterov momentum for 160 epochs with step decays;
    pruned channels are masked (the noise layer after the activation zeroes them), not cut out,
    and the parameters removed are those of the compacted network; the final model's bounded
    BatchNorms are turned into ordinary ones (weight = s_c, bias 0) so that
    :func:`bmrs_pyro.compact` can cut it.
    """

    name = "rni"
    cite = ("Suteu & Guo, 'Regularizing Deep Neural Networks with Receding Neuron Importances', "
            "arXiv:2204.06404, 2022")
    defaults = {"lam": 1e-4, "b": 3.0, "min_keep": 3, "bn_lr_factor": 10.0, "fraction_step": 0.1,
                "fractions": None, "stop_threshold": None}

    def _run(self, model_builder, data, seed: int, budget: Budget, options: dict) -> MethodResult:
        model = build_deterministic(model_builder)
        x_train = data.train[0]
        bounded = add_bounded_batchnorm(model, x_train)
        lam, b = float(options["lam"]), float(options["b"])
        lr = budget.lr_or(3e-3)
        logit_ids = {id(bn.logit) for bn in bounded.values()}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in logit_ids]
        groups = [{"params": others, "lr": lr},
                  {"params": [bn.logit for bn in bounded.values()], "lr": lr * float(options["bn_lr_factor"])}]

        def penalty() -> torch.Tensor:
            return sum(rni_penalty(bn.logit, lam, b) for bn in bounded.values())

        losses = train_network(model, data.train, epochs=budget.epochs, lr=lr, batch_size=budget.batch_size,
                               seed=seed, penalty=penalty, param_groups=groups)
        importance = {site: bn.importance().detach().clone() for site, bn in bounded.items()}
        unpruned = make_point(model, data, step=0.0)
        trained = snapshot(model)
        num_structures = sum(v.numel() for v in importance.values())
        min_keep = int(options["min_keep"])

        def prune(fraction: float) -> None:
            set_masks(model, keep_fraction(importance, fraction, scope="global", min_keep=min_keep))

        def finetune(_) -> None:
            train_network(model, data.train, epochs=budget.finetune_epochs, lr=budget.finetune_lr_factor * lr,
                          batch_size=budget.batch_size, seed=seed + 1)

        def measure(fraction: float, _, __) -> CurvePoint:
            return make_point(model, data, step=fraction)

        fractions = options["fractions"]
        fractions = sweep_fractions(num_structures, options["fraction_step"]) if fractions is None else sorted(
            float(f) for f in fractions)
        curve = sweep(fractions, prune, measure, lambda: restore(model, trained), finetune=finetune)
        threshold = push_peak(b) if options["stop_threshold"] is None else float(options["stop_threshold"])
        below = sum(int((s < threshold).sum()) for s in importance.values())
        stop = prune_and_measure(below / num_structures, prune, measure, finetune=finetune)
        total = total_parameters(model, x_train)  # as trained: one bounded-BN parameter per structure
        to_plain_batchnorm(model)
        return MethodResult(
            method=self.name, unpruned_accuracy=unpruned.accuracy, unpruned_val_accuracy=unpruned.val_accuracy,
            curve=curve, stop=stop, model=model, num_structures=num_structures, num_parameters=total,
            info={"importance": {k: v.tolist() for k, v in importance.items()}, "stop_threshold": threshold,
                  "receded": below, "train_loss": losses, "fractions": fractions},
        )


__all__ = [
    "BoundedBatchNorm1d",
    "BoundedBatchNorm2d",
    "RNI",
    "add_bounded_batchnorm",
    "push_peak",
    "rni_penalty",
    "to_plain_batchnorm",
]
