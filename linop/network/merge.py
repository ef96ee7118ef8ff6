"""Merging node kinds: the residual sum and the concatenation (seed 000 appendix C:
residual sums add Jacobians, concatenation stacks them)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..operators.base import Operator
from ..operators.composite import Concat, HStack
from ..operators.structural import Identity
from .geometry import union_boxes
from .node import Node

__all__ = ["AddNode", "CatNode"]


@dataclass
class AddNode(Node):
    def forward(self, xs, x_b):
        out = xs[0]
        for t in xs[1:]:
            out = out + t
        return out

    def linearize(self, xs, x_b) -> Operator:
        """``[I I … I]`` on the stacked inputs: residual sums add Jacobians."""
        return HStack([Identity(self.out_shape, dtype=xs[0].dtype)] * len(self.inputs))

    def geometry(self, boxes, in_shapes):
        return union_boxes(boxes)

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """The MDP split ``a_i* = â_i + (z* − ẑ)/k``: the closest inputs whose sum is z*."""
        report = self._report()
        report.case, report.method = "MDP", "split"
        corr = (z_star - z_hat) / len(self.inputs)
        return [a + corr for a in a_hats], report


@dataclass
class CatNode(Node):
    dim: int = 1  # channel axis of the batched tensor

    def forward(self, xs, x_b):
        return torch.cat(list(xs), dim=self.dim)

    def linearize(self, xs, x_b) -> Operator:
        """The concatenation of the stacked inputs (evaluated by ``torch.cat``): concatenation
        stacks Jacobians."""
        return Concat([tuple(x.shape[1:]) for x in xs], axis=self.dim - 1, dtype=xs[0].dtype)

    def geometry(self, boxes, in_shapes):
        parts = [b.reshape((4,) + tuple(s)) for b, s in zip(boxes, in_shapes)]
        return np.concatenate(parts, axis=self.dim).reshape(4, -1)  # batch axis <-> box axis

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """Split the target along the concatenated axis."""
        report = self._report()
        report.method = "split"
        sizes = [a.shape[self.dim] for a in a_hats]
        return list(torch.split(z_star, sizes, dim=self.dim)), report
