"""LeNet-5 with a noise layer on every convolution filter and hidden unit."""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from bmrs_pyro.nn import NoisyClassifier

from ._common import NoiseFactory, check_norm, as_pair, check_positive_int, norm_layers

_KERNEL = 5


def lenet_feature_size(input_size: Union[int, tuple[int, int]], padding: int) -> tuple[int, int]:
    """Spatial size (H, W) after LeNet-5's two (conv 5x5, max-pool 2) stages.

    Raises ValueError if a stage would leave no spatial extent.
    """
    size = as_pair("input_size", input_size)
    out = []
    for s in size:
        for _ in range(2):
            s = s + 2 * padding - (_KERNEL - 1)
            if s < 1:
                break
            s //= 2
        if s < 1:
            raise ValueError(
                f"input_size={size} is too small for LeNet-5 with padding={padding}: each stage is a "
                f"5x5 conv then a 2x2 max-pool; use padding=2 (needs inputs >= 4x4) or a larger input"
            )
        out.append(s)
    return out[0], out[1]


def _auto_padding(input_size: Union[int, tuple[int, int]]) -> int:
    # The classic unpadded layout when the input is big enough (28x28 -> 4x4, 32x32 -> 5x5);
    # "same" padding for small inputs such as the 8x8 digits (8 -> 4 -> 2).
    try:
        lenet_feature_size(input_size, 0)
        return 0
    except ValueError:
        return 2


def lenet5(
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: Union[int, tuple[int, int]] = 28,
    *,
    width: int = 1,
    padding: Optional[int] = None,
    norm: str = "none",
    noise: str = "example",
    low: float = -20.0,
    high: float = 0.0,
) -> NoisyClassifier:
    """LeNet-5 as in BMRS: conv(C, 6w, 5) relu noise maxpool2, conv(6w, 16w, 5) relu noise
    maxpool2, flatten, fc(-> 120w) relu noise, fc(120w -> 84w) relu noise, fc(84w -> classes).

    Structures: the 6w and 16w convolution filters (``channel_dim=1``) and the 120w and 84w
    hidden units (``channel_dim=-1``). The flatten size follows from ``input_size``.

    Args:
        input_size: H = W as an int, or (H, W).
        width: multiplies every layer width (the paper's ``C``).
        padding: zero padding of both convolutions. ``None`` (default) picks 0 when the input is
            large enough for the classic layout (it needs at least 16x16) and 2 otherwise, which
            keeps the spatial size through each conv, so 8x8 digits become 2x2 maps.
        norm: ``"none"`` (default) or ``"batch"``: a BatchNorm after every conv and hidden
            Linear, before its ReLU (the noise comes after the ReLU either way).
        noise, low, high: passed to every :class:`~bmrs_pyro.nn.MultiplicativeNoise`.

    Raises:
        ValueError: non-positive sizes, or an input too small for the chosen padding.
    """
    check_positive_int("in_channels", in_channels)
    check_positive_int("num_classes", num_classes)
    check_positive_int("width", width)
    if padding is None:
        padding = _auto_padding(input_size)
    elif isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be None or an int >= 0, got {padding!r}")
    h, w = lenet_feature_size(input_size, padding)
    check_norm(norm)
    make_noise = NoiseFactory(low=low, high=high, noise=noise)
    c1, c2, f1, f2 = 6 * width, 16 * width, 120 * width, 84 * width
    net = nn.Sequential(
        nn.Conv2d(in_channels, c1, _KERNEL, padding=padding),
        *norm_layers(norm, c1, conv=True),
        nn.ReLU(),
        make_noise(c1, channel_dim=1),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, _KERNEL, padding=padding),
        *norm_layers(norm, c2, conv=True),
        nn.ReLU(),
        make_noise(c2, channel_dim=1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * h * w, f1),
        *norm_layers(norm, f1, conv=False),
        nn.ReLU(),
        make_noise(f1),
        nn.Linear(f1, f2),
        *norm_layers(norm, f2, conv=False),
        nn.ReLU(),
        make_noise(f2),
        nn.Linear(f2, num_classes),
    )
    return NoisyClassifier(net, num_classes=num_classes)
