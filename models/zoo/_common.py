"""Shared pieces of the zoo architectures: channel widths and conv-BN-ReLU blocks."""
from __future__ import annotations

from torch import nn

__all__ = ["ch", "conv_bn"]


def ch(c: int, width: float, multiple: int = 1) -> int:
    """``c`` channels scaled by the width multiplier, rounded to a multiple (at least one)."""
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    return max(multiple, int(round(c * width / multiple)) * multiple)


def conv_bn(i: int, o: int, k: int = 3, s: int = 1, p: int | None = None, g: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """``Conv2d(bias=False) -> BatchNorm2d -> act`` (torchvision's ``Conv2dNormActivation``)."""
    p = (k - 1) // 2 if p is None else p
    layers = [nn.Conv2d(i, o, k, s, p, groups=g, bias=False), nn.BatchNorm2d(o)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)
