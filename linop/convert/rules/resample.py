"""Resampling: uneven adaptive average pooling and upsampling (linear layers ``W_l`` without
bias, seed 000 Eq. 3).

* ``nn.AdaptiveAvgPool2d`` / ``F.adaptive_avg_pool2d`` whose windows are uneven, overlapping
  or repeated (``H_o ∤ H``, ``H_o > H``: torchvision's VGG / AlexNet head at CIFAR size) ->
  LinearNode ``AdaptiveAvgPool2d`` (even windows keep the ``AvgPool2d`` /
  ``GlobalAvgPool2d`` mapping of :mod:`.pooling`).
* ``nn.Upsample`` (and ``UpsamplingNearest2d`` / ``UpsamplingBilinear2d``), ``F.interpolate``,
  ``F.upsample`` with mode ``nearest``, ``nearest-exact``, ``bilinear``, ``bicubic``
  (``align_corners`` both ways; ``antialias=True`` too: torch's wider, normalised filter taps)
  or ``area`` -> LinearNode ``Upsample2d``.  Interpolation of 1-D or 3-D tensors is refused.
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from ...operators.base import numpy_dtype
from ..context import Context, TensorValue
from ..registry import rule

_INTERP_ARGS = (["size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
                 "antialias"], [None, None, "nearest", None, None, False])


def adaptive_avg_uneven(ctx: Context, node: fx.Node, x: TensorValue,
                        osz: tuple[int, int]) -> TensorValue:
    """``AdaptiveAvgPool2d`` operator for windows an ordinary pool cannot express."""
    from ...operators.resample import AdaptiveAvgPool2d

    return ctx.linear(node, x, AdaptiveAvgPool2d(x.shape, osz, dtype=numpy_dtype(ctx.dtype)))


def interpolate(ctx: Context, node: fx.Node, size: Any, scale_factor: Any, mode: str,
                align_corners: Any, recompute_scale_factor: Any,
                antialias: Any) -> TensorValue:
    """``F.interpolate`` of a ``(C, H, W)`` tensor -> ``Upsample2d``."""
    from ...operators.resample import Upsample2d

    x = ctx.tensor(node, node.args[0])
    if len(x.shape) != 3:
        ctx.fail(node, f"interpolation is supported on (N, C, H, W) tensors, got per-sample "
                 f"{x.shape}")
    if mode not in Upsample2d.MODES:
        ctx.fail(node, f"mode={mode!r} on a (C, H, W) tensor (supported: {Upsample2d.MODES})")
    try:
        op = Upsample2d(x.shape, scale_factor=scale_factor, size=size, mode=mode,
                        align_corners=align_corners,
                        recompute_scale_factor=recompute_scale_factor,
                        dtype=numpy_dtype(ctx.dtype), antialias=bool(antialias))
    except ValueError as exc:
        ctx.fail(node, str(exc), ValueError)
    return ctx.linear(node, x, op)


@rule(nn.Upsample)  # UpsamplingNearest2d / UpsamplingBilinear2d inherit its forward
def upsample_module(ctx: Context, node: fx.Node) -> TensorValue:
    m = ctx.module_call(node)
    return interpolate(ctx, node, m.size, m.scale_factor, m.mode, m.align_corners,
                       m.recompute_scale_factor, False)


@rule(F.interpolate, F.upsample)
def interpolate_function(ctx: Context, node: fx.Node) -> TensorValue:
    return interpolate(ctx, node, *ctx.args(node, *_INTERP_ARGS))
