"""Pieces shared by the model builders: activations by name and the noise-layer factory."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bmrs_pyro.checks import positive_int as check_positive_int
from bmrs_pyro.nn import MultiplicativeNoise

#: Activations the builders accept by name.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


#: Normalisations the builders accept by name: ``"none"``, or ``"batch"`` for a BatchNorm between
#: each Linear/Conv and its activation (before the noise, so a removed structure is exactly zero).
NORMS = ("none", "batch")


def check_norm(norm: object) -> str:
    """``norm`` checked against :data:`NORMS` (ValueError naming the choices)."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {list(NORMS)}")
    return norm  # type: ignore[return-value]


def norm_layers(norm: str, num: int, *, conv: bool) -> list[nn.Module]:
    """``[]`` for ``"none"``, else the BatchNorm over ``num`` features (2d for convolutions)."""
    if check_norm(norm) == "none":
        return []
    return [nn.BatchNorm2d(num) if conv else nn.BatchNorm1d(num)]


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (one of :data:`ACTIVATIONS`)."""
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name.lower()]()


class NoiseFactory:
    """Builds :class:`MultiplicativeNoise` layers with one model's ``low``, ``high`` and ``noise``.

    Constructing the first layer validates the settings, so a builder fails before it allocates
    any weights.
    """

    def __init__(self, *, low: float, high: float, noise: str) -> None:
        self.low = low
        self.high = high
        self.noise = noise
        MultiplicativeNoise(1, low=low, high=high, noise=noise)  # raises ValueError on bad settings

    def __call__(self, num_structures: int, channel_dim: int = -1) -> MultiplicativeNoise:
        return MultiplicativeNoise(
            num_structures, channel_dim=channel_dim, low=self.low, high=self.high, noise=self.noise
        )


def as_pair(name: str, value: object) -> tuple[int, int]:
    """An image size given as ``int`` or ``(H, W)`` as a pair of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 2:
        pair = tuple(value)
    else:
        raise ValueError(f"{name} must be an int or a pair (H, W), got {value!r}")
    for v in pair:
        check_positive_int(name, v)
    return int(pair[0]), int(pair[1])
