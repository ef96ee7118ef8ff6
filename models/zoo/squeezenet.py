"""SqueezeNet 1.0 and 1.1 (Iandola et al. 2016), torchvision's definitions: Fire modules
(1x1 squeeze, concatenated 1x1 / 3x3 expands), ceil-mode 3x3 max pools, and a final 1x1 conv +
ReLU + global average pool as the classifier.  ``width`` scales every channel count."""
from __future__ import annotations

import torch
from torch import nn

from ._common import ch

__all__ = ["Fire", "SqueezeNet", "squeezenet1_0", "squeezenet1_1"]


class Fire(nn.Module):
    """``cat(relu(e1(s)), relu(e3(s)))`` with ``s = relu(squeeze(x))``."""

    def __init__(self, i: int, s: int, e1: int, e3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(i, s, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(s, e1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(s, e3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


# (squeeze, expand) channels of the Fire modules, "M" a ceil-mode 3x3 stride-2 max pool
_FIRES = {
    "1_0": ((16, 64), (16, 64), (32, 128), "M", (32, 128), (48, 192), (48, 192), (64, 256), "M",
            (64, 256)),
    "1_1": ((16, 64), (16, 64), "M", (32, 128), (32, 128), "M", (48, 192), (48, 192), (64, 256),
            (64, 256)),
}


class SqueezeNet(nn.Module):
    """torchvision's SqueezeNet ``version`` "1_0" (7x7/96 stem) or "1_1" (3x3/64 stem)."""

    def __init__(self, version: str = "1_0", num_classes: int = 1000, width: float = 1.0,
                 in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        if version not in _FIRES:
            raise ValueError(f"SqueezeNet: version must be one of {sorted(_FIRES)}, got {version!r}")
        k, c0 = (7, 96) if version == "1_0" else (3, 64)
        i = ch(c0, width)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, i, k, 2), nn.ReLU(inplace=True),
                                   nn.MaxPool2d(3, 2, ceil_mode=True)]
        for f in _FIRES[version]:
            if f == "M":
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
                continue
            s, e = ch(f[0], width), ch(f[1], width)
            layers.append(Fire(i, s, e, e))
            i = 2 * e
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Conv2d(i, num_classes, 1),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet1_0(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> SqueezeNet:
    """SqueezeNet 1.0."""
    return SqueezeNet("1_0", num_classes, width, in_channels)


def squeezenet1_1(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> SqueezeNet:
    """SqueezeNet 1.1 (2.4x less computation than 1.0, same accuracy)."""
    return SqueezeNet("1_1", num_classes, width, in_channels)
