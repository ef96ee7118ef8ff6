"""ResNet-18 / ResNet-34 (He et al. 2016), torchvision's definition: 7x7 stride-2 stem, 3x3
stride-2 max pool, four stages of basic blocks (1x1 conv + BN projection shortcut when the
shape changes), global average pool, FC.  ``width`` scales every channel count."""
from __future__ import annotations

import torch
from torch import nn

from ._common import ch, conv_bn

__all__ = ["BasicBlock", "ResNet", "resnet18", "resnet34"]


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, i: int, o: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(i, o, 3, stride)
        self.conv2 = conv_bn(o, o, 3, 1, act=None)
        self.downsample = (conv_bn(i, o, 1, stride, 0, act=None) if stride != 1 or i != o
                           else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class ResNet(nn.Module):
    """torchvision's ResNet with basic blocks; ``layers`` blocks per stage."""

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int = 1000,
                 width: float = 1.0, in_channels: int = 3):
        super().__init__()
        w = [ch(c, width) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w[0], 7, 2, 3, bias=False),
                                  nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        stages, i = [], w[0]
        for k, (n, o) in enumerate(zip(layers, w)):
            blocks = [BasicBlock(i, o, 1 if k == 0 else 2)] + [BasicBlock(o, o, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            i = o
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(i, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layers(self.stem(x))), 1))


def resnet18(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> ResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2)."""
    return ResNet((2, 2, 2, 2), num_classes, width, in_channels)


def resnet34(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> ResNet:
    """ResNet-34: basic blocks (3, 4, 6, 3)."""
    return ResNet((3, 4, 6, 3), num_classes, width, in_channels)
