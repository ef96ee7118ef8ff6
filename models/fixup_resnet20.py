"""ResNet20-Fixup of seed 000, appendix D, Table D.4 (Fixup: Zhang, Dauphin & Ma 2019).

No BatchNorm.  The stem is ``relu(conv0(x) + bias0)`` (Table D.4 "Conv0, B0, ReLU0").  Each of
the 9 residual blocks (Conv1..Conv18, stages of 32 / 64 / 96 channels) is::

    out = conv1(x + bias1a)                    # B(4k+1) before the first conv
    out = relu(out + bias1b)                   # B(4k+2) after it
    out = conv2(out + bias2a)                  # B(4k+3) before the second conv
    out = out * scale + bias2b                 # multiplier M, then B(4k+4)
    out = relu(out + shortcut(x + bias1a))

with ``bias1a, bias1b, bias2a, bias2b, scale`` scalar ``nn.Parameter`` s (shape ``(1,)``).  So
``b'`` holds 1 + 9 x 4 = 37 scalars, as in Table D.5 (``d_in = 32x32x3 + 37``); the equivalent
model folds each multiplier into its conv (``w' = w x M``, Table D.4).

The stage-change shortcut is, as in ResNet20 (Table D.3), ``AvgPool2d(1, 2)`` plus zero
channels (``F.pad``); following the Fixup reference implementation (the paper's code [34]) it
reads the block input *after* ``bias1a``.  That implementation also adds a scalar bias before
the FC (its ``bias2``, here ``bias_fc``); it feeds the FC layer, so -- like the FC's own bias --
it is not part of the 37-element ``b'`` of the conv layers.

Initialisation is Fixup's: first conv of each branch He-normal scaled by ``L^(-1/2)``
(``L = 9`` blocks, ``m = 2`` layers per branch), second conv and FC zero, scalars 0 / 1.
``zero_init=False`` draws every weight at random instead (useful for exactness tests of an
untrained model, where zero branches would make residual paths trivial).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FixupResNet20", "FixupBasicBlock", "fixup_resnet20"]

_STAGES = (32, 64, 96)
_BLOCKS_PER_STAGE = 3


def _scalar(value: float) -> nn.Parameter:
    return nn.Parameter(torch.full((1,), float(value)))


class FixupBasicBlock(nn.Module):
    """One Fixup residual block (see module docstring for the exact order)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"FixupBasicBlock: planes={planes} < in_planes={in_planes}")
        self.bias1a = _scalar(0.0)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bias1b = _scalar(0.0)
        self.relu1 = nn.ReLU()
        self.bias2a = _scalar(0.0)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.scale = _scalar(1.0)
        self.bias2b = _scalar(0.0)
        self.relu2 = nn.ReLU()
        self.extra_channels = planes - in_planes
        self.shortcut = nn.AvgPool2d(1, stride) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa = x + self.bias1a
        out = self.relu1(self.conv1(xa) + self.bias1b)
        out = self.conv2(out + self.bias2a)
        out = out * self.scale + self.bias2b
        if self.extra_channels:  # construction-time int: fx-traceable
            sc = F.pad(self.shortcut(xa), (0, 0, 0, 0, 0, self.extra_channels))
        else:
            sc = x
        return self.relu2(out + sc)


class FixupResNet20(nn.Module):
    """ResNet20-Fixup (Table D.4): ``conv0``, ``bias0``, ``relu0``, ``layer1..3``, ``gap``,
    ``flatten``, ``bias_fc``, ``fc``.  Convs in execution order are the paper's Conv0..Conv18."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 zero_init: bool = True) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"fixup_resnet20: num_classes={num_classes} and "
                             f"in_channels={in_channels} must be >= 1")
        c0 = _STAGES[0]
        self.conv0 = nn.Conv2d(in_channels, c0, 3, padding=1, bias=False)
        self.bias0 = _scalar(0.0)
        self.relu0 = nn.ReLU()
        in_planes = c0
        blocks_all = []
        for s, planes in enumerate(_STAGES):
            blocks = []
            for b in range(_BLOCKS_PER_STAGE):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(FixupBasicBlock(in_planes, planes, stride))
                in_planes = planes
            blocks_all += blocks
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.bias_fc = _scalar(0.0)
        self.fc = nn.Linear(in_planes, num_classes)

        n_blocks = len(blocks_all)
        nn.init.kaiming_normal_(self.conv0.weight, mode="fan_out", nonlinearity="relu")
        for blk in blocks_all:
            w = blk.conv1.weight
            # Fixup rule: He std times L^(-1/(2m-2)) with m = 2 layers per residual branch
            std = math.sqrt(2.0 / (w.shape[0] * w.shape[2] * w.shape[3])) * n_blocks ** -0.5
            nn.init.normal_(w, 0.0, std)
            if zero_init:
                nn.init.zeros_(blk.conv2.weight)
            else:
                nn.init.normal_(blk.conv2.weight, 0.0, std)
        if zero_init:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu0(self.conv0(x) + self.bias0)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.flatten(self.gap(x))
        return self.fc(x + self.bias_fc)


def fixup_resnet20(num_classes: int = 10, in_channels: int = 3,
                   zero_init: bool = True) -> FixupResNet20:
    """Build ResNet20-Fixup (seed 000 Table D.4).

    Parameters
    ----------
    num_classes : int
        Outputs of the FC layer.
    in_channels : int
        Image channels.
    zero_init : bool
        Fixup initialisation (second conv of each branch and the FC start at zero).  ``False``
        draws them at random (for tests on untrained models).

    Returns
    -------
    FixupResNet20
    """
    return FixupResNet20(num_classes=num_classes, in_channels=in_channels, zero_init=zero_init)
