"""Sums, differences and constant factors (seed 000 Fig. 2: every bias is an input).

* ``a + b`` / ``torch.add`` / ``x.add(y)`` of two network tensors -> AddNode; ``a - b`` ->
  ``Scale(-1)`` + AddNode.
* ``x + c`` / ``x - c`` / ``c - x`` with ``c`` a number or a scalar / per-channel / full-shape
  parameter or buffer -> a BiasNode with its own slice of ``x_b``, named by the parameter path
  (``f"{fx_node}.const"`` for numbers, ``"-path"`` when subtracted).  Added straight to a
  bias-free conv / linear (Fixup's ``bias1b`` / ``bias2b``) it is that unit layer's own bias.
* ``x * c`` / ``c * x`` / ``x / c`` with a scalar or per-channel constant ``c`` -> ``Scale``
  (unless :mod:`linop.convert.fold` folded it into the preceding conv / linear).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ...network import AddNode, LinearNode
from ..context import Context, Opaque, TensorValue
from ..errors import node_source
from ..registry import rule


def _operands(ctx: Context, node: fx.Node):
    a, b = node.args
    va = ctx.env.get(a) if isinstance(a, fx.Node) else None
    vb = ctx.env.get(b) if isinstance(b, fx.Node) else None
    return a, b, va, vb


def _size_arithmetic(va, vb) -> bool:
    """Arithmetic on ``x.size()`` values (``c // groups``): an opaque reshape argument."""
    return isinstance(va, Opaque) or isinstance(vb, Opaque)


def _negate(ctx: Context, node: fx.Node, x: TensorValue) -> TensorValue:
    from ...operators.structural import Scale

    return ctx.linear(node, x, Scale(x.shape, -1.0), name=ctx.unique(f"{node.name}_neg"))


def add_op(ctx: Context, node: fx.Node, sign: float) -> TensorValue:
    """``a + sign·b`` with tensors or one constant operand."""
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        ctx.fail(node, "only a + b / a - b (alpha=1) is supported")
    a, b, va, vb = _operands(ctx, node)
    if isinstance(va, TensorValue) and isinstance(vb, TensorValue):
        if va.shape != vb.shape:
            ctx.fail(node, f"broadcasting sum of shapes {va.shape} and {vb.shape}")
        if sign < 0:
            vb = _negate(ctx, node, vb)
        return ctx.add(AddNode(node.name, (va.name, vb.name), va.shape, node_source(node)))
    if not (isinstance(va, TensorValue) or isinstance(vb, TensorValue)):
        if _size_arithmetic(va, vb):
            return Opaque()
        ctx.fail(node, "neither operand is a tensor of the network")
    x_first = isinstance(va, TensorValue)
    x, cst, src = (va, b, a) if x_first else (vb, a, b)
    c = ctx.const(cst)
    if c is None:
        ctx.fail(node, f"the other operand {cst!r} is neither a tensor of the network "
                 "nor a constant")
    if not x_first and sign < 0:  # c - x = c + (-1)·x
        x, sign = _negate(ctx, node, x), 1.0
    mode, vals = ctx.channel_values(node, c, x.shape)
    base = c.path if c.path is not None else f"{node.name}.const"
    bname = base if sign > 0 else f"-{base}"
    # own bias of a bias-free conv/linear whose only consumer is this add (Fixup)
    unit = None
    prod = ctx.by_name.get(x.name)
    if (isinstance(prod, LinearNode) and prod.unit_layer and len(src.users) == 1
            and ctx.own_bias_free(prod.unit_layer)):
        unit = prod.unit_layer
    return ctx.bias(node, x, bname, sign * vals, x.shape, mode, node.name, unit_layer=unit)


def mul_op(ctx: Context, node: fx.Node, div: bool) -> TensorValue:
    """``x * c`` or ``x / c`` with a scalar or per-channel constant ``c`` -> ``Scale``."""
    from ...operators.structural import Scale

    if len(node.args) != 2 or set(node.kwargs) - {"rounding_mode"} or node.kwargs.get(
            "rounding_mode") is not None:
        ctx.fail(node, "only x * c and x / c with a constant c are supported")
    a, b, va, vb = _operands(ctx, node)
    if isinstance(va, TensorValue) and isinstance(vb, TensorValue):
        ctx.fail(node, "the product of two network tensors is not linear")
    if div and not isinstance(va, TensorValue):
        ctx.fail(node, "division by a network tensor is not linear")
    x, cst = (va, b) if isinstance(va, TensorValue) else (vb, a)
    if not isinstance(x, TensorValue):
        if _size_arithmetic(va, vb):
            return Opaque()
        ctx.fail(node, "neither operand is a tensor of the network")
    c = ctx.const(cst)
    if c is None:
        ctx.fail(node, f"the factor {cst!r} is not a constant")
    mode, vals = ctx.channel_values(node, c, x.shape)
    if mode == "unit":
        ctx.fail(node, "a full-shape elementwise factor is not supported (scalar or "
                 "per-channel only)")
    if div:
        if torch.any(vals == 0):
            ctx.fail(node, "division by zero", ValueError)
        vals = 1.0 / vals
    alpha = float(vals[0]) if mode == "scalar" else ctx.param(vals)
    return ctx.linear(node, x, Scale(x.shape, alpha))


@rule(operator.add, operator.iadd, torch.add, "add", "add_")
def add(ctx: Context, node: fx.Node) -> TensorValue:
    return add_op(ctx, node, sign=1.0)


@rule(operator.sub, operator.isub, torch.sub, "sub", "sub_")
def sub(ctx: Context, node: fx.Node) -> TensorValue:
    return add_op(ctx, node, sign=-1.0)


@rule(operator.mul, operator.imul, torch.mul, "mul", "mul_")
def mul(ctx: Context, node: fx.Node) -> TensorValue:
    return mul_op(ctx, node, div=False)


@rule(operator.truediv, operator.itruediv, torch.div, "div", "div_")
def div(ctx: Context, node: fx.Node) -> TensorValue:
    return mul_op(ctx, node, div=True)


@rule(operator.floordiv)
def floordiv(ctx: Context, node: fx.Node) -> Opaque:
    """``c // g`` of sizes (torchvision's channel shuffle): an opaque reshape argument."""
    _, _, va, vb = _operands(ctx, node)
    if not _size_arithmetic(va, vb) or isinstance(va, TensorValue) or isinstance(vb, TensorValue):
        ctx.fail(node, "floor division is only supported on sizes (x.size(1) // g)")
    return Opaque()
