"""Pooling and spatial means (seed 000 Table D.1: average pooling is linear, max pooling a
selection by argmax).

``nn.AvgPool2d`` / ``F.avg_pool2d`` -> LinearNode ``AvgPool2d``; ``nn.MaxPool2d`` /
``F.max_pool2d`` -> :class:`~linop.network.MaxPoolNode`; adaptive pools with even windows ->
``AvgPool2d`` / ``GlobalAvgPool2d`` / MaxPoolNode (uneven average windows ->
``AdaptiveAvgPool2d``, :mod:`.resample`; uneven max windows -> the selection
``AdaptiveWindows`` laying the windows side by side, then a MaxPoolNode with kernel = stride =
the largest window: exact, since a max ignores the repeated inputs that pad short windows);
``x.mean((2, 3))`` -> ``GlobalAvgPool2d``; ``nn.AvgPool1d`` / ``F.avg_pool1d`` on ``(C, L)``
-> ``AvgPool1d``; ``nn.MaxPool1d`` / ``F.max_pool1d`` -> ``UnitAxis`` ``(C, L) -> (C, 1, L)``,
a MaxPoolNode with a ``1 × k`` window, ``UnitAxis`` back (the 2-D node, no node kind of its
own; its Jacobian is the ``MaxPool1d`` selection of :mod:`linop.operators.layers1d`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...network import MaxPoolNode
from ...operators.conv import pair
from ..context import Context, TensorValue
from ..errors import node_source
from ..registry import rule

_AVG_ARGS = (["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
              "divisor_override"], [None, None, 0, False, True, None])
_MAX_ARGS = (["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
             [None, None, 0, 1, False, False])


def _pair_arg(v: Any, name: str, minimum: int) -> tuple[int, int]:
    """:func:`~linop.operators.conv.pair`, also accepting torch's one-element lists."""
    if isinstance(v, (tuple, list)) and len(v) == 1:
        v = v[0]
    return pair(v, name, minimum)


def _window(kernel_size: Any, stride: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """Kernel and stride pairs; torch's default stride (None or empty) is the kernel."""
    k = _pair_arg(kernel_size, "kernel_size", 1)
    s = k if stride is None or stride == [] or stride == () else _pair_arg(stride, "stride", 1)
    return k, s


def _spatial_input(ctx: Context, node: fx.Node, what: str) -> TensorValue:
    x = ctx.tensor(node, node.args[0])
    if len(x.shape) != 3:
        ctx.fail(node, f"{what} needs (C, H, W), got {x.shape}")
    return x


def avg_pool(ctx: Context, node: fx.Node, kernel_size, stride, padding, ceil_mode,
             count_include_pad, divisor_override) -> TensorValue:
    from ...operators.pool import AvgPool2d

    x = _spatial_input(ctx, node, "AvgPool2d")
    k, s = _window(kernel_size, stride)
    op = AvgPool2d(x.shape, k, s, _pair_arg(padding, "padding", 0),
                   count_include_pad=bool(count_include_pad), ceil_mode=bool(ceil_mode),
                   divisor_override=divisor_override)
    return ctx.linear(node, x, op)


def max_pool(ctx: Context, node: fx.Node, kernel_size, stride, padding, dilation, ceil_mode,
             return_indices) -> TensorValue:
    x = ctx.tensor(node, node.args[0])
    if return_indices:
        ctx.fail(node, "max pooling with return_indices=True")
    if len(x.shape) != 3:
        ctx.fail(node, f"MaxPool2d needs (C, H, W), got {x.shape}")
    k, s = _window(kernel_size, stride)
    return ctx.add(MaxPoolNode(node.name, (x.name,), ctx.shape_of(node), node_source(node),
                               kernel_size=k, stride=s, padding=_pair_arg(padding, "padding", 0),
                               dilation=_pair_arg(dilation, "dilation", 1),
                               ceil_mode=bool(ceil_mode)))


def adaptive(ctx: Context, node: fx.Node, output_size: Any, kind: str) -> TensorValue:
    """Adaptive pooling with even windows: an ordinary pool of kernel = stride = H / out."""
    x = _spatial_input(ctx, node, "adaptive pooling")
    osz = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * 2
    osz = tuple(x.shape[1 + i] if o is None else int(o) for i, o in enumerate(osz))
    H, W = x.shape[1:]
    if H % osz[0] or W % osz[1]:
        if kind == "max":
            return _adaptive_max_uneven(ctx, node, x, osz)
        from .resample import adaptive_avg_uneven

        return adaptive_avg_uneven(ctx, node, x, osz)
    k = (H // osz[0], W // osz[1])
    if kind == "max":
        return max_pool(ctx, node, k, k, 0, 1, False, False)
    from ...operators.pool import AvgPool2d, GlobalAvgPool2d

    if osz == (1, 1):
        return ctx.linear(node, x, GlobalAvgPool2d(x.shape, keepdim=True))
    return ctx.linear(node, x, AvgPool2d(x.shape, k, k, (0, 0)))


def _adaptive_max_uneven(ctx: Context, node: fx.Node, x: TensorValue,
                         osz: tuple[int, int]) -> TensorValue:
    """Uneven adaptive max pooling: the gather ``AdaptiveWindows``, then a max pool of kernel =
    stride = the largest window (see the module docstring)."""
    from ...operators.base import numpy_dtype
    from ...operators.resample import AdaptiveWindows
    from ...network import LinearNode

    g = AdaptiveWindows(x.shape, osz, dtype=numpy_dtype(ctx.dtype))
    gv = ctx.add(LinearNode(ctx.unique(f"{node.name}_windows"), (x.name,), tuple(g.out_shape),
                            node_source(node), op=g))
    return ctx.add(MaxPoolNode(node.name, (gv.name,), ctx.shape_of(node), node_source(node),
                               kernel_size=g.kernel_size, stride=g.kernel_size))


# ---------------------------------------------------------------------------- registrations
@rule(nn.AvgPool2d)
def avg_pool_module(ctx: Context, node: fx.Node) -> TensorValue:
    m = ctx.module_call(node)
    return avg_pool(ctx, node, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                    m.count_include_pad, m.divisor_override)


@rule(F.avg_pool2d)
def avg_pool_function(ctx: Context, node: fx.Node) -> TensorValue:
    return avg_pool(ctx, node, *ctx.args(node, *_AVG_ARGS))


@rule(nn.MaxPool2d)
def max_pool_module(ctx: Context, node: fx.Node) -> TensorValue:
    m = ctx.module_call(node)
    return max_pool(ctx, node, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                    m.return_indices)


@rule(F.max_pool2d)
def max_pool_function(ctx: Context, node: fx.Node) -> TensorValue:
    return max_pool(ctx, node, *ctx.args(node, *_MAX_ARGS))


@rule(nn.AdaptiveAvgPool2d)
def adaptive_avg_module(ctx: Context, node: fx.Node) -> TensorValue:
    return adaptive(ctx, node, ctx.module_call(node).output_size, "avg")


@rule(F.adaptive_avg_pool2d)
def adaptive_avg_function(ctx: Context, node: fx.Node) -> TensorValue:
    return adaptive(ctx, node, ctx.args(node, ["output_size"], [None])[0], "avg")


@rule(nn.AdaptiveMaxPool2d)
def adaptive_max_module(ctx: Context, node: fx.Node) -> TensorValue:
    m = ctx.module_call(node)
    if m.return_indices:
        ctx.fail(node, "return_indices=True is not supported")
    return adaptive(ctx, node, m.output_size, "max")


@rule(F.adaptive_max_pool2d)
def adaptive_max_function(ctx: Context, node: fx.Node) -> TensorValue:
    osz, ri = ctx.args(node, ["output_size", "return_indices"], [None, False])
    if ri:
        ctx.fail(node, "return_indices=True is not supported")
    return adaptive(ctx, node, osz, "max")


@rule(torch.mean, "mean")
def mean(ctx: Context, node: fx.Node) -> TensorValue:
    """The spatial mean ``x.mean((2, 3), keepdim=...)`` of an (N, C, H, W) tensor."""
    from ...operators.pool import GlobalAvgPool2d

    x = ctx.tensor(node, node.args[0])
    dim, keepdim = ctx.args(node, ["dim", "keepdim"], [None, False])
    if node.kwargs.get("dtype") is not None:
        ctx.fail(node, "mean with a dtype argument")
    if len(x.shape) != 3 or dim is None:
        ctx.fail(node, "only the spatial mean x.mean((2, 3)) of (N, C, H, W) is supported")
    dims = sorted(int(d) % 4 for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))
    if dims != [2, 3]:
        ctx.fail(node, f"mean over dims {dim} (only the spatial axes (2, 3))")
    return ctx.linear(node, x, GlobalAvgPool2d(x.shape, keepdim=bool(keepdim)))


def avg_pool_1d(ctx: Context, node: fx.Node, kernel_size, stride, padding, ceil_mode,
                count_include_pad) -> TensorValue:
    """``F.avg_pool1d`` of a ``(C, L)`` tensor -> ``AvgPool1d``."""
    from ...operators.base import numpy_dtype
    from ...operators.layers1d import AvgPool1d

    x = ctx.tensor(node, node.args[0])
    if len(x.shape) != 2:
        ctx.fail(node, f"AvgPool1d needs (C, L), got {x.shape}")
    def one(v):  # torch's one-element lists
        return v[0] if isinstance(v, (tuple, list)) and len(v) == 1 else v

    stride = None if stride is None or stride in ([], ()) else one(stride)
    try:
        op = AvgPool1d(x.shape, one(kernel_size), stride, one(padding), ceil_mode=bool(ceil_mode),
                       count_include_pad=bool(count_include_pad), dtype=numpy_dtype(ctx.dtype))
    except ValueError as exc:
        ctx.fail(node, str(exc), ValueError)
    return ctx.linear(node, x, op)


@rule(nn.AvgPool1d)
def avg_pool_1d_module(ctx: Context, node: fx.Node) -> TensorValue:
    m = ctx.module_call(node)
    return avg_pool_1d(ctx, node, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                       m.count_include_pad)


@rule(F.avg_pool1d)
def avg_pool_1d_function(ctx: Context, node: fx.Node) -> TensorValue:
    return avg_pool_1d(ctx, node, *ctx.args(node, _AVG_ARGS[0][:5], _AVG_ARGS[1][:5]))


def max_pool_1d(ctx: Context, node: fx.Node, kernel_size, stride, padding, dilation, ceil_mode,
                return_indices) -> TensorValue:
    """``F.max_pool1d`` of a ``(C, L)`` tensor: ``UnitAxis`` to ``(C, 1, L)``, a 2-D
    MaxPoolNode with a ``1 × k`` window, ``UnitAxis`` back."""
    from ...network import LinearNode
    from ...operators.base import numpy_dtype
    from ...operators.layers1d import UnitAxis, _one

    x = ctx.tensor(node, node.args[0])
    if return_indices:
        ctx.fail(node, "max pooling with return_indices=True")
    if len(x.shape) != 2:
        ctx.fail(node, f"MaxPool1d needs (C, L), got {x.shape}")
    try:
        k = _one(kernel_size, "MaxPool1d: kernel_size")
        s = k if stride is None or stride in ([], ()) else _one(stride, "MaxPool1d: stride")
        p, d = _one(padding, "MaxPool1d: padding", 0), _one(dilation, "MaxPool1d: dilation")
    except ValueError as exc:
        ctx.fail(node, str(exc), ValueError)
    C, Lo = ctx.shape_of(node)
    dt = numpy_dtype(ctx.dtype)
    up = UnitAxis(x.shape, dtype=dt)
    v = ctx.add(LinearNode(ctx.unique(f"{node.name}_2d"), (x.name,), up.out_shape, node_source(node), op=up))
    v = ctx.add(MaxPoolNode(ctx.unique(f"{node.name}_pool"), (v.name,), (C, 1, Lo), node_source(node),
                            kernel_size=(1, k), stride=(1, s), padding=(0, p), dilation=(1, d),
                            ceil_mode=bool(ceil_mode)))
    return ctx.linear(node, v, UnitAxis((C, 1, Lo), squeeze=True, dtype=dt))


@rule(nn.MaxPool1d)
def max_pool_1d_module(ctx: Context, node: fx.Node) -> TensorValue:
    m = ctx.module_call(node)
    return max_pool_1d(ctx, node, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                       m.return_indices)


@rule(F.max_pool1d)
def max_pool_1d_function(ctx: Context, node: fx.Node) -> TensorValue:
    return max_pool_1d(ctx, node, *ctx.args(node, *_MAX_ARGS))
