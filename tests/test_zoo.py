"""The zoo: small-width versions of the piecewise-linear torchvision-style CNNs people have
(issue 13), converted and verified exactly in float64.

No torchvision build imports beside the pinned torch, so the architectures are defined here,
following torchvision's definitions at reduced width: random He init, BatchNorm with random
running statistics, eval mode (:func:`test_convert_ops.randomise`).  For each model
(:func:`test_convert_ops.verify`, tolerances justified there): forward == torch (1e-12
relative), ``<[x; x_b], H> = c`` for every unit of every unit layer, and H rows ==
torch.func.jacfwd rows for a sample of units of every unit layer.

Profiles: the default (CI) one uses widths /8 of torchvision's and 16×16 / 32×32 inputs;
``LINOP_ZOO_FULL=1`` doubles the widths, uses 32×32 / 64×64 inputs and samples more units
(minutes on 2 cores).

MobileNet-V2 is torchvision's inverted-residual network (ReLU6 throughout, converted by
:mod:`linop.convert.rules.breakpoint`: ``relu6(c) = relu(c) − relu(c − 6)``, the 6 a slice of
``x_b``).  ShuffleNet-V2 is torchvision's unit as written (``x.chunk(2, dim=1)`` and the view /
transpose / view channel shuffle).
"""
from __future__ import annotations

import os

import pytest
import torch
from test_convert_ops import (  # noqa: F401  (_one_thread: the autouse fixture)
    _one_thread,
    randomise,
    tv_channel_shuffle,
    verify,
)
from torch import nn

FULL = os.environ.get("LINOP_ZOO_FULL", "") == "1"
W = 2 if FULL else 1          # width multiplier over the CI profile
SMALL = 32 if FULL else 16    # input size of the nets that go down to 1x1 late
CIFAR = 64 if FULL else 32
N_UNITS = 8 if FULL else 3    # jacfwd-checked units per layer


def cbr(i, o, k=3, s=1, p=1, g=1, relu=True):
    layers = [nn.Conv2d(i, o, k, s, p, groups=g, bias=False), nn.BatchNorm2d(o)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))


# ---------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    def __init__(self, i, o, s):
        super().__init__()
        self.body = nn.Sequential(cbr(i, o, s=s), cbr(o, o, relu=False))
        self.down = cbr(i, o, 1, s, 0, relu=False) if s != 1 or i != o else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.down(x))


def resnet18():
    w = [8 * W, 16 * W, 32 * W, 64 * W]
    layers = [nn.Conv2d(3, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    i = w[0]
    for k, o in enumerate(w):
        layers += [BasicBlock(i, o, 1 if k == 0 else 2), BasicBlock(o, o, 1)]
        i = o
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(i, 10))


# ---------------------------------------------------------------------------- VGG-11 BN, AlexNet
def vgg11_bn():
    cfg = [8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"]
    layers, i = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(i, v * W, 3, padding=1), nn.BatchNorm2d(v * W), nn.ReLU(True)]
            i = v * W
    # torchvision's head: 1x1 -> 7x7 at CIFAR size (every window repeats the one input)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(),
                         nn.Linear(i * 49, 32 * W), nn.ReLU(True), nn.Dropout(),
                         nn.Linear(32 * W, 32 * W), nn.ReLU(True), nn.Dropout(),
                         nn.Linear(32 * W, 10))


def alexnet():
    """torchvision's AlexNet shape at CIFAR size: 32 -> 7 -> 3 -> 3 (its last max pool would
    empty a 1x1 map, so it pools 3 -> 3 with padding), then AdaptiveAvgPool2d((7, 7)) from
    3x3: uneven, overlapping windows."""
    c = [8 * W, 24 * W, 48 * W, 32 * W, 32 * W]
    f = nn.Sequential(
        nn.Conv2d(3, c[0], 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(True),
        nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(True),
        nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(True),
        nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 1, 1))
    return nn.Sequential(f, nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), nn.Dropout(),
                         nn.Linear(c[4] * 49, 32 * W), nn.ReLU(True), nn.Dropout(),
                         nn.Linear(32 * W, 32 * W), nn.ReLU(True), nn.Linear(32 * W, 10))


# ---------------------------------------------------------------------------- SqueezeNet 1.1
class Fire(nn.Module):
    def __init__(self, i, s, e):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(i, s, 1), nn.ReLU(True))
        self.e1 = nn.Sequential(nn.Conv2d(s, e, 1), nn.ReLU(True))
        self.e3 = nn.Sequential(nn.Conv2d(s, e, 3, padding=1), nn.ReLU(True))

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.e1(x), self.e3(x)], 1)


def squeezenet():
    w = 2 * W
    return nn.Sequential(
        nn.Conv2d(3, 8 * w, 3, 2), nn.ReLU(True), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(8 * w, 2 * w, 8 * w), Fire(16 * w, 2 * w, 8 * w), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(16 * w, 4 * w, 16 * w), nn.Dropout(), nn.Conv2d(32 * w, 10, 1), nn.ReLU(True),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())


# ---------------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    def __init__(self, i, growth):
        super().__init__()
        self.f = nn.Sequential(nn.BatchNorm2d(i), nn.ReLU(True), nn.Conv2d(i, 2 * growth, 1, bias=False),
                               nn.BatchNorm2d(2 * growth), nn.ReLU(True),
                               nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.f(x)], 1)


def densenet():
    g, c0 = 4 * W, 8 * W
    layers, c = [nn.Conv2d(3, c0, 3, padding=1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(True)], c0
    for block in range(2):
        for _ in range(3):
            layers.append(DenseLayer(c, g))
            c += g
        if block == 0:  # transition: BN-ReLU-conv1x1-avgpool
            layers += [nn.BatchNorm2d(c), nn.ReLU(True), nn.Conv2d(c, c // 2, 1, bias=False),
                       nn.AvgPool2d(2, 2)]
            c //= 2
    return nn.Sequential(*layers, nn.BatchNorm2d(c), nn.ReLU(True), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(c, 10))


# ---------------------------------------------------------------------------- ShuffleNet-V2
class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNet-V2 ``InvertedResidual``: stride 2, two branches of the whole
    input; stride 1, ``x.chunk(2, dim=1)`` and one branch; then concat and torchvision's
    view / transpose / view channel shuffle."""

    def __init__(self, i, o, stride):
        super().__init__()
        b, self.stride = o // 2, stride
        if stride == 2:
            self.b1 = nn.Sequential(cbr(i, i, 3, 2, 1, g=i, relu=False), cbr(i, b, 1, 1, 0))
        self.b2 = nn.Sequential(cbr(i if stride == 2 else b, b, 1, 1, 0),
                                cbr(b, b, 3, stride, 1, g=b, relu=False), cbr(b, b, 1, 1, 0))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.b2(x2)), dim=1)
        else:
            out = torch.cat((self.b1(x), self.b2(x)), dim=1)
        return tv_channel_shuffle(out, 2)


def shufflenet():
    c = [8 * W, 16 * W, 32 * W]
    return nn.Sequential(cbr(3, c[0], 3, 2, 1), nn.MaxPool2d(3, 2, 1),
                         ShuffleUnit(c[0], c[1], 2), ShuffleUnit(c[1], c[1], 1),
                         ShuffleUnit(c[1], c[2], 2), ShuffleUnit(c[2], c[2], 1),
                         cbr(c[2], 32 * W, 1, 1, 0), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32 * W, 10), nn.Dropout(0.2))


# ---------------------------------------------------------------------------- MobileNet-V2
def cbr6(i, o, k=3, s=1, g=1):
    """torchvision's ``Conv2dNormActivation`` with ReLU6 (MobileNet-V2's ConvBNReLU)."""
    return nn.Sequential(nn.Conv2d(i, o, k, s, (k - 1) // 2, groups=g, bias=False),
                         nn.BatchNorm2d(o), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """torchvision's MobileNet-V2 block: 1x1 expansion (unless t = 1), 3x3 depthwise, 1x1
    linear projection with BN; the residual sum when stride 1 and the widths agree."""

    def __init__(self, i, o, stride, t):
        super().__init__()
        h = i * t
        self.use_res_connect = stride == 1 and i == o
        layers = [cbr6(i, h, 1)] if t != 1 else []
        layers += [cbr6(h, h, 3, stride, g=h), nn.Conv2d(h, o, 1, 1, 0, bias=False),
                   nn.BatchNorm2d(o)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNet-V2 (its setting t, c, n, s: 17 inverted residuals) with widths
    /8 (×2 in the full profile)."""

    def __init__(self):
        super().__init__()
        setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                   [6, 160, 3, 2], [6, 320, 1, 1]]
        i = 4 * W
        layers = [cbr6(3, i, s=2)]
        for t, c, n, s in setting:
            o = max(2, c * W // 8)
            for k in range(n):
                layers.append(InvertedResidual(i, o, s if k == 0 else 1, t))
                i = o
        layers.append(cbr6(i, 32 * W, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32 * W, 10))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ---------------------------------------------------------------------------- U-Net
class UNet(nn.Module):
    """Two-level encoder-decoder: skip connections by concatenation; the decoder upsamples
    with bilinear ``nn.Upsample`` (``align_corners=True``, torchvision-segmentation style),
    nearest ``F.interpolate`` or a ``ConvTranspose2d``."""

    def __init__(self, up: str):
        super().__init__()
        c = [4 * W, 8 * W, 16 * W]
        self.e0, self.e1 = nn.Sequential(cbr(3, c[0]), cbr(c[0], c[0])), cbr(c[0], c[1])
        self.mid = nn.Sequential(nn.MaxPool2d(2), cbr(c[1], c[2]), cbr(c[2], c[2]))
        self.pool = nn.MaxPool2d(2)
        if up == "transpose":
            self.up1 = nn.ConvTranspose2d(c[2], c[2], 2, 2)
            self.up0 = nn.ConvTranspose2d(c[1], c[1], 3, 2, 1, output_padding=1)
        else:
            mode = {"mode": "bilinear", "align_corners": True} if up == "bilinear" else {}
            self.up1 = self.up0 = nn.Upsample(scale_factor=2, **mode)
        self.d1 = cbr(c[2] + c[1], c[1])
        self.d0 = nn.Sequential(cbr(c[1] + c[0], c[0]), nn.Conv2d(c[0], 2, 1))

    def forward(self, x):
        s0 = self.e0(x)
        s1 = self.e1(self.pool(s0))
        y = self.d1(torch.cat([self.up1(self.mid(s1)), s1], 1))
        return self.d0(torch.cat([self.up0(y), s0], 1))


# the op each model exists to exercise (its operator must appear in the network)
EXPECT = {"vgg11_bn": "AdaptiveAvgPool2d", "alexnet": "AdaptiveAvgPool2d",
          "shufflenet_v2": "ChannelShuffle", "unet_bilinear": "Upsample2d",
          "unet_nearest": "Upsample2d", "unet_transpose": "ConvTranspose2d",
          "resnet18": "GlobalAvgPool2d", "densenet": "AvgPool2d", "squeezenet1_1": "MaxPool2d",
          "mobilenet_v2": "AddNode"}

ZOO = {
    "resnet18": (resnet18, CIFAR), "vgg11_bn": (vgg11_bn, CIFAR),
    "alexnet": (alexnet, 32),  # CIFAR size in both profiles: its 3x3 -> 7x7 head is the point
    "squeezenet1_1": (squeezenet, CIFAR), "densenet": (densenet, SMALL),
    "shufflenet_v2": (shufflenet, CIFAR), "mobilenet_v2": (MobileNetV2, CIFAR),
    "unet_bilinear": (lambda: UNet("bilinear"), SMALL),
    "unet_nearest": (lambda: UNet("nearest"), SMALL),
    "unet_transpose": (lambda: UNet("transpose"), SMALL),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_is_exact(name):
    make, hw = ZOO[name]
    torch.manual_seed(0)
    model = randomise(make(), seed=1)
    net = verify(model, (3, hw, hw), n_units=N_UNITS)
    assert len(net.unit_layers) >= 3
    kinds = {type(getattr(n, "op", n)).__name__ for n in net.nodes}
    assert EXPECT[name] in kinds | {"MaxPool2d" if "MaxPoolNode" in kinds else ""}, kinds



def test_mobilenet_v2_relu6_breakpoints_enter_x_b():
    """Each ReLU6 module adds one scalar slice of ``x_b``, −6 (``relu6(c) = relu(c) −
    relu(c − 6)``; its zero bound adds none), and only ReLUs: the network is piecewise linear."""
    from linop.convert import from_torch
    from linop.network import ActivationNode

    model = randomise(MobileNetV2(), seed=1)
    net = from_torch(model, (3, 16, 16))
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    bp = {k: net.x_b[v].tolist() for k, v in net.bias_slices.items() if "breakpoint" in k}
    assert bp == {f"-{p}.breakpoint_hi": [-6.0] for p in paths}
    assert {n.kind for n in net.nodes if isinstance(n, ActivationNode)} == {"relu"}
