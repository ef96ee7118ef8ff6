"""Honest refusals: ops that are *not* piecewise linear.

Seed 000's identity ``<[x; x_b], H> = c`` (appendix C) is exact because every unit of a
piecewise-linear network is an affine function of ``[x; x_b]`` on its activation region.  A
smooth activation (GELU, SiLU, Mish, ELU, Softplus, Hardswish — a product ``x·relu6(x+3)/6``)
or a normalisation by statistics of the sample itself (LayerNorm, GroupNorm, softmax) has no
such region, so no hypersurface reproduces ``c`` exactly: these are refused with kind
:data:`~linop.convert.errors.NOT_PIECEWISE_LINEAR`, listed apart from ops that are merely not
implemented.  (``tanh`` / ``sigmoid`` are the exception: converted for seed 001's smooth
baselines, see :mod:`.activation`.)

Piecewise-linear ops with breakpoints off zero (``ReLU6``, ``Hardtanh``, ``Hardsigmoid``,
``clamp``, ``maximum`` / ``minimum``) are converted exactly by :mod:`.breakpoint`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..context import Context
from ..errors import NOT_PIECEWISE_LINEAR
from ..registry import rule

# op -> why it is not piecewise linear (the message names it; the shared reason is in errors)
_SMOOTH = {
    "GELU": (nn.GELU, F.gelu), "SiLU": (nn.SiLU, F.silu), "Mish": (nn.Mish, F.mish),
    "ELU": (nn.ELU, F.elu, F.elu_), "CELU": (nn.CELU, F.celu), "SELU": (nn.SELU, F.selu),
    "Softplus": (nn.Softplus, F.softplus), "Hardswish": (nn.Hardswish, F.hardswish),
    "LogSigmoid": (nn.LogSigmoid, F.logsigmoid), "Softsign": (nn.Softsign, F.softsign),
}
_NORMALISING = {
    "LayerNorm": (nn.LayerNorm, F.layer_norm), "GroupNorm": (nn.GroupNorm, F.group_norm),
    "InstanceNorm": (nn.InstanceNorm1d, nn.InstanceNorm2d, F.instance_norm),
    "softmax": (nn.Softmax, nn.Softmax2d, F.softmax, torch.softmax, "softmax"),
    "log_softmax": (nn.LogSoftmax, F.log_softmax, torch.log_softmax, "log_softmax"),
    "softmin": (nn.Softmin, F.softmin),
}


def _refuse(name: str, why: str):
    def handler(ctx: Context, node: fx.Node):
        ctx.fail(node, f"{name} is {why}", kind=NOT_PIECEWISE_LINEAR)
    handler.__qualname__ = handler.__name__ = f"refuse_{name}"
    return handler


for _name, _targets in _SMOOTH.items():
    rule(*_targets)(_refuse(_name, "smooth (curved everywhere), not piecewise linear"))
for _name, _targets in _NORMALISING.items():
    rule(*_targets)(_refuse(_name, "a normalisation by statistics of the sample itself "
                            "(a ratio of functions of x), not piecewise linear"))

