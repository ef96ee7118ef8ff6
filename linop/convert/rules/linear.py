"""Conv / linear unit layers and BatchNorm (seed 000 §3.2, Eq. 3, Eq. 7, Table D.4).

A ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.Conv1d`` / ``nn.Linear`` becomes a *unit layer*: a :class:`~linop.network.LinearNode`
holding its value before its own bias (Eq. 3), named ``Conv0, Conv1, ...`` / ``FC``, then a
:class:`~linop.network.BiasNode` for its own bias ``f"{layer}.bias"``.  The BatchNorm /
multiplier chain planned by :mod:`linop.convert.fold` is folded into its weights first.
A BatchNorm that is not folded becomes a per-channel ``Scale`` and a BiasNode.  A conv
with ``padding_mode`` reflect / replicate / circular reads a ``Pad2d`` LinearNode (no unit
layer) and pads nothing itself: still one unit layer.
"""
from __future__ import annotations

from torch import fx, nn

from ..context import Context, TensorValue
from ..fold import Fold, bn_affine
from ..registry import rule


def _padded_input(ctx: Context, node: fx.Node, m: nn.Conv2d, inp: TensorValue) -> TensorValue:
    """A reflect / replicate / circular padded conv reads ``Pad2d(x)``: a LinearNode of its
    own (not a unit layer) before the conv, which then pads nothing."""
    from ...network import LinearNode
    from ...operators.base import numpy_dtype
    from ...operators.padding import Pad2d
    from ..errors import node_source

    pad = tuple(int(p) for p in m._reversed_padding_repeated_twice)  # (left, right, top, bottom)
    try:
        op = Pad2d(inp.shape, pad, mode=m.padding_mode, dtype=numpy_dtype(ctx.dtype))
    except ValueError as exc:
        ctx.fail(node, str(exc), ValueError)
    return ctx.add(LinearNode(ctx.unique(f"{node.name}_pad"), (inp.name,), tuple(op.out_shape),
                              node_source(node), op=op))


def _conv_maker(ctx: Context, node: fx.Node, m: nn.Conv2d, inp: TensorValue):
    """Checks of a conv call; its (possibly padded) input and the function building its
    operator from a (folded) kernel."""
    from ...operators.conv import Conv2d

    if len(inp.shape) != 3:
        ctx.fail(node, f"Conv2d needs a (C, H, W) input, got {inp.shape}")
    padding = m.padding
    if m.padding_mode != "zeros":
        inp, padding = _padded_input(ctx, node, m, inp), 0
    return inp, lambda W: Conv2d(ctx.param(W), inp.shape, stride=m.stride, padding=padding,
                                 dilation=m.dilation, groups=m.groups)


def _conv_transpose_maker(ctx: Context, node: fx.Node, m: nn.ConvTranspose2d,
                          inp: TensorValue):
    from ...operators.conv_transpose import ConvTranspose2d

    if len(inp.shape) != 3:
        ctx.fail(node, f"ConvTranspose2d needs a (C, H, W) input, got {inp.shape}")
    if m.padding_mode != "zeros":
        ctx.fail(node, f"ConvTranspose2d with padding_mode={m.padding_mode!r} (torch itself "
                 "only supports 'zeros')")
    return lambda W: ConvTranspose2d(ctx.param(W), inp.shape, stride=m.stride,
                                     padding=m.padding, output_padding=m.output_padding,
                                     dilation=m.dilation, groups=m.groups)


def _conv1d_maker(ctx: Context, node: fx.Node, m: nn.Conv1d, inp: TensorValue):
    from ...operators.layers1d import Conv1d

    if len(inp.shape) != 2:
        ctx.fail(node, f"Conv1d needs a (C, L) input, got {inp.shape}")
    if m.padding_mode != "zeros":
        ctx.fail(node, f"Conv1d with padding_mode={m.padding_mode!r} (only 'zeros')")
    return lambda W: Conv1d(ctx.param(W), inp.shape, stride=m.stride, padding=m.padding,
                            dilation=m.dilation, groups=m.groups)


@rule(nn.Conv2d, nn.Linear, nn.ConvTranspose2d, nn.Conv1d)
def unit_layer(ctx: Context, node: fx.Node) -> TensorValue:
    """Conv / conv-transpose / linear with its folded BN / multiplier chain (Eq. 7,
    Table D.4)."""
    from ...operators.dense import Linear

    m = ctx.module_call(node)
    inp = ctx.tensor(node, node.args[0])
    groups = None
    if isinstance(m, nn.ConvTranspose2d):
        make, kind, groups = _conv_transpose_maker(ctx, node, m, inp), "Conv", m.groups
    elif isinstance(m, nn.Conv1d):
        make, kind = _conv1d_maker(ctx, node, m, inp), "Conv"
    elif isinstance(m, nn.Conv2d):
        inp, make = _conv_maker(ctx, node, m, inp)
        kind = "Conv"
    else:
        if len(inp.shape) != 1:
            ctx.fail(node, f"Linear is supported on (N, F) inputs, got per-sample {inp.shape}")
        make, kind = (lambda W: Linear(ctx.param(W))), "FC"
    fold = ctx.folds.get(node) or Fold(node, ())
    W, t, has_bias = fold.apply(m.weight, m.bias, transposed_groups=groups)
    op = make(W)
    layer = ctx.new_unit_layer(kind, str(node.target))
    lin = ctx.linear(node, inp, op, unit_layer=layer)
    res = lin
    if has_bias:
        tail = fold.tail
        bname = tail.name if fold.steps else ctx.unique(f"{node.name}_bias")
        res = ctx.bias(tail, lin, f"{layer}.bias", t, lin.shape, "channel", bname,
                       unit_layer=layer)
    for c in fold.chain:  # the absorbed nodes' values (they are not converted again)
        ctx.env[c] = res if c is fold.tail else lin
    # the head's own torch value is conv(x) + bias when nothing was folded; with a chain it
    # is only seen by the chain, whose tail carries the result
    return lin if fold.steps else res


@rule(nn.BatchNorm1d, nn.BatchNorm2d)
def batch_norm(ctx: Context, node: fx.Node) -> TensorValue:
    """An unfolded eval-mode BatchNorm: ``Scale(g)`` then the bias ``shift`` (Eq. 7)."""
    from ...operators.structural import Scale

    m = ctx.module_call(node)
    inp = ctx.tensor(node, node.args[0])
    if isinstance(m, nn.BatchNorm2d) and len(inp.shape) != 3:
        ctx.fail(node, f"BatchNorm2d needs (C, H, W), got {inp.shape}")
    if isinstance(m, nn.BatchNorm1d) and len(inp.shape) not in (1, 2):
        ctx.fail(node, f"BatchNorm1d needs (N, C) or (N, C, L) inputs, got {inp.shape}")
    if m.running_mean is None or m.running_var is None:
        ctx.fail(node, "BatchNorm without running statistics (track_running_stats=False) "
                 "normalises with batch statistics even in eval mode")
    if m.num_features != inp.shape[0]:
        ctx.fail(node, f"BatchNorm over {m.num_features} features applied to "
                 f"{inp.shape[0]} channels")
    g, shift = bn_affine(m, str(node.target))
    lin = ctx.linear(node, inp, Scale(inp.shape, ctx.param(g)),
                     name=ctx.unique(f"{node.name}_scale"))
    return ctx.bias(node, lin, f"{node.target}.bias", shift, inp.shape, "channel", node.name)
