"""Reshapes, concatenation, padding, slicing, and values that pass through unchanged.

* ``nn.Flatten``, ``torch.flatten(x, 1)``, ``x.view(x.size(0), -1)``, ``x.reshape(N, -1)``,
  ``squeeze`` to ``(N, F)`` -> LinearNode ``Flatten`` (a reshape keeping the shape makes no
  node; other reshapes are refused).
* ``torch.cat(..., dim=1)`` -> CatNode; ``F.pad`` with zeros on the channel axis only ->
  ``ChannelPad``; ``x[:, :, o::s, o::s]`` (also with ``...``) -> ``Subsample``; an index into a
  parameter / buffer is a constant.
* ``nn.Identity``, ``nn.Dropout*`` (eval), ``F.dropout(training=False)``, ``contiguous``,
  ``clone`` -> no node; ``x.shape``, ``x.size()``, ``x.dim()`` -> an opaque value.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...network import CatNode
from ..context import Constant, Context, Opaque, TensorValue
from ..errors import node_source
from ..registry import rule

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout,
                      F.feature_alpha_dropout)


@rule(nn.Flatten, torch.flatten, torch.reshape, torch.squeeze,
      "view", "reshape", "flatten", "squeeze")
def reshape(ctx: Context, node: fx.Node) -> TensorValue:
    """A reshape that keeps each sample's values: none, or flattening to ``(N, F)``."""
    from ...operators.structural import Flatten

    if node.op == "call_module":
        ctx.module_call(node)
    x = ctx.tensor(node, node.args[0])
    out = ctx.shape_of(node)
    if math.prod(out) != math.prod(x.shape):
        ctx.fail(node, f"reshape {x.shape} -> {out} mixes samples of the batch")
    if out == x.shape:
        return x
    if len(out) != 1:
        ctx.fail(node, f"reshape {x.shape} -> {out}: only flattening to (N, -1) is supported")
    return ctx.linear(node, x, Flatten(x.shape))


@rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx: Context, node: fx.Node) -> TensorValue:
    """Concatenation along the channel axis."""
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    ins = [ctx.tensor(node, t) for t in tensors]
    nd = len(ins[0].shape) + 1
    if dim not in (1, 1 - nd):
        ctx.fail(node, f"concatenation along dim={dim} (only the channel axis, dim=1)")
    if any(v.shape[1:] != ins[0].shape[1:] for v in ins):
        ctx.fail(node, f"inputs of shapes {[v.shape for v in ins]} differ off the channel axis")
    return ctx.add(CatNode(node.name, tuple(v.name for v in ins), ctx.shape_of(node),
                           node_source(node), dim=1))


@rule(F.pad)
def pad(ctx: Context, node: fx.Node) -> TensorValue:
    """Zero padding of the channel axis -> ``ChannelPad`` (none at all -> no node)."""
    from ...operators.structural import ChannelPad

    x = ctx.tensor(node, node.args[0])
    widths, mode, value = ctx.args(node, ["pad", "mode", "value"], [None, "constant", None])
    if mode != "constant" or value not in (None, 0, 0.0):
        ctx.fail(node, f"F.pad mode={mode!r}, value={value!r} (only constant zeros)")
    widths = [int(p) for p in widths]
    nd = len(x.shape)
    if len(widths) % 2 or len(widths) > 2 * nd:
        ctx.fail(node, f"pad={widths} reaches the batch axis")
    widths = widths + [0] * (2 * nd - len(widths))
    ch = widths[2 * (nd - 1): 2 * nd]  # pairs run from the last dim backwards
    if any(widths[: 2 * (nd - 1)]) or min(ch) < 0:
        ctx.fail(node, f"pad={widths}: only non-negative zero padding of the channel axis is "
                 "supported")
    if not any(ch):
        return x
    return ctx.linear(node, x, ChannelPad(x.shape, ch[0], ch[1]))


def _full_index(idx: Any, nd: int) -> tuple:
    """``idx`` as one entry per axis (``...`` and missing trailing axes expanded)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (nd - len(idx) + 1) + idx[k + 1:]
    return idx + (slice(None),) * (nd - len(idx))


@rule(operator.getitem)
def getitem(ctx: Context, node: fx.Node) -> Any:
    """``x[..., o::s, o::s]`` -> ``Subsample``; an index into a constant is a constant."""
    from ...operators.structural import Subsample

    src, idx = node.args
    v = ctx.env.get(src) if isinstance(src, fx.Node) else None
    if isinstance(v, Constant) and isinstance(v.value, torch.Tensor):
        # a slice of a parameter / buffer is still a constant (e.g. ``self.b[0]``)
        return Constant(v.value[idx], None if v.path is None else f"{v.path}[{node.name}]")
    if not isinstance(v, TensorValue):
        if isinstance(v, Opaque) or (isinstance(src, fx.Node)
                                     and src.meta.get("tensor_meta") is None):
            return Opaque()  # x.shape[0] and the like
        ctx.fail(node, "indexing of a value that is not a tensor of the network")
    nd = len(v.shape) + 1
    idx = _full_index(idx, nd)
    if len(idx) != nd or not all(isinstance(i, slice) for i in idx):
        ctx.fail(node, f"index {node.args[1]!r}: only slices are supported")
    full = [i == slice(None) or i == slice(None, None, 1) for i in idx]
    if not (full[0] and (nd < 2 or full[1])):
        ctx.fail(node, "slicing the batch or channel axis is not supported")
    if all(full):
        return v
    if nd != 4:
        ctx.fail(node, "strided slicing is supported on (N, C, H, W) tensors")
    stride, offset = [], []
    for i, size in zip(idx[2:], v.shape[1:]):
        step = 1 if i.step is None else int(i.step)
        start = 0 if i.start is None else int(i.start)
        if step < 1 or start < 0 or (i.stop is not None and int(i.stop) < size):
            ctx.fail(node, f"slice {i}: only x[..., start::step] with start >= 0, step >= 1")
        stride.append(step)
        offset.append(start)
    return ctx.linear(node, v, Subsample(v.shape, tuple(stride), tuple(offset)))


# ---------------------------------------------------------------------------- pass-through
@rule(nn.Identity)
def identity(ctx: Context, node: fx.Node) -> TensorValue:
    return ctx.tensor(node, node.args[0])


@rule(*_DROPOUT_MODULES, "contiguous", "clone")
def passthrough(ctx: Context, node: fx.Node) -> TensorValue:
    """Eval-mode dropout and memory-layout methods: the value itself."""
    if node.op == "call_module":
        ctx.module_call(node)
    return ctx.tensor(node, node.args[0])


@rule(*_DROPOUT_FUNCTIONS)
def dropout_function(ctx: Context, node: fx.Node) -> TensorValue:
    p, training = ctx.args(node, ["p", "training"], [0.5, True])
    if training and p != 0:
        ctx.fail(node, "functional dropout with training=True is random even in eval mode; "
                 "pass training=self.training", ValueError)
    return ctx.tensor(node, node.args[0])


@rule(getattr, "size", "dim")
def opaque(ctx: Context, node: fx.Node) -> Opaque:
    """``x.shape``, ``x.size()``, ``x.dim()``: only usable as reshape arguments."""
    return Opaque()
