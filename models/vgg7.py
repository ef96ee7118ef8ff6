"""VGG7 of seed 000, appendix D, Table D.1.

Conv0..Conv5 (3x3 'same', 32, 32, 64, 64, 96, 96 channels), each followed by BatchNorm and
ReLU; average pooling (window 3, stride 2) after ReLU1 and ReLU3; global average pooling
(``g_p``); one FC layer ``96 -> num_classes``.

The equivalent model of the paper folds every BN into its conv (Eq. 7): ``w' = gamma w /
sqrt(var + eps)``, ``b' = beta - gamma mu / sqrt(var + eps)``; that is why the convolutions here
carry no bias of their own (the BN shift *is* the bias ``b'_l`` of Table D.1).

Notes on choices the paper leaves open
--------------------------------------
* Pooling alignment (``pool_alignment``).  The paper's TensorFlow 'SAME' pooling maps
  32 -> 16 -> 8 by padding **bottom/right only** (TF puts the odd padding pixel after the
  image) and averaging over the in-image entries of each window.  Two alignments are offered:

  - ``"torch"`` (default, the shipped checkpoints): ``AvgPool2d(3, stride=2, padding=1)`` —
    windows start at −1, 1, …, 29 (one pixel up/left of TF's) and border windows count the
    zero padding (``count_include_pad=True``);
  - ``"tf"`` (the paper's): ``AvgPool2d(3, stride=2, padding=0, ceil_mode=True,
    count_include_pad=False)`` — windows start at 0, 2, …, 30, the last one overhangs the
    bottom/right edge, and every window averages its in-image entries only: exactly TF 'SAME'
    average pooling on even map sizes — every pooled map of VGG7 at 32×32 (32, 16) and 64×64
    (tested against a direct implementation of TF's rule).  On an odd size TF pads one pixel
    on *both* sides, which this module does not reproduce.

  Both are fixed linear operators (the identity of seed 000 Eq. 3 holds for either); a
  checkpoint records its alignment in its factory kwargs.
* The paper counts "7 ReLUs" (Table D.1 lists a ReLU6 next to the FC).  A ReLU on the logits
  would only clip negative scores; the logits here are left linear, which is what a classifier
  trained with softmax cross-entropy expects.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG7", "vgg7", "VGG7_CHANNELS", "POOL_ALIGNMENTS", "avg_pool_3x3_s2"]

#: out-channels of Conv0..Conv5 (Table D.1)
VGG7_CHANNELS = (32, 32, 64, 64, 96, 96)
#: pooling after these conv indices (Table D.1: "Avg-pool-2" after Conv1 and Conv3)
_POOL_AFTER = (1, 3)
#: the two pooling alignments (module docstring)
POOL_ALIGNMENTS = ("torch", "tf")


def avg_pool_3x3_s2(alignment: str = "torch") -> nn.AvgPool2d:
    """The window-3, stride-2 average pooling of Table D.1 in the given alignment."""
    if alignment == "torch":
        return nn.AvgPool2d(3, stride=2, padding=1)
    if alignment == "tf":  # TF 'SAME': pad after the image only, average the in-image entries
        return nn.AvgPool2d(3, stride=2, padding=0, ceil_mode=True, count_include_pad=False)
    raise ValueError(f"pool_alignment={alignment!r}: choose one of {POOL_ALIGNMENTS}")


class VGG7(nn.Module):
    """VGG7 (Table D.1). Modules are named ``conv{i}``, ``bn{i}``, ``relu{i}``, ``pool{i}``,
    ``gap``, ``flatten``, ``fc`` so that unit layers map to the paper's Conv0..Conv5, FC."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, pool_alignment: str = "torch") -> None:
        super().__init__()
        avg_pool_3x3_s2(pool_alignment)  # validates the choice before any layer is built
        self.pool_alignment = pool_alignment
        if num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"vgg7: num_classes={num_classes} and in_channels={in_channels} must be >= 1")
        c_in = in_channels
        for i, c in enumerate(VGG7_CHANNELS):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c, 3, padding=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c))
            setattr(self, f"relu{i}", nn.ReLU())
            if i in _POOL_AFTER:
                setattr(self, f"pool{i}", avg_pool_3x3_s2(pool_alignment))
            c_in = c
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # unrolled (no Python control flow on tensors) so torch.fx sees a flat graph
        x = self.relu0(self.bn0(self.conv0(x)))
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool1(x)
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.pool3(x)
        x = self.relu4(self.bn4(self.conv4(x)))
        x = self.relu5(self.bn5(self.conv5(x)))
        x = self.flatten(self.gap(x))
        return self.fc(x)


def vgg7(num_classes: int = 10, in_channels: int = 3, pool_alignment: str = "torch") -> VGG7:
    """Build VGG7 (seed 000 Table D.1) for ``num_classes`` classes.

    Parameters
    ----------
    num_classes : int
        Outputs of the FC layer (10 for CIFAR-10 / digits, 100 for CIFAR-100).
    in_channels : int
        Image channels (3 for CIFAR and ``digits32``).
    pool_alignment : ``"torch"`` (default) or ``"tf"`` (seed 000's TensorFlow 'SAME'); see
        the module docstring.

    Returns
    -------
    VGG7
        Untrained model (Kaiming-normal convs, PyTorch-default BN and FC).
    """
    return VGG7(num_classes=num_classes, in_channels=in_channels, pool_alignment=pool_alignment)
