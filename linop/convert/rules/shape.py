"""Reshapes, concatenation, padding, slicing, and values that pass through unchanged.

* ``nn.Flatten``, ``torch.flatten(x, 1)``, ``x.view(x.size(0), -1)``, ``x.reshape(N, -1)``,
  ``squeeze`` to ``(N, F)`` -> LinearNode ``Flatten`` (a reshape keeping the shape makes no
  node; other reshapes are refused).
* ``torch.cat(..., dim=1)`` -> CatNode; ``F.pad`` with zeros on the channel axis ->
  ``ChannelPad``; ``F.pad`` of the spatial axes (constant / reflect / replicate / circular)
  and ``nn.ZeroPad2d`` / ``ConstantPad2d`` / ``ReflectionPad2d`` / ``ReplicationPad2d`` /
  ``CircularPad2d`` -> ``Pad2d`` (a non-zero fill adds a ``unit`` BiasNode on the border).
* ``nn.ChannelShuffle``, ``torch.channel_shuffle`` and torchvision's ``view(N, g, C/g, H,
  W)`` / ``transpose(1, 2)`` / ``view(N, C, H, W)`` -> ``ChannelShuffle``.
* ``nn.PixelUnshuffle`` / ``F.pixel_unshuffle`` -> ``Polyphase`` (a permutation);
  ``nn.PixelShuffle`` / ``F.pixel_shuffle`` -> its adjoint (the inverse permutation).
* ``x[:, :, o::s, o::s]`` (also with ``...``) -> ``Subsample``; ``x[:, a:b]``,
  ``x.chunk(k, 1)``, ``x.split(s, 1)`` -> channel crops (``ChannelPad(...).T``); an index
  into a parameter / buffer is a constant.
* ``nn.Identity``, ``nn.Dropout*`` (eval), ``F.dropout(training=False)``, ``contiguous``,
  ``clone`` -> no node; ``x.shape``, ``x.size()``, ``x.dim()`` -> an opaque value.
"""
from __future__ import annotations

import itertools
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...network import CatNode, LinearNode
from ...operators.base import numpy_dtype
from ..context import Constant, Context, Opaque, TensorValue
from ..errors import node_source
from ..registry import rule

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout,
                      F.feature_alpha_dropout)


_TRANSPOSES = {torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes",
               "swapdims"}
_RESHAPES = {torch.reshape, torch.flatten, "view", "reshape", "flatten"}


def _is(node: fx.Node, targets: set) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _shuffle_chain(ctx: Context, node: fx.Node, x: TensorValue,
                   out: tuple[int, ...]) -> tuple[fx.Node, ...] | None:
    """torchvision's ``channel_shuffle``: ``view(N, g, C/g, H, W)``, ``transpose(1, 2)``,
    optionally ``contiguous()``, ``view(N, C, H, W)``: the chain of nodes after ``node``
    (ending with the one whose value is the shuffled tensor), else None."""
    if len(x.shape) != 3 or len(out) != 4 or out[0] * out[1] != x.shape[0] \
            or out[2:] != x.shape[1:]:
        return None
    t = _only_user(node)
    if t is None or not _is(t, _TRANSPOSES) or t.args[0] is not node:
        return None
    dims = sorted(int(d) % 5 for d in (list(t.args[1:]) + [t.kwargs.get(k) for k in
                                                             ("dim0", "dim1") if k in t.kwargs]))
    if dims != [1, 2]:
        return None
    chain, cur = [t], t
    nxt = _only_user(cur)
    if nxt is not None and nxt.op == "call_method" and nxt.target == "contiguous":
        chain.append(nxt)
        cur, nxt = nxt, _only_user(nxt)
    if nxt is None or not _is(nxt, _RESHAPES) or ctx.shape_of(nxt) != x.shape:
        return None
    return tuple(chain) + (nxt,)


@rule(nn.Flatten, torch.flatten, torch.reshape, torch.squeeze,
      "view", "reshape", "flatten", "squeeze")
def reshape(ctx: Context, node: fx.Node) -> TensorValue | Opaque:
    """A reshape that keeps each sample's values: none, flattening to ``(N, F)``, or the
    first step of torchvision's view / transpose / view channel shuffle."""
    from ...operators.permutation import ChannelShuffle
    from ...operators.structural import Flatten

    if node.op == "call_module":
        ctx.module_call(node)
    x = ctx.tensor(node, node.args[0])
    out = ctx.shape_of(node)
    if math.prod(out) != math.prod(x.shape):
        ctx.fail(node, f"reshape {x.shape} -> {out} mixes samples of the batch")
    if out == x.shape:
        return x
    chain = _shuffle_chain(ctx, node, x, out)
    if chain is not None:  # the 5-D views are not network tensors; only the result is
        for c in chain[:-1]:
            ctx.env[c] = Opaque()
        ctx.env[chain[-1]] = ctx.linear(chain[-1], x, ChannelShuffle(
            x.shape, out[0], dtype=numpy_dtype(ctx.dtype)))
        return Opaque()
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


def spatial_pad(ctx: Context, node: fx.Node, x: TensorValue, pad: tuple[int, int, int, int],
                mode: str, value: float, bname: str) -> TensorValue:
    """``Pad2d`` of a ``(C, H, W)`` tensor; a non-zero constant fill ``v`` is a bias: zero
    padding, then ``v`` on the border entries from its own slice of ``x_b`` (mode ``unit``)."""
    from ...operators.padding import Pad2d

    if len(x.shape) != 3:
        ctx.fail(node, f"spatial padding is supported on (N, C, H, W) tensors, got per-sample "
                 f"{x.shape}")
    try:
        op = Pad2d(x.shape, pad, mode=mode, dtype=numpy_dtype(ctx.dtype))
    except ValueError as exc:
        ctx.fail(node, str(exc), ValueError)
    if not value:
        return ctx.linear(node, x, op)
    y = ctx.linear(node, x, op, name=ctx.unique(f"{node.name}_zero"))
    border = 1.0 - op.apply(torch.ones((1,) + x.shape, dtype=torch.float64))[0]
    return ctx.bias(node, y, bname, float(value) * border, y.shape, "unit", node.name)


@rule(F.pad)
def pad(ctx: Context, node: fx.Node) -> TensorValue:
    """``F.pad``: zeros on the channel axis -> ``ChannelPad``; the last two axes of a
    ``(N, C, H, W)`` tensor (any mode) -> ``Pad2d``; none at all -> no node."""
    from ...operators.structural import ChannelPad

    x = ctx.tensor(node, node.args[0])
    widths, mode, value = ctx.args(node, ["pad", "mode", "value"], [None, "constant", None])
    value = 0.0 if value is None else value
    if mode not in ("constant", "reflect", "replicate", "circular"):
        ctx.fail(node, f"F.pad mode={mode!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        ctx.fail(node, f"F.pad value={value!r} is not a number")
    widths = [int(p) for p in widths]
    nd = len(x.shape)
    if len(widths) % 2 or len(widths) > 2 * nd:
        ctx.fail(node, f"pad={widths} reaches the batch axis")
    widths = widths + [0] * (2 * nd - len(widths))
    ch = widths[2 * (nd - 1): 2 * nd]  # pairs run from the last dim backwards
    sp = widths[:4] if nd == 3 else []
    if any(widths[len(sp): 2 * (nd - 1)]):
        ctx.fail(node, f"pad={widths}: only padding of the channel axis or of the two "
                 "spatial axes of (N, C, H, W) is supported")
    if any(ch) and (mode != "constant" or value != 0 or min(ch) < 0):
        ctx.fail(node, f"pad={widths}, mode={mode!r}, value={value!r}: the channel axis "
                 "only takes non-negative zero padding")
    if any(ch):
        chp = ChannelPad(x.shape, ch[0], ch[1])
        if not any(sp):
            return ctx.linear(node, x, chp)
        x = ctx.add(LinearNode(ctx.unique(f"{node.name}_ch"), (x.name,), chp.out_shape,
                               node_source(node), op=chp))
    if not any(sp) and not value:
        return x
    return spatial_pad(ctx, node, x, tuple(sp), mode, value, f"{node.name}.value")


@rule(nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
      nn.CircularPad2d)
def pad_module(ctx: Context, node: fx.Node) -> TensorValue:
    m = ctx.module_call(node)
    x = ctx.tensor(node, node.args[0])
    mode = {nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate",
            nn.CircularPad2d: "circular"}.get(type(m), "constant")
    return spatial_pad(ctx, node, x, tuple(int(p) for p in m.padding), mode,
                       float(getattr(m, "value", 0.0)), f"{node.target}.value")


@rule(nn.ChannelShuffle, torch.channel_shuffle, torch.native_channel_shuffle)
def channel_shuffle(ctx: Context, node: fx.Node) -> TensorValue:
    """ShuffleNet's channel shuffle -> ``ChannelShuffle`` (a permutation of channels)."""
    from ...operators.permutation import ChannelShuffle

    if node.op == "call_module":
        groups = ctx.module_call(node).groups
    else:
        (groups,) = ctx.args(node, ["groups"], [None])
    x = ctx.tensor(node, node.args[0])
    try:
        op = ChannelShuffle(x.shape, groups, dtype=numpy_dtype(ctx.dtype))
    except ValueError as exc:
        ctx.fail(node, str(exc), ValueError)
    return ctx.linear(node, x, op)


@rule(nn.PixelUnshuffle, F.pixel_unshuffle, nn.PixelShuffle, F.pixel_shuffle)
def pixel_shuffle(ctx: Context, node: fx.Node) -> TensorValue:
    """Space-to-depth ``pixel_unshuffle(x, r)`` -> ``Polyphase(x.shape, r)`` (the permutation
    ``Π``); depth-to-space ``pixel_shuffle(x, r)`` -> ``Πᵀ`` of ``Polyphase((C/r², H r, W r), r)``
    (its adjoint is its inverse: for a stride dividing the size ``Π`` is a permutation)."""
    from ...operators.polyphase import Polyphase

    target = ctx.module_call(node) if node.op == "call_module" else node.target
    down = isinstance(target, nn.PixelUnshuffle) or target is F.pixel_unshuffle
    name = "downscale_factor" if down else "upscale_factor"
    if node.op == "call_module":
        r = getattr(target, name)
    else:
        (r,) = ctx.args(node, [name], [None])
    x = ctx.tensor(node, node.args[0])
    if len(x.shape) != 3 or not isinstance(r, int) or r < 1:
        ctx.fail(node, f"{name}={r!r} on a value of shape {x.shape}: needs a positive int factor and a "
                       "(C, H, W) value", ValueError)
    C, H, W = x.shape
    # torch's own shape check (run while tracing) has already refused factors that do not divide
    try:
        if down:
            op = Polyphase((C, H, W), (r, r), dtype=numpy_dtype(ctx.dtype))
        else:
            op = Polyphase((C // (r * r), H * r, W * r), (r, r), dtype=numpy_dtype(ctx.dtype)).T
    except ValueError as exc:
        ctx.fail(node, str(exc), ValueError)
    return ctx.linear(node, x, op)


def _full_index(idx: Any, nd: int) -> tuple:
    """``idx`` as one entry per axis (``...`` and missing trailing axes expanded)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (nd - len(idx) + 1) + idx[k + 1:]
    return idx + (slice(None),) * (nd - len(idx))


def channel_crop(ctx: Context, node: fx.Node, x: TensorValue, c0: int, c1: int,
                 name: str | None = None) -> TensorValue:
    """Channels ``[c0, c1)`` of ``x``: the adjoint of zero channel padding (a selection)."""
    from ...operators.structural import ChannelPad

    op = ChannelPad((c1 - c0,) + x.shape[1:], c0, x.shape[0] - c1,
                    dtype=numpy_dtype(ctx.dtype)).T
    if name is None:
        return ctx.linear(node, x, op)
    return ctx.add(LinearNode(ctx.unique(name), (x.name,), tuple(op.out_shape),
                              node_source(node), op=op))


@rule(torch.chunk, torch.split, "chunk", "split")
def split(ctx: Context, node: fx.Node) -> tuple:
    """``x.chunk(k, 1)`` / ``x.split(s, 1)`` along channels: a tuple of channel crops
    (ShuffleNet-V2's stride-1 unit); ``getitem`` picks one."""
    x = ctx.tensor(node, node.args[0])
    is_chunk = "chunk" in str(getattr(node.target, "__name__", node.target))
    what, dim = ctx.args(node, ["chunks" if is_chunk else "split_size_or_sections", "dim"],
                         [None, 0])
    if dim not in (1, -len(x.shape)):
        ctx.fail(node, f"splitting along dim={dim} (only the channel axis, dim=1)")
    C = x.shape[0]
    if isinstance(what, int) and not isinstance(what, bool) and what >= 1:
        size = -(-C // what) if is_chunk else what  # torch.chunk: chunks of ⌈C/k⌉
        sizes = [min(size, C - a) for a in range(0, C, size)]
    elif not is_chunk and isinstance(what, (list, tuple)):
        sizes = [int(v) for v in what]
    else:
        ctx.fail(node, f"split argument {what!r}", ValueError)
    if sum(sizes) != C or min(sizes) < 1:
        ctx.fail(node, f"split sizes {sizes} for {C} channels (empty parts are not supported)")
    bounds = [0] + list(itertools.accumulate(sizes))
    return tuple(channel_crop(ctx, node, x, a, b, f"{node.name}_{i}")
                 for i, (a, b) in enumerate(itertools.pairwise(bounds)))


@rule(operator.getitem)
def getitem(ctx: Context, node: fx.Node) -> Any:
    """``x[..., o::s, o::s]`` -> ``Subsample``; ``x[:, a:b]`` -> a channel crop; an item of a
    split; an index into a constant is a constant."""
    from ...operators.structural import Subsample

    src, idx = node.args
    v = ctx.env.get(src) if isinstance(src, fx.Node) else None
    if isinstance(v, tuple) and isinstance(idx, int):
        return v[idx]
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
    if not full[0]:
        ctx.fail(node, "slicing the batch axis is not supported")
    if all(full):
        return v
    if nd >= 2 and not full[1]:
        c0, c1, step = idx[1].indices(v.shape[0])
        if not all(full[2:]) or step != 1 or c1 <= c0:
            ctx.fail(node, f"index {node.args[1]!r}: a channel slice must be contiguous "
                     "(x[:, a:b]) and keep the other axes whole")
        return channel_crop(ctx, node, v, c0, c1)
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
