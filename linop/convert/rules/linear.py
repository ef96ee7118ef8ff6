"""Conv / linear unit layers and BatchNorm (seed 000 §3.2, Eq. 3, Eq. 7, Table D.4).

A ``nn.Conv2d`` / ``nn.Linear`` becomes a *unit layer*: a :class:`~linop.network.LinearNode`
holding its value before its own bias (Eq. 3), named ``Conv0, Conv1, ...`` / ``FC``, then a
:class:`~linop.network.BiasNode` for its own bias ``f"{layer}.bias"``.  The BatchNorm /
multiplier chain planned by :mod:`linop.convert.fold` is folded into its weights first.
A BatchNorm that is not folded becomes a per-channel ``Scale`` and a BiasNode.
"""
from __future__ import annotations

from torch import fx, nn

from ..context import Context, TensorValue
from ..fold import Fold, bn_affine
from ..registry import rule


def _conv_maker(ctx: Context, node: fx.Node, m: nn.Conv2d, inp: TensorValue):
    """Checks of a conv call; the function building its operator from a (folded) kernel."""
    from ...operators.conv import Conv2d

    if m.padding_mode != "zeros":
        ctx.fail(node, f"padding_mode={m.padding_mode!r} (only 'zeros')")
    if len(inp.shape) != 3:
        ctx.fail(node, f"Conv2d needs a (C, H, W) input, got {inp.shape}")
    return lambda W: Conv2d(ctx.param(W), inp.shape, stride=m.stride, padding=m.padding,
                            dilation=m.dilation, groups=m.groups)


@rule(nn.Conv2d, nn.Linear)
def unit_layer(ctx: Context, node: fx.Node) -> TensorValue:
    """Conv / linear with its folded BN / multiplier chain (Eq. 7, Table D.4)."""
    from ...operators.dense import Linear

    m = ctx.module_call(node)
    inp = ctx.tensor(node, node.args[0])
    if isinstance(m, nn.Conv2d):
        make = _conv_maker(ctx, node, m, inp)
        kind = "Conv"
    else:
        if len(inp.shape) != 1:
            ctx.fail(node, f"Linear is supported on (N, F) inputs, got per-sample {inp.shape}")
        make, kind = (lambda W: Linear(ctx.param(W))), "FC"
    fold = ctx.folds.get(node) or Fold(node, ())
    W, t, has_bias = fold.apply(m.weight, m.bias)
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
    if isinstance(m, nn.BatchNorm1d) and len(inp.shape) != 1:
        ctx.fail(node, f"BatchNorm1d is supported on (N, C) inputs, got {inp.shape}")
    if m.running_mean is None or m.running_var is None:
        ctx.fail(node, "BatchNorm without running statistics (track_running_stats=False) "
                 "normalises with batch statistics even in eval mode")
    if m.num_features != inp.shape[0]:
        ctx.fail(node, f"BatchNorm over {m.num_features} features applied to "
                 f"{inp.shape[0]} channels")
    g, shift = bn_affine(m)
    lin = ctx.linear(node, inp, Scale(inp.shape, ctx.param(g)),
                     name=ctx.unique(f"{node.name}_scale"))
    return ctx.bias(node, lin, f"{node.target}.bias", shift, inp.shape, "channel", node.name)
