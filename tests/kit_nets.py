"""Test kit: small networks shared by the Jacobian / back-map tests (float64, non-zero biases).

Not a test module: helpers that several test modules use, so no test module imports another.
"""
from __future__ import annotations

import torch
from torch import nn

from linop.convert import from_torch

__all__ = ["perturb_bn", "RandomGraph", "ResidualNet", "equivalent_net", "reference_net", "residual_net",
           "sample_input"]


def perturb_bn(m: nn.Module, seed: int) -> nn.Module:
    """Random eval-mode BN statistics so that every bias (x_b) is non-zero."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            n = mod.num_features
            mod.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
            mod.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            mod.bias.data.copy_(0.3 * torch.randn(n, generator=g))
    return m.eval()


class RandomGraph(nn.Module):
    """A small random piecewise-linear architecture: strided convs, a residual sum, a channel
    concatenation, max pooling (argmax selection), average pooling, LeakyReLU/ReLU, FC."""

    def __init__(self, c: int, stride: int, pool: str, slope: float, cat: bool, k: int):
        super().__init__()
        self.conv0 = nn.Conv2d(2, c, k, padding=k // 2)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, stride=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.LeakyReLU(slope) if slope > 0 else nn.ReLU()
        self.cat = cat
        c2 = 2 * c if cat else c
        self.conv3 = nn.Conv2d(c2, c, 3, padding=1, stride=stride)
        self.pool = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(3, stride=2, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        a = self.act(self.bn0(self.conv0(x)))
        b = self.act(self.conv1(a))
        r = self.act(self.conv2(b) + a)  # residual sum
        if self.cat:
            r = torch.cat([r, b], dim=1)  # concatenation
        y = self.act(self.conv3(r))
        y = self.pool(y)
        return self.fc(torch.flatten(self.gap(y), 1))


def equivalent_net(module, shape, seed=0):
    torch.manual_seed(seed)
    return from_torch(perturb_bn(module, seed), shape, torch.float64)


def reference_net(name: str, shape, seed: int):
    """A reference model ("vgg7", "resnet20", "fixup") as a float64 equivalent network with
    randomised BN statistics (and non-trivial Fixup scalars), so every bias is non-zero."""
    torch.manual_seed(seed)
    if name == "vgg7":
        from models.vgg7 import vgg7

        return equivalent_net(vgg7(), shape, seed=seed)
    if name == "resnet20":
        from models.resnet20 import resnet20

        return equivalent_net(resnet20(), shape, seed=seed)
    from models.fixup_resnet20 import fixup_resnet20

    m = fixup_resnet20(zero_init=False)
    g = torch.Generator().manual_seed(seed + 1)
    for pname, p in m.named_parameters():
        if p.numel() == 1:  # Fixup scalar biases / multipliers: make them non-trivial
            p.data.copy_(0.1 * torch.randn(1, generator=g) + (1.0 if "scale" in pname else 0.0))
    return equivalent_net(m, shape, seed=seed)


def sample_input(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(net.input_shape, generator=g, dtype=torch.float64) - 0.3


class ResidualNet(nn.Module):
    """3 image channels, a residual block, a strided conv, BN biases, LeakyReLU, FC: periods
    below the image size (the sweep / memory-plan tests)."""

    def __init__(self, w: int = 6, n_out: int = 5):
        super().__init__()
        self.c0 = nn.Conv2d(3, w, 3, padding=1)
        self.bn = nn.BatchNorm2d(w)
        self.c1 = nn.Conv2d(w, w, 3, padding=1)
        self.c2 = nn.Conv2d(w, 2 * w, 3, padding=1, stride=2)
        self.act = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(2 * w * 4 * 4, n_out)

    def forward(self, x):
        a = self.act(self.bn(self.c0(x)))
        a = self.act(self.c1(a) + a)
        a = nn.functional.avg_pool2d(self.act(self.c2(a)), 2)
        return self.fc(torch.flatten(a, 1))


def residual_net(w: int = 6, n_out: int = 5):
    """``(net, x)``: :class:`ResidualNet` (seed 0, random BN statistics and biases) converted in
    float64 at 3×16×16, and a fixed point ``x`` with negative and positive pre-activations."""
    torch.manual_seed(0)
    m = ResidualNet(w, n_out).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.3, 0.3)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.3, 0.3)
    net = from_torch(m, (3, 16, 16), torch.float64)
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.3
    return net, x
