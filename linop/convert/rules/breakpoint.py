"""Piecewise-linear activations with breakpoints off zero -> ReLU, sums and biases (issue 13).

An extension beyond seed 000, whose equivalent network (§3.1) has the activations ReLU /
LeakyReLU only.  A breakpoint is a bias: for a constant ``t`` (scalar, per-channel or
full-shape)

* ``max(c, t) = t + relu(c − t)``   (``clamp(min=t)``, ``torch.maximum(c, t)``),
* ``min(c, t) = c − relu(c − t)``   (``clamp(max=t)``, ``torch.minimum(c, t)``),
* ``clamp(c, lo, hi) = min(max(c, lo), hi)`` — torch's definition, so also right when
  ``lo > hi``; for ``lo <= hi`` it equals ``lo + relu(c − lo) − relu(c − hi)``, and
  ``relu6(c) = relu(c) − relu(c − 6)``, ``hardtanh(c; lo, hi)`` likewise,
* ``hardsigmoid(c) = clamp(c + 3, 0, 6) / 6`` (torch's order of operations).

Every constant enters the extended input ``x_b`` as a slice of its own (a
:class:`~linop.network.BiasNode`): ``−t`` before the ReLU as ``f"-{owner}.breakpoint_lo"`` /
``"…_hi"`` and ``+t`` after it (lower bounds only) as ``f"{owner}.breakpoint_lo"``, ``owner``
the module path for a module, else the fx node's name; a zero bound adds no slice
(``nn.ReLU6`` at ``features.1`` has the one slice ``-features.1.breakpoint_hi`` = −6).  On each
activation region every ReLU is then the identity or zero, so every later unit is an affine
function of ``[x; x_b]`` with no constant left over and seed 000's identity
``<[x; x_b], H> = c`` (appendix C) stays exact.  ``t`` may also be a tensor of the network
(``torch.maximum(a, b)``, ``clamp(x, min=y)``): the same formulas with ``AddNode`` /
``Scale(-1)`` in place of the biases.

Forward rounding: ``c − (c − t)`` is ``t`` up to one ulp of ``c`` (torch returns ``t``
exactly), a few ulps per breakpoint.

Forms: ``nn.ReLU6``, ``F.relu6``; ``nn.Hardtanh``, ``F.hardtanh``, ``F.hardtanh_``;
``nn.Hardsigmoid``, ``F.hardsigmoid``; ``torch.clamp`` / ``torch.clip`` / ``torch.clamp_min``
/ ``torch.clamp_max`` and the methods ``clamp``, ``clip``, ``clamp_min``, ``clamp_max`` (and
their in-place ``_`` forms); ``torch.maximum`` / ``torch.minimum`` and the methods.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...network import ActivationNode, AddNode
from ..context import Context, TensorValue
from ..errors import node_source
from ..registry import rule
from .activation import _check_inplace

# a bound: a network tensor, or (mode, float64 values) of a constant
Bound = TensorValue | tuple[str, torch.Tensor]


def _bound(ctx: Context, node: fx.Node, v: Any, x: TensorValue, what: str,
           lower: bool) -> Bound | None:
    """``v`` as a bound on ``x`` (None: no bound; an infinite scalar on its own side too)."""
    if v is None:
        return None
    t = ctx.env.get(v) if isinstance(v, fx.Node) else None
    if isinstance(t, TensorValue):
        if t.shape != x.shape:
            ctx.fail(node, f"{what}: a network tensor of shape {t.shape} against {x.shape} "
                     "(broadcasting is not supported)")
        return t
    c = ctx.const(v)
    if c is None:
        ctx.fail(node, f"{what}={v!r} is neither a number, a constant tensor nor a tensor of "
                 "the network", TypeError)
    mode, vals = ctx.channel_values(node, c, x.shape)
    if torch.isnan(vals).any():
        ctx.fail(node, f"{what} is NaN", ValueError)
    if mode == "scalar" and math.isinf(float(vals[0])) and (float(vals[0]) < 0) == lower:
        return None  # clamp(min=-inf) / clamp(max=+inf) bound nothing
    if torch.isinf(vals).any():
        ctx.fail(node, f"{what} has an infinite entry on the binding side; a bias of x_b "
                 "must be finite", ValueError)
    return mode, vals


def _is_zero(t: Bound) -> bool:
    return not isinstance(t, TensorValue) and bool(torch.all(t[1] == 0))


def _plus(ctx: Context, node: fx.Node, x: TensorValue, t: Bound, sign: float, bname: str,
          name: str) -> TensorValue:
    """``x + sign·t``: a BiasNode with its own slice ``bname`` (constant ``t``), else
    ``AddNode`` (with ``Scale(-1)`` for ``sign < 0``)."""
    from .arith import _negate

    if isinstance(t, TensorValue):
        if sign < 0:
            t = _negate(ctx, node, t)
        return ctx.add(AddNode(name, (x.name, t.name), x.shape, node_source(node)))
    mode, vals = t
    return ctx.bias(node, x, bname, sign * vals, x.shape, mode, name)


def _slice(node: fx.Node, tag: str) -> str:
    """Name of a breakpoint's slice of ``x_b``: after the module path (a module called twice
    keeps one slice, like a parameter) or the fx node."""
    owner = str(node.target) if node.op == "call_module" else node.name
    return f"{owner}.breakpoint_{tag}"


def _relu_minus(ctx: Context, node: fx.Node, x: TensorValue, t: Bound, tag: str,
                name: str | None = None) -> TensorValue:
    """``relu(x − t)``: the breakpoint ``t`` enters as the slice ``-{owner}.breakpoint_{tag}``."""
    base = f"{node.name}_{tag}"
    if not _is_zero(t):
        x = _plus(ctx, node, x, t, -1.0, "-" + _slice(node, tag), ctx.unique(f"{base}_shift"))
    return ctx.add(ActivationNode(name or ctx.unique(f"{base}_relu"), (x.name,), x.shape,
                                  node_source(node), kind="relu"))


def clamp_below(ctx: Context, node: fx.Node, x: TensorValue, t: Bound, tag: str,
                name: str) -> TensorValue:
    """``max(x, t) = t + relu(x − t)`` (``+t`` is the slice ``{owner}.breakpoint_{tag}``);
    ``relu(x)`` for ``t = 0``."""
    if _is_zero(t):
        return _relu_minus(ctx, node, x, t, tag, name)
    r = _relu_minus(ctx, node, x, t, tag)
    return _plus(ctx, node, r, t, 1.0, _slice(node, tag), name)


def clamp_above(ctx: Context, node: fx.Node, x: TensorValue, t: Bound, tag: str,
          name: str) -> TensorValue:
    """``min(x, t) = x − relu(x − t)``."""
    from .arith import _negate

    neg = _negate(ctx, node, _relu_minus(ctx, node, x, t, tag))
    return ctx.add(AddNode(name, (x.name, neg.name), x.shape, node_source(node)))


def clamp_value(ctx: Context, node: fx.Node, x: TensorValue, lo: Any, hi: Any,
                names: tuple[str, str] = ("min", "max")) -> TensorValue:
    """``min(max(x, lo), hi)`` (torch's clamp) with bounds given as fx arguments (None: no
    bound; ``names`` of the arguments, for messages)."""
    blo = _bound(ctx, node, lo, x, names[0], lower=True)
    bhi = _bound(ctx, node, hi, x, names[1], lower=False)
    if blo is None and bhi is None:
        ctx.fail(node, "clamp with neither min nor max", ValueError)
    if blo is not None:
        mid = node.name if bhi is None else ctx.unique(f"{node.name}_max")
        x = clamp_below(ctx, node, x, blo, "lo", mid)
    if bhi is not None:
        x = clamp_above(ctx, node, x, bhi, "hi", node.name)
    return x


def _input(ctx: Context, node: fx.Node) -> TensorValue:
    if node.op == "call_module":
        ctx.module_call(node)
    x = ctx.tensor(node, node.args[0])
    _check_inplace(ctx, node)
    return x


@rule(nn.Hardtanh)  # nn.ReLU6 is a Hardtanh(0, 6) that keeps its forward
def hardtanh_module(ctx: Context, node: fx.Node) -> TensorValue:
    m = ctx.module(node)
    return clamp_value(ctx, node, _input(ctx, node), float(m.min_val), float(m.max_val))


@rule(F.hardtanh, F.hardtanh_)
def hardtanh(ctx: Context, node: fx.Node) -> TensorValue:
    lo, hi = ctx.args(node, ["min_val", "max_val"], [-1.0, 1.0])
    return clamp_value(ctx, node, _input(ctx, node), lo, hi)


@rule(F.relu6)
def relu6(ctx: Context, node: fx.Node) -> TensorValue:
    return clamp_value(ctx, node, _input(ctx, node), 0.0, 6.0)


@rule(nn.Hardsigmoid, F.hardsigmoid)
def hardsigmoid(ctx: Context, node: fx.Node) -> TensorValue:
    """``clamp(x + 3, 0, 6) / 6``: the 3 is the slice ``{owner}.offset``, the 6 a breakpoint."""
    from ...operators.structural import Scale

    x = _input(ctx, node)
    owner = str(node.target) if node.op == "call_module" else node.name
    x = ctx.bias(node, x, f"{owner}.offset", torch.tensor([3.0]), x.shape, "scalar",
                 ctx.unique(f"{node.name}_offset"))
    x = clamp_value(ctx, node, x, 0.0, 6.0)
    return ctx.linear(node, x, Scale(x.shape, 1.0 / 6.0), name=ctx.unique(f"{node.name}_scale"))


@rule(torch.clamp, torch.clip, torch.clamp_, torch.clip_, "clamp", "clip", "clamp_", "clip_")
def clamp(ctx: Context, node: fx.Node) -> TensorValue:
    lo, hi = ctx.args(node, ["min", "max"], [None, None])
    return clamp_value(ctx, node, _input(ctx, node), lo, hi)


@rule(torch.clamp_min, torch.clamp_min_, "clamp_min", "clamp_min_")
def clamp_min(ctx: Context, node: fx.Node) -> TensorValue:
    (lo,) = ctx.args(node, ["min"], [None])
    return clamp_value(ctx, node, _input(ctx, node), lo, None)


@rule(torch.clamp_max, torch.clamp_max_, "clamp_max", "clamp_max_")
def clamp_max(ctx: Context, node: fx.Node) -> TensorValue:
    (hi,) = ctx.args(node, ["max"], [None])
    return clamp_value(ctx, node, _input(ctx, node), None, hi)


def _extremum(ctx: Context, node: fx.Node, is_max: bool) -> TensorValue:
    """``maximum`` / ``minimum`` of a network tensor and a constant or another network tensor
    (either operand first; both orders give the same value)."""
    if len(node.args) != 2 or node.kwargs:
        ctx.fail(node, "only maximum(a, b) / minimum(a, b) with two operands is supported")
    a, b = node.args
    if not isinstance(ctx.env.get(a) if isinstance(a, fx.Node) else None, TensorValue):
        a, b = b, a
    x = ctx.tensor(node, a, "operand")
    return clamp_value(ctx, node, x, b if is_max else None, None if is_max else b,
                       ("other", "other"))


@rule(torch.maximum, "maximum")
def maximum(ctx: Context, node: fx.Node) -> TensorValue:
    return _extremum(ctx, node, is_max=True)


@rule(torch.minimum, "minimum")
def minimum(ctx: Context, node: fx.Node) -> TensorValue:
    return _extremum(ctx, node, is_max=False)
