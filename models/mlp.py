"""Multilayer perceptron with a noise layer on every hidden unit."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from bmrs_pyro.nn import NoisyClassifier

from ._common import NoiseFactory, check_norm, check_positive_int, make_activation, norm_layers


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: Sequence[int] = (100, 100),
    activation: str = "tanh",
    *,
    norm: str = "none",
    noise: str = "example",
    low: float = -20.0,
    high: float = 0.0,
) -> NoisyClassifier:
    """An MLP classifier: Flatten, then ``Linear -> activation -> noise`` per hidden layer
    (``Linear -> BatchNorm1d -> activation -> noise`` with ``norm="batch"``), then
    ``Linear(hidden[-1], out_dim)``.

    The input is flattened first, so image batches (N, C, H, W) work with
    ``in_dim = C * H * W``. Each hidden unit is one structure (``channel_dim=-1``).

    Args:
        in_dim: number of input features after flattening.
        out_dim: number of classes.
        hidden: widths of the hidden layers (at least one: a network without hidden units has
            nothing to prune).
        activation: ``"tanh"``, ``"relu"``, ``"gelu"`` or ``"sigmoid"``.
        norm: ``"none"`` (default) or ``"batch"``.
        noise, low, high: passed to every :class:`~bmrs_pyro.nn.MultiplicativeNoise`.

    The BMRS reference MLP is ``mlp(in_dim, 10, hidden=(50,) * 6, activation="tanh")``.
    """
    check_positive_int("in_dim", in_dim)
    check_positive_int("out_dim", out_dim)
    hidden = tuple(hidden)
    if not hidden:
        raise ValueError("hidden must name at least one hidden layer width, e.g. hidden=(100,)")
    for width in hidden:
        check_positive_int("every hidden width", width)
    make_activation(activation)
    check_norm(norm)
    make_noise = NoiseFactory(low=low, high=high, noise=noise)
    layers: list[nn.Module] = [nn.Flatten()]
    previous = in_dim
    for width in hidden:
        layers += [nn.Linear(previous, width), *norm_layers(norm, width, conv=False), make_activation(activation),
                   make_noise(width)]
        previous = width
    layers.append(nn.Linear(previous, out_dim))
    return NoisyClassifier(nn.Sequential(*layers), num_classes=out_dim)
