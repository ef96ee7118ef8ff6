"""Elementwise activations: ReLU, LeakyReLU, PReLU (piecewise linear) and tanh / sigmoid.

At a point an activation is the diagonal of its slopes, ``Σ_l = diag(σ'(c_l))`` (seed 000
appendix C, Eq. C.9), with torch's convention at a kink (the negative side's slope at exactly
0); its reverse step is the inverse activation (seed 001 §3.4(a)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..operators.base import Operator
from ..operators.elementwise import LeakyReLUMask, PReLUMask, ReLUMask, SigmoidDerivative, TanhDerivative
from ..operators.structural import Identity
from .node import Node

__all__ = ["ActivationNode", "PIECEWISE_LINEAR"]

PIECEWISE_LINEAR = {"relu", "leaky_relu", "prelu", "identity"}


@dataclass
class ActivationNode(Node):
    """Elementwise activation.  ``kind`` in relu, leaky_relu, prelu, tanh, sigmoid, identity.

    ``negative_slope``: float (leaky_relu) or a per-channel tensor (prelu).
    """

    kind: str = "relu"
    negative_slope: Any = 0.0

    @property
    def piecewise_linear(self) -> bool:  # type: ignore[override]
        return self.kind in PIECEWISE_LINEAR

    @property
    def detail(self) -> str:
        return self.kind

    def _slope_tensor(self, like: torch.Tensor) -> torch.Tensor:
        g = self.negative_slope
        if isinstance(g, torch.Tensor):
            g = g.to(device=like.device, dtype=like.dtype)
            if g.numel() > 1:  # per-channel PReLU
                g = g.reshape((1, -1) + (1,) * (like.dim() - 2))
        return g

    def forward(self, xs, x_b):
        x = xs[0]
        if self.kind == "relu":
            return torch.relu(x)
        if self.kind in ("leaky_relu", "prelu"):
            return torch.where(x >= 0, x, x * self._slope_tensor(x))
        if self.kind == "tanh":
            return torch.tanh(x)
        if self.kind == "sigmoid":
            return torch.sigmoid(x)
        if self.kind == "identity":
            return x
        raise ValueError(f"unknown activation kind {self.kind!r} at node {self.name}")

    def slopes(self, x: torch.Tensor) -> torch.Tensor:
        """Diagonal of dσ/dc at pre-activation ``x`` (Σ of seed 000 appendix C).

        At c = 0 exactly the slope of the *negative* side is used (0 for ReLU, γ for
        LeakyReLU/PReLU), torch autograd's convention (its backward tests ``c > 0``) and
        that of ``linop.operators.elementwise``; the exact identity holds either way because
        the unit's value is 0 there."""
        if self.kind == "relu":
            return (x > 0).to(x.dtype)
        if self.kind in ("leaky_relu", "prelu"):
            one = torch.ones_like(x)
            return torch.where(x > 0, one, one * self._slope_tensor(x))
        if self.kind == "tanh":
            return 1 - torch.tanh(x) ** 2
        if self.kind == "sigmoid":
            s = torch.sigmoid(x)
            return s * (1 - s)
        if self.kind == "identity":
            return torch.ones_like(x)
        raise ValueError(f"unknown activation kind {self.kind!r} at node {self.name}")

    def pattern(self, xs):
        """The slopes at the batched pre-activation (Σ of seed 000 appendix C)."""
        return self.slopes(xs[0])

    def linearize(self, xs, x_b) -> Operator:
        """``Σ`` at the point: the slope mask of the kind (:class:`ReLUMask`,
        :class:`LeakyReLUMask`, :class:`PReLUMask`) or the derivative diagonal of a smooth one."""
        x = xs[0]
        shape = tuple(self.out_shape)
        if self.kind == "identity":
            return Identity(shape, dtype=x.dtype)
        make = _MASKS.get(self.kind)
        if make is None:
            raise ValueError(f"unknown activation kind {self.kind!r} at node {self.name}")
        return make(self, x, shape)

    def geometry(self, boxes, in_shapes):
        return boxes[0]  # elementwise: each unit reads its own input unit

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """Inverse activation (seed 001 §3.4(a)); clipped entries are counted in the report."""
        from ..reverse import steps

        report = self._report()
        z, clipped = steps.inverse_activation(
            z_star, self.kind, self.negative_slope, clip_margin=options.clip_margin, relu=options.relu,
            a_hat=z_hat, z_hat=a_hats[0], keep_unchanged=options.keep_unchanged, return_clipped=True,
        )
        report.method = f"inverse {self.kind}" + (f" ({options.relu})" if self.kind == "relu" else "")
        report.n_clipped = clipped.cpu().numpy()
        return [z], report


def _prelu_weight(node: ActivationNode) -> torch.Tensor:
    g = node.negative_slope
    return g if isinstance(g, torch.Tensor) else torch.tensor([float(g)])


# kind -> the linearisation (diagonal operator) at one sample x of shape ``shape``
_MASKS = {
    "relu": lambda n, x, shape: ReLUMask(x, shape=shape),
    "leaky_relu": lambda n, x, shape: (LeakyReLUMask(x, float(n.negative_slope), shape=shape)
                                       if not isinstance(n.negative_slope, torch.Tensor)
                                       else PReLUMask(x, n.negative_slope, shape=shape)),
    "prelu": lambda n, x, shape: PReLUMask(x, _prelu_weight(n), shape=shape),
    "tanh": lambda n, x, shape: TanhDerivative(x, shape=shape),
    "sigmoid": lambda n, x, shape: SigmoidDerivative(x, shape=shape),
}
