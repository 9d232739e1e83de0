"""CIFAR-style ResNet (He et al. 2016, depth 6n+2) with noise on the prunable block channels.

Where the noise goes, and why. In a basic block ``relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x))``
the output channels of ``conv2``/``bn2`` are added to the skip path, so they are tied to every
other block of the stage: removing one would mean removing it from the whole residual stream.
The inner channels -- the filters of ``conv1`` with their ``bn1`` -- feed only ``conv2``, so they
can be removed on their own. Each block therefore has one noise layer, after ``bn1 -> relu``,
over those channels (``channel_dim=1``). The stem and the block outputs carry no noise.
"""

from __future__ import annotations

import torch
from torch import nn

from bmrs_pyro.nn import NoisyClassifier

from ._common import NoiseFactory, check_positive_int


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection; noise on the inner channels.

    The skip path is the identity when shape is kept, else a strided 1x1 convolution with
    BatchNorm (the "projection" shortcut).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, make_noise: NoiseFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.noise = make_noise(out_channels, channel_dim=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.noise(self.relu1(self.bn1(self.conv1(x))))
        return self.relu2(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    """The deterministic backbone: stem, three stages of basic blocks, global average pool, fc.

    Stage ``k`` (k = 0, 1, 2) has ``width * 2**k`` channels; stages 2 and 3 start with stride 2.
    """

    def __init__(
        self, blocks_per_stage: int, num_classes: int, in_channels: int, width: int, make_noise: NoiseFactory
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages = []
        channels = width
        for k in range(3):
            out = width * 2**k
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if (k > 0 and i == 0) else 1
                blocks.append(BasicBlock(channels, out, stride, make_noise))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"ResNet expects images (N, C, H, W), got shape {tuple(x.shape)}")
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(self.flatten(self.pool(h)))


def resnet(
    depth: int = 20,
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    width: int = 16,
    noise: str = "example",
    low: float = -20.0,
    high: float = 0.0,
) -> NoisyClassifier:
    """A CIFAR-style ResNet classifier of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110, ...).

    Every basic block has one noise layer over the output channels of its first convolution
    (after ``bn1 -> relu``): ``3n`` noise sites with ``width``, ``2 width`` and ``4 width``
    structures in the three stages. See the module docstring for why the block outputs (the
    residual stream) carry none. Any input size works (global average pooling).

    Raises:
        ValueError: ``depth`` not of the form 6n + 2 with n >= 1, or non-positive sizes.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}")
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    check_positive_int("width", width)
    make_noise = NoiseFactory(low=low, high=high, noise=noise)
    net = ResNet((depth - 2) // 6, num_classes, in_channels, width, make_noise)
    return NoisyClassifier(net, num_classes=num_classes)
