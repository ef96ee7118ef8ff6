"""VGG-11 / VGG-16 with and without BatchNorm and AlexNet, torchvision's definitions.

VGG: 3x3 convs (+ BN) + ReLU, five 2x2 max pools, ``AdaptiveAvgPool2d((7, 7))`` (at CIFAR size
1x1 -> 7x7: every window repeats the one input), classifier ``Linear-ReLU-Dropout`` x2 +
``Linear``.  AlexNet: 11/5/3 convs, 3x3 stride-2 max pools, ``AdaptiveAvgPool2d((6, 6))``.
``width`` scales the conv channels, ``hidden`` the classifier width (default 4096·width).

AlexNet needs inputs of at least 63x63 (its third max pool would empty a smaller map);
``small_input=True`` keeps its layers but drops the second max pool and gives the last one
stride 1 and padding 1 (32 -> 7 -> 3 -> 3 -> 3, then the uneven 3x3 -> 6x6 adaptive pool), for
CIFAR-size inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from ._common import ch

__all__ = ["VGG", "AlexNet", "VGG_CFGS", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "alexnet"]

VGG_CFGS = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """torchvision's VGG: ``features`` (config ``cfg``), 7x7 adaptive average pool, classifier."""

    def __init__(self, cfg: str, batch_norm: bool, num_classes: int = 1000, width: float = 1.0,
                 in_channels: int = 3, hidden: int | None = None, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        i = in_channels
        for v in VGG_CFGS[cfg]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            o = ch(v, width)
            layers.append(nn.Conv2d(i, o, 3, padding=1))
            layers += [nn.BatchNorm2d(o)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            i = o
        h = ch(4096, width) if hidden is None else int(hidden)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(i * 49, h), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(h, h), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(h, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
          hidden: int | None = None) -> VGG:
    """VGG-11 (config A) without BatchNorm."""
    return VGG("A", False, num_classes, width, in_channels, hidden)


def vgg11_bn(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
             hidden: int | None = None) -> VGG:
    """VGG-11 (config A) with BatchNorm after every conv."""
    return VGG("A", True, num_classes, width, in_channels, hidden)


def vgg16(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
          hidden: int | None = None) -> VGG:
    """VGG-16 (config D) without BatchNorm."""
    return VGG("D", False, num_classes, width, in_channels, hidden)


def vgg16_bn(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
             hidden: int | None = None) -> VGG:
    """VGG-16 (config D) with BatchNorm after every conv."""
    return VGG("D", True, num_classes, width, in_channels, hidden)


class AlexNet(nn.Module):
    """torchvision's AlexNet (see the module docstring for ``small_input``)."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
                 hidden: int | None = None, small_input: bool = False, dropout: float = 0.5):
        super().__init__()
        c = [ch(v, width) for v in (64, 192, 384, 256, 256)]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c[0], 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(True),
            *([] if small_input else [nn.MaxPool2d(3, 2)]),
            nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(True),
            nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(True),
            nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(True),
            nn.MaxPool2d(3, 1, 1) if small_input else nn.MaxPool2d(3, 2))
        h = ch(4096, width) if hidden is None else int(hidden)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(c[4] * 36, h), nn.ReLU(True),
            nn.Dropout(dropout), nn.Linear(h, h), nn.ReLU(True), nn.Linear(h, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def alexnet(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
            hidden: int | None = None, small_input: bool = False) -> AlexNet:
    """AlexNet (torchvision's one-GPU variant)."""
    return AlexNet(num_classes, width, in_channels, hidden, small_input)
