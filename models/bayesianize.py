"""Turn a plain ``nn.Sequential`` into a multiplicative-noise network."""

from __future__ import annotations

import copy
from typing import Union

from torch import nn

from bmrs_pyro.nn import MultiplicativeNoise, NoisyClassifier

from ._common import NoiseFactory

#: Layers whose output units/filters become structures.
WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
#: Normalisations that may sit between a weight layer and its activation (noise goes after them,
#: since a masked channel must be zero after the affine shift, not before it).
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm)
#: Element-wise activations after which the noise goes.
ACTIVATION_LAYERS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold,
)


def _flat_layers(module: nn.Sequential, path: str = "") -> list[nn.Module]:
    layers: list[nn.Module] = []
    for name, child in module.named_children():
        where = f"{path}{name}"
        if isinstance(child, MultiplicativeNoise):
            raise ValueError(f"layer {where} is already a MultiplicativeNoise: the network is already bayesianized")
        if isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward:
            layers += _flat_layers(child, f"{where}.")
        elif isinstance(child, WEIGHT_LAYERS) or not any(
            isinstance(m, WEIGHT_LAYERS + (MultiplicativeNoise,)) for m in child.modules()
        ):
            layers.append(child)
        else:
            raise ValueError(
                f"layer {where} ({type(child).__name__}) holds Linear/Conv layers inside a custom module; "
                "bayesianize only sees the layers of (nested) nn.Sequential containers. Put "
                "MultiplicativeNoise layers in such blocks by hand (see bmrs_pyro.models.resnet)."
            )
    return layers


def _structures(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.out_features, -1
    return layer.out_channels, 1


def bayesianize(
    module: nn.Sequential,
    *,
    low: float = -20.0,
    high: float = 0.0,
    noise: str = "example",
    classifier: bool = False,
) -> Union[nn.Sequential, NoisyClassifier]:
    """A copy of a plain ``nn.Sequential`` with a noise layer on every hidden Linear/Conv output.

    For every ``nn.Linear`` and convolution except the last one (the output layer), a
    :class:`~bmrs_pyro.nn.MultiplicativeNoise` over its output units (``channel_dim=-1``) or
    filters (``channel_dim=1``) is inserted

    * after the activation that follows it (``Linear -> act -> noise``),
    * after a normalisation and then an activation (``conv -> BN -> act -> noise``),
    * right after it, or after its normalisation, when no element-wise activation follows
      directly (e.g. ``Linear -> Dropout -> ReLU`` gets ``Linear -> noise -> Dropout -> ReLU``).

    Nested plain ``nn.Sequential`` containers are flattened: the result is one flat Sequential
    whose layers are numbered afresh. The input is not modified (its layers are deep-copied).

    Args:
        module: the network, x -> logits.
        low, high, noise: passed to every noise layer.
        classifier: if True, return ``NoisyClassifier(result)`` ready for SVI.

    Raises:
        ValueError: not an ``nn.Sequential``; fewer than two Linear/Conv layers (nothing would be
        prunable); a custom block containing Linear/Conv layers; noise layers already present.
    """
    if not isinstance(module, nn.Sequential):
        raise ValueError(
            f"bayesianize takes an nn.Sequential, got {type(module).__name__}; for other "
            "architectures place MultiplicativeNoise layers by hand"
        )
    make_noise = NoiseFactory(low=low, high=high, noise=noise)
    layers = [copy.deepcopy(layer) for layer in _flat_layers(module)]
    weights = [i for i, layer in enumerate(layers) if isinstance(layer, WEIGHT_LAYERS)]
    if len(weights) < 2:
        raise ValueError(
            f"bayesianize needs at least two Linear/Conv layers (the last is the output layer and gets "
            f"no noise), found {len(weights)}"
        )
    insert_after: dict[int, tuple[int, int]] = {}
    for i in weights[:-1]:
        j = i
        if j + 1 < len(layers) and isinstance(layers[j + 1], NORM_LAYERS):
            j += 1
        if j + 1 < len(layers) and isinstance(layers[j + 1], ACTIVATION_LAYERS):
            j += 1
        insert_after[j] = _structures(layers[i])
    out: list[nn.Module] = []
    for j, layer in enumerate(layers):
        out.append(layer)
        if j in insert_after:
            num, channel_dim = insert_after[j]
            out.append(make_noise(num, channel_dim=channel_dim))
    seq = nn.Sequential(*out)
    if classifier:
        last = layers[weights[-1]]
        return NoisyClassifier(seq, num_classes=_structures(last)[0])
    return seq
