"""ShuffleNet-V2 (Ma et al. 2018) and MobileNet-V2 (Sandler et al. 2018), torchvision's
definitions.

ShuffleNet-V2: stride-2 units run two branches on the whole input, stride-1 units split the
channels with ``x.chunk(2, dim=1)`` and run one; the halves are concatenated and shuffled with
torchvision's ``view(N, g, C/g, H, W)`` / ``transpose(1, 2)`` / ``view(N, C, H, W)``; the head
is ``x.mean([2, 3])`` + FC.  ``width`` scales the stage widths (rounded to even numbers, as the
split needs).

MobileNet-V2: inverted residuals (1x1 expansion, 3x3 depthwise, linear 1x1 projection, the
residual sum when the shape allows), ReLU6 throughout, channels rounded to multiples of
``round_nearest`` (8) like torchvision, a 1280-channel last conv (kept for widths < 1, as
torchvision does), global average pool, dropout + FC.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import ch, conv_bn

__all__ = ["ShuffleNetV2", "MobileNetV2", "channel_shuffle", "shufflenet_v2", "mobilenet_v2"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's channel shuffle (view / transpose / view)."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNet-V2 ``InvertedResidual``."""

    def __init__(self, i: int, o: int, stride: int):
        super().__init__()
        b, self.stride = o // 2, stride
        if stride == 1 and i != 2 * b:
            raise ValueError(f"ShuffleUnit: stride 1 needs in channels {i} == out channels {o}")
        if stride == 2:
            self.branch1 = nn.Sequential(conv_bn(i, i, 3, 2, 1, g=i, act=None), conv_bn(i, b, 1, 1, 0))
        self.branch2 = nn.Sequential(conv_bn(i if stride == 2 else b, b, 1, 1, 0),
                                     conv_bn(b, b, 3, stride, 1, g=b, act=None), conv_bn(b, b, 1, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision's ShuffleNet-V2 1.0x (stages (4, 8, 4), widths 24-116-232-464-1024)."""

    def __init__(self, stages_repeats: tuple[int, int, int] = (4, 8, 4), num_classes: int = 1000,
                 width: float = 1.0, in_channels: int = 3):
        super().__init__()
        c = [ch(24, width)] + [ch(v, width, 2) for v in (116, 232, 464)] + [ch(1024, width)]
        self.conv1 = conv_bn(in_channels, c[0], 3, 2, 1)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, i = [], c[0]
        for n, o in zip(stages_repeats, c[1:4]):
            stages.append(nn.Sequential(ShuffleUnit(i, o, 2), *[ShuffleUnit(o, o, 1) for _ in range(n - 1)]))
            i = o
        self.stages = nn.Sequential(*stages)
        self.conv5 = conv_bn(i, c[4], 1, 1, 0)
        self.fc = nn.Linear(c[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


def shufflenet_v2(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
                  stages_repeats: tuple[int, int, int] = (4, 8, 4)) -> ShuffleNetV2:
    """ShuffleNet-V2 (torchvision's ``shufflenet_v2_x1_0`` at ``width=1``)."""
    return ShuffleNetV2(tuple(stages_repeats), num_classes, width, in_channels)


def _divisible(v: float, d: int) -> int:
    """torchvision's ``_make_divisible``: nearest multiple of ``d``, never 10 % below ``v``."""
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    """1x1 expansion (unless t = 1), 3x3 depthwise, linear 1x1 projection (+ x if it fits)."""

    def __init__(self, i: int, o: int, stride: int, t: int):
        super().__init__()
        h = int(round(i * t))
        self.use_res_connect = stride == 1 and i == o
        layers = [conv_bn(i, h, 1, act=nn.ReLU6)] if t != 1 else []
        layers += [conv_bn(h, h, 3, stride, g=h, act=nn.ReLU6), nn.Conv2d(h, o, 1, 1, 0, bias=False),
                   nn.BatchNorm2d(o)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNet-V2 (17 inverted residuals, settings t, c, n, s below)."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
                 round_nearest: int = 8, dropout: float = 0.2):
        super().__init__()
        ch(1, width)  # validates width
        i = _divisible(32 * width, round_nearest)
        last = _divisible(1280 * max(1.0, width), round_nearest)
        layers: list[nn.Module] = [conv_bn(in_channels, i, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in self.SETTING:
            o = _divisible(c * width, round_nearest)
            for k in range(n):
                layers.append(InvertedResidual(i, o, s if k == 0 else 1, t))
                i = o
        layers.append(conv_bn(i, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3,
                 round_nearest: int = 8) -> MobileNetV2:
    """MobileNet-V2 (torchvision's ``mobilenet_v2`` with ``width_mult=width``)."""
    return MobileNetV2(num_classes, width, in_channels, round_nearest)
