"""The zoo (issue 13): the piecewise-linear torchvision-style CNNs of :mod:`models.zoo`,
converted and verified exactly in float64.

Each model gets random He-initialised weights and BatchNorm layers with random running
statistics (:func:`models.zoo.randomise`, eval mode, float64) and is checked by
:func:`kit_forms.check_network` (tolerances justified there): forward == torch (1e-12
relative), ``<[x; x_b], H> = c`` for every unit of every unit layer, and H rows ==
torch.func.jacrev rows (all sampled rows in one reverse pass) for sampled units of every unit
layer.

Profiles:

* default (CI): widths 1/8 of torchvision's (classifier hidden width 32), 32x32 inputs (the
  U-Nets 16x16), 3 autodiff-checked units per layer.  AlexNet runs with ``small_input=True``
  (torchvision's AlexNet needs >= 63x63).  DenseNet-121 has its full depth (6-12-24-16 dense
  layers, 121 unit layers) at growth rate 4; ShuffleNet-V2 and MobileNet-V2 their full depth.
* ``LINOP_ZOO_FULL=1``: widths 1/4 (hidden 64), 64x64 inputs (U-Nets 32x32), torchvision's
  AlexNet as is, 8 units per layer.
"""
from __future__ import annotations

import os

import pytest
import torch
from kit_forms import check_network
from torch import nn

from models.zoo import ZOO, randomise

pytestmark = pytest.mark.usefixtures("one_thread")

FULL = os.environ.get("LINOP_ZOO_FULL", "") == "1"
WIDTH = 0.25 if FULL else 0.125
HIDDEN = 64 if FULL else 32
SIZE = 64 if FULL else 32
UNET_SIZE = 32 if FULL else 16
N_UNITS = 8 if FULL else 3  # autodiff-checked units per layer

# the operator / node kind each model exists to exercise (it must appear in the network)
EXPECT = {
    "resnet18": "GlobalAvgPool2d", "resnet34": "AddNode",
    "vgg11": "AdaptiveAvgPool2d", "vgg11_bn": "AdaptiveAvgPool2d",
    "vgg16": "AdaptiveAvgPool2d", "vgg16_bn": "AdaptiveAvgPool2d",
    "alexnet": "AdaptiveAvgPool2d", "squeezenet1_0": "CatNode", "squeezenet1_1": "CatNode",
    "densenet121": "AvgPool2d", "shufflenet_v2": "ChannelShuffle", "mobilenet_v2": "AddNode",
    "unet_bilinear": "Upsample2d", "unet_nearest": "Upsample2d", "unet_bicubic": "Upsample2d",
    "unet_transpose": "ConvTranspose2d",
}


def zoo_case(name: str) -> tuple[dict, int]:
    """(factory kwargs, input side) of ``name`` in the active profile."""
    kw: dict = {"num_classes": 10, "width": WIDTH}
    if name.startswith(("vgg", "alexnet")):
        kw["hidden"] = HIDDEN
    if name == "alexnet" and not FULL:
        kw["small_input"] = True
    return kw, UNET_SIZE if name.startswith("unet") else SIZE


def test_expectations_cover_the_zoo():
    assert set(EXPECT) == set(ZOO)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_is_exact(name):
    kw, hw = zoo_case(name)
    torch.manual_seed(0)
    model = randomise(ZOO[name](**kw), seed=1)
    net = check_network(model, (3, hw, hw), n_units=N_UNITS)
    assert len(net.unit_layers) >= 3
    kinds = {type(getattr(n, "op", None) or n).__name__ for n in net.nodes}
    kinds |= {type(n).__name__ for n in net.nodes}
    assert EXPECT[name] in kinds, kinds


def test_zoo_depths_are_torchvisions():
    """The unit layers (convs + FCs) the converter finds are torchvision's counts: ResNet-18
    17 convs + 3 projections + FC, ResNet-34 33 + 3 + 1, VGG-11 8 + 3, VGG-16 13 + 3,
    DenseNet-121 1 + 2·58 + 3 transitions + FC, SqueezeNet 1 + 3·8 + 1 (+0 FC)."""
    from linop.convert import from_torch

    want = {"resnet18": 21, "resnet34": 37, "vgg11": 11, "vgg16_bn": 16, "densenet121": 121,
            "squeezenet1_1": 26, "squeezenet1_0": 26}
    for name, n in want.items():
        kw, hw = zoo_case(name)
        net = from_torch(randomise(ZOO[name](**kw)), (3, hw, hw))
        assert len(net.unit_layers) == n, (name, len(net.unit_layers))


def test_mobilenet_v2_relu6_breakpoints_enter_x_b():
    """Each ReLU6 module adds one scalar slice of ``x_b``, −6 (``relu6(c) = relu(c) −
    relu(c − 6)``; its zero bound adds none), and only ReLUs: the network is piecewise linear."""
    from linop.convert import from_torch
    from linop.network import ActivationNode

    model = randomise(ZOO["mobilenet_v2"](num_classes=10, width=WIDTH), seed=1)
    net = from_torch(model, (3, 32, 32))
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.ReLU6)]
    bp = {k: net.x_b[v].tolist() for k, v in net.bias_slices.items() if "breakpoint" in k}
    assert bp == {f"-{p}.breakpoint_hi": [-6.0] for p in paths}
    assert {n.kind for n in net.nodes if isinstance(n, ActivationNode)} == {"relu"}
