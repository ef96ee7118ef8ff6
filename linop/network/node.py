"""The node protocol of the equivalent network, and the input node.

A node kind is one class that owns every rule the engines need.  The engines (the forward
run, the activation-pattern collection, the geometry, the period schedule, the
compressed-window sweep, the VJP, the network Jacobian as an operator, the reverse pass) loop
over nodes and call these methods; none branches on the node's type.  To add a node kind,
subclass :class:`Node` (a dataclass) and implement the protocol its docstring lists.

A node with no ``inputs`` is a source: it reads the network's input (:class:`InputNode`).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import ClassVar, Sequence

import numpy as np
import torch

from ..operators.base import Operator
from .geometry import pixel_boxes, structural_boxes
from .reverse import ReverseOptions, StepReport

__all__ = ["Node", "InputNode", "image_shape"]


def image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` of an input of per-sample ``shape``; a non-image input is read as
    ``prod(shape)`` channels of a 1x1 image (every entry its own column group)."""
    s = tuple(int(v) for v in shape)
    return s if len(s) == 3 else (int(prod(s)), 1, 1)  # type: ignore[return-value]


@dataclass
class Node:
    """A node of the equivalent network.  ``inputs`` are names of earlier nodes.

    The protocol a node kind implements (the engines call nothing else):

    ``forward(xs, x_b)``
        The node's output for batched inputs ``xs`` (one tensor ``(N, *shape)`` per name in
        ``inputs``) and the network's bias vector ``x_b``.
    ``linearize(xs, x_b) -> Operator``
        Its Jacobian at the point ``xs`` (batches of one): an operator built from
        :mod:`linop.operators` that maps the stacked inputs — and ``x_b`` as the last part when
        ``reads_bias`` is True — to the output.  One input and no ``x_b``: a plain operator;
        otherwise a :class:`~linop.operators.composite.BlockRow` with one part per input.  Its
        ``apply`` is what the sweep applies to tangent batches and its ``apply_adjoint`` what the
        VJP applies to cotangents, so the fast paths and the operator are the same rules.
    ``geometry(boxes, in_shapes) -> (4, U) array``
        The support boxes of its units from its inputs' (see :mod:`linop.network.geometry`),
        x-independent.  The default applies the generic structural rule to :meth:`structure`.
    ``structure(in_shapes) -> Operator``
        An x-independent operator whose sparsity pattern contains that of every linearisation
        (only needed by the default :meth:`geometry`).
    ``tangent_cost(elementwise) -> float``
        The schedule's cost figure: cost of pushing one tangent through the node, in units of
        one multiply-add (default: ``elementwise`` per output unit).
    ``pattern(xs)``
        The x-dependent data of its linearisation (slopes, argmax indices) as a batched
        tensor, or None when the linearisation does not depend on x (the default).
    ``reverse(z_star, z_hat, a_hats, x_b, options)``
        The reverse step of seed 001 §3 (optional: only the reconstruction needs it).
    """

    name: str
    inputs: tuple[str, ...]
    out_shape: tuple[int, ...]
    source: str = ""  # where it came from in the torch model (module path / fx node), for messages

    #: whether :meth:`linearize`'s operator reads ``x_b`` (as its last part)
    reads_bias: ClassVar[bool] = False
    #: whether the node is piecewise linear through the origin (seed 000 §3.3, 'Premise')
    piecewise_linear: ClassVar[bool] = True

    # ------------------------------------------------------------------ evaluation
    def forward(self, xs: Sequence[torch.Tensor], x_b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} ({self.name}) does not implement forward")

    def pattern(self, xs: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The x-dependent data of the linearisation at batched inputs ``xs`` (None: none)."""
        return None

    # ------------------------------------------------------------------ linearisation
    def linearize(self, xs: Sequence[torch.Tensor], x_b: torch.Tensor) -> Operator:
        """The node's Jacobian at the point ``xs`` (one sample each, batch axis of 1)."""
        raise NotImplementedError(
            f"linearisation of node kind {type(self).__name__} ({self.name}) is not implemented: "
            f"implement Node.linearize (see linop.network.node)")

    def structure(self, in_shapes: Sequence[tuple[int, ...]]) -> Operator:
        """An x-independent operator containing every linearisation's sparsity pattern."""
        raise NotImplementedError(
            f"{type(self).__name__} ({self.name}) has no receptive-field rule: implement Node.geometry "
            f"or Node.structure (see linop.network.node)")

    def geometry(self, boxes: Sequence[np.ndarray], in_shapes: Sequence[tuple[int, ...]]) -> np.ndarray:
        """Support boxes ``(4, U)`` of the node's units from its inputs' boxes (x-independent)."""
        return structural_boxes(self.structure(in_shapes), boxes)

    def tangent_cost(self, elementwise: float) -> float:
        """Cost of one tangent through the node (multiply-adds; the schedule's cost model)."""
        return elementwise * prod(self.out_shape)

    # ------------------------------------------------------------------ reverse pass
    def reverse(self, z_star: torch.Tensor, z_hat: torch.Tensor, a_hats: Sequence[torch.Tensor],
                x_b: torch.Tensor, options: ReverseOptions) -> tuple[list[torch.Tensor], StepReport]:
        """Seed 001 §3: map the target ``z_star`` of this node's output (forward value ``z_hat``,
        inputs ``a_hats``) back to one target per input; returns ``(targets, report)``."""
        raise NotImplementedError(f"no reverse step for node {self.name!r} of type {type(self).__name__}")

    def _report(self) -> StepReport:
        return StepReport(self.name, type(self).__name__)

    # ------------------------------------------------------------------ description
    @property
    def detail(self) -> str:
        """A short description for summaries (operator, kind, bias slice)."""
        return ""


@dataclass
class InputNode(Node):
    """The image ``x`` (the network's only source)."""

    def forward(self, xs, x_b):
        return xs[0]

    def geometry(self, boxes, in_shapes):
        return pixel_boxes(*image_shape(self.out_shape))

    def tangent_cost(self, elementwise: float) -> float:
        return 0.0

