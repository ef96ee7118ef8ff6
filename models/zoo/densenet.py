"""DenseNet-121 (Huang et al. 2017), torchvision's definition: 7x7 stride-2 stem + BN + ReLU +
3x3 max pool, dense blocks of (6, 12, 24, 16) layers ``BN-ReLU-conv1x1(bn_size·k)-BN-ReLU-
conv3x3(k)`` whose outputs are concatenated to their input, transitions ``BN-ReLU-conv1x1
(halving)-avgpool 2x2``, final BN + ReLU, global average pool, FC.

``width`` scales the growth rate ``k = 32·width`` and the stem's 64 channels; the depth is
DenseNet-121's unless ``block_config`` says otherwise.  The smallest input is 32x32 (the map is
1x1 after the third transition).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ch

__all__ = ["DenseLayer", "DenseNet", "densenet121"]


class DenseLayer(nn.Module):
    """``cat([x, conv3x3(relu(bn(conv1x1(relu(bn(x))))))], 1)``."""

    def __init__(self, i: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(i), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(i, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.relu1(self.norm1(x)))
        return torch.cat([x, self.conv2(self.relu2(self.norm2(y)))], 1)


class DenseNet(nn.Module):
    """torchvision's DenseNet-BC."""

    def __init__(self, block_config: tuple[int, ...] = (6, 12, 24, 16), num_classes: int = 1000,
                 width: float = 1.0, in_channels: int = 3, growth_rate: int | None = None,
                 bn_size: int = 4):
        super().__init__()
        k = ch(32, width) if growth_rate is None else int(growth_rate)
        c = ch(64, width)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c),
                                   nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        for b, n in enumerate(block_config):
            for _ in range(n):
                layers.append(DenseLayer(c, k, bn_size))
                c += k
            if b != len(block_config) - 1:
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                           nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)]
                c //= 2
        layers.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(F.relu(self.features(x)), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def densenet121(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
                block_config: tuple[int, ...] = (6, 12, 24, 16)) -> DenseNet:
    """DenseNet-121 (growth rate 32·width, blocks 6-12-24-16)."""
    return DenseNet(tuple(block_config), num_classes, width, in_channels)
