"""ResNet20 of seed 000, appendix D, Table D.3.

Conv0 (3x3, 32 channels) + BN + LeakyReLU, then 9 residual blocks in three stages of
32 / 64 / 96 channels (Conv1..Conv18); each block is ``conv-BN-LeakyReLU-conv-BN``, plus the
shortcut, then LeakyReLU.  At a stage change (Residual 3 and Residual 6) the first conv has
stride 2 and the shortcut is "avg-pool + pad": average pooling with window 1 and stride 2
(``nn.AvgPool2d(1, 2)``, i.e. a strided subsampling) followed by zero channels appended on the
channel axis (``F.pad``).  Global average pooling and FC ``96 -> num_classes`` close the net.

BN folds into the convs in the equivalent model (Eq. 7), so the convs carry no bias; the
paper's bias vector ``b'`` is the concatenation of the 19 folded BN shifts.

The paper states "20 Leaky ReLUs" but not their slope; its code base (TensorFlow official
models) uses ``tf.nn.leaky_relu`` whose default slope is 0.2, the default here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNet20", "BasicBlock", "resnet20", "RESNET20_STAGES", "PAPER_NEGATIVE_SLOPE"]

#: channels of the three stages (Table D.3)
RESNET20_STAGES = (32, 64, 96)
#: blocks per stage: 3 x 3 blocks x 2 convs + Conv0 = 19 convs, + FC = 20 layers
BLOCKS_PER_STAGE = 3
#: TensorFlow's ``leaky_relu`` default slope (the paper's code base; see module docstring)
PAPER_NEGATIVE_SLOPE = 0.2


class BasicBlock(nn.Module):
    """``act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is the identity, or at a stage change ``AvgPool2d(1, stride)`` followed by
    ``F.pad`` with ``planes - in_planes`` zero channels (Table D.3 "avg-pool+pad").
    """

    def __init__(self, in_planes: int, planes: int, stride: int, negative_slope: float) -> None:
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"BasicBlock: planes={planes} < in_planes={in_planes}; the zero-"
                             "channel shortcut can only add channels")
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.LeakyReLU(negative_slope)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.LeakyReLU(negative_slope)
        self.extra_channels = planes - in_planes
        # window 1, stride s: pure subsampling; Identity when the block keeps the shape
        self.shortcut = nn.AvgPool2d(1, stride) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = self.shortcut(x)
        if self.extra_channels:  # Python int fixed at construction: fx-traceable
            sc = F.pad(sc, (0, 0, 0, 0, 0, self.extra_channels))
        return self.act2(out + sc)


class ResNet20(nn.Module):
    """ResNet20 (Table D.3): ``conv0``/``bn0``/``act0``, ``layer1..3`` (3 ``BasicBlock`` each),
    ``gap``, ``flatten``, ``fc``.  Convs in execution order are the paper's Conv0..Conv18."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 negative_slope: float = PAPER_NEGATIVE_SLOPE) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"resnet20: num_classes={num_classes} and in_channels={in_channels} must be >= 1")
        if not 0.0 <= negative_slope < 1.0:
            raise ValueError(f"resnet20: negative_slope={negative_slope} must be in [0, 1) "
                             "(ReLU 0, LeakyReLU 0 < slope < 1; seed 000 Eq. C.2)")
        self.negative_slope = float(negative_slope)
        c0 = RESNET20_STAGES[0]
        self.conv0 = nn.Conv2d(in_channels, c0, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c0)
        self.act0 = nn.LeakyReLU(negative_slope)
        in_planes = c0
        for s, planes in enumerate(RESNET20_STAGES):
            blocks = []
            for b in range(BLOCKS_PER_STAGE):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, negative_slope))
                in_planes = planes
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=negative_slope, mode="fan_out",
                                        nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.bn0(self.conv0(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.gap(x)))


def resnet20(num_classes: int = 10, in_channels: int = 3,
             negative_slope: float = PAPER_NEGATIVE_SLOPE) -> ResNet20:
    """Build ResNet20 (seed 000 Table D.3).

    Parameters
    ----------
    num_classes : int
        Outputs of the FC layer.
    in_channels : int
        Image channels.
    negative_slope : float
        LeakyReLU slope gamma in [0, 1) of every activation (``0`` gives ReLU);
        default 0.2 (see module docstring).

    Returns
    -------
    ResNet20
    """
    return ResNet20(num_classes=num_classes, in_channels=in_channels,
                    negative_slope=negative_slope)
