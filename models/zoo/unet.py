"""Small U-Net style encoder-decoders (Ronneberger et al. 2015): two levels of conv-BN-ReLU
encoders with 2x2 max pools, a bottleneck, and decoders that upsample and concatenate the
skip connection.  There is no torchvision U-Net; this one exists to exercise upsampling +
concatenation, with the decoder's upsampling chosen by ``up``:

* ``"bilinear"``  — ``nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)``
* ``"nearest"``   — ``nn.Upsample(scale_factor=2)`` (nearest)
* ``"bicubic"``   — ``F.interpolate(scale_factor=2, mode="bicubic", align_corners=False)``
* ``"transpose"`` — ``ConvTranspose2d`` (2x2 stride 2; 3x3 stride 2 with output_padding 1)

Channels ``(32, 64, 128)·width``; the output has ``num_classes`` channels per pixel.  Inputs
need a side divisible by 4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ch, conv_bn

__all__ = ["UNet", "UP_MODES", "unet"]

UP_MODES = ("bilinear", "nearest", "bicubic", "transpose")


class _Interp(nn.Module):
    """``F.interpolate(x, scale_factor=2, mode=...)`` (the functional form, for the tracer)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode=self.mode, align_corners=False)


class UNet(nn.Module):
    """Two-level U-Net (see the module docstring)."""

    def __init__(self, up: str = "bilinear", num_classes: int = 2, width: float = 1.0,
                 in_channels: int = 3):
        super().__init__()
        if up not in UP_MODES:
            raise ValueError(f"UNet: up must be one of {UP_MODES}, got {up!r}")
        c = [ch(v, width) for v in (32, 64, 128)]
        self.e0 = nn.Sequential(conv_bn(in_channels, c[0]), conv_bn(c[0], c[0]))
        self.pool = nn.MaxPool2d(2)
        self.e1 = conv_bn(c[0], c[1])
        self.mid = nn.Sequential(nn.MaxPool2d(2), conv_bn(c[1], c[2]), conv_bn(c[2], c[2]))
        if up == "transpose":
            self.up1: nn.Module = nn.ConvTranspose2d(c[2], c[2], 2, 2)
            self.up0: nn.Module = nn.ConvTranspose2d(c[1], c[1], 3, 2, 1, output_padding=1)
        elif up == "bicubic":
            self.up1 = self.up0 = _Interp("bicubic")
        else:
            mode = {"mode": "bilinear", "align_corners": True} if up == "bilinear" else {}
            self.up1 = self.up0 = nn.Upsample(scale_factor=2, **mode)
        self.d1 = conv_bn(c[2] + c[1], c[1])
        self.d0 = nn.Sequential(conv_bn(c[1] + c[0], c[0]), nn.Conv2d(c[0], num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.e0(x)
        s1 = self.e1(self.pool(s0))
        y = self.d1(torch.cat([self.up1(self.mid(s1)), s1], 1))
        return self.d0(torch.cat([self.up0(y), s0], 1))


def unet(up: str = "bilinear", num_classes: int = 2, width: float = 1.0, in_channels: int = 3) -> UNet:
    """A two-level U-Net whose decoder upsamples with ``up``."""
    return UNet(up, num_classes, width, in_channels)
