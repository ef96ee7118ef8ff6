"""Activations -> :class:`~linop.network.ActivationNode` (seed 000 §3.1: σ(c) = max(c, 0) +
γ·min(c, 0); tanh / sigmoid are smooth, converted for the seed 001 baselines).

Module, functional and method forms: ``nn.ReLU`` / ``F.relu`` / ``torch.relu`` /
``x.relu()``; ``nn.LeakyReLU`` / ``F.leaky_relu``; ``nn.PReLU``; ``nn.Tanh`` / ``torch.tanh`` /
``x.tanh()``; ``nn.Sigmoid`` / ``torch.sigmoid`` / ``x.sigmoid()``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...network import ActivationNode
from ..context import Context, TensorValue
from ..errors import node_source
from ..registry import rule


def _check_inplace(ctx: Context, node: fx.Node) -> None:
    """An in-place op whose input is read again later would change that later value in torch
    but not here (the graph is functional): refuse it."""
    m = ctx.module(node)
    inplace = bool(getattr(m, "inplace", False)) if m is not None else (
        bool(node.kwargs.get("inplace", False))
        or str(getattr(node.target, "__name__", node.target)).endswith("_"))
    src = node.args[0]
    if inplace and isinstance(src, fx.Node):
        later = [u.name for u in src.users if ctx.order[u] > ctx.order[node]]
        if later:
            ctx.fail(node, f"in-place op on '{src.name}', which is read again later by "
                     f"{later}; use the out-of-place form")


def activation(ctx: Context, node: fx.Node, kind: str, slope: Any = 0.0) -> TensorValue:
    """An ActivationNode of ``kind`` on the node's first operand."""
    if node.op == "call_module":
        ctx.module_call(node)
    inp = ctx.tensor(node, node.args[0])
    _check_inplace(ctx, node)
    if kind == "leaky_relu" and slope < 0:
        ctx.fail(node, f"negative_slope={slope} < 0 is not monotone", ValueError)
    if kind == "prelu" and slope.numel() not in (1, inp.shape[0]):
        ctx.fail(node, f"PReLU with {slope.numel()} slopes on {inp.shape[0]} channels")
    return ctx.add(ActivationNode(node.name, (inp.name,), inp.shape, node_source(node),
                                  kind=kind, negative_slope=slope))


@rule(nn.ReLU, F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_")
def relu(ctx: Context, node: fx.Node) -> TensorValue:
    return activation(ctx, node, "relu")


@rule(nn.Tanh, torch.tanh, F.tanh, "tanh", "tanh_")
def tanh(ctx: Context, node: fx.Node) -> TensorValue:
    return activation(ctx, node, "tanh")


@rule(nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_")
def sigmoid(ctx: Context, node: fx.Node) -> TensorValue:
    return activation(ctx, node, "sigmoid")


@rule(nn.LeakyReLU)
def leaky_relu_module(ctx: Context, node: fx.Node) -> TensorValue:
    return activation(ctx, node, "leaky_relu", float(ctx.module(node).negative_slope))


@rule(F.leaky_relu)
def leaky_relu(ctx: Context, node: fx.Node) -> TensorValue:
    (slope,) = ctx.args(node, ["negative_slope"], [0.01])
    return activation(ctx, node, "leaky_relu", float(slope))


@rule(nn.PReLU)
def prelu(ctx: Context, node: fx.Node) -> TensorValue:
    return activation(ctx, node, "prelu", ctx.param(ctx.module(node).weight).reshape(-1))
