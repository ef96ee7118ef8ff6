"""Resampling layers as explicit linear operators: adaptive average pooling and upsampling.

Both are separable (:class:`~linop.operators.separable.SeparableOperator`): each builds one
1-D tap table per spatial axis that reproduces torch's CPU index / weight formulas, including
their single-precision quirks, so the matrix equals what ``nn.AdaptiveAvgPool2d`` and
``F.interpolate`` compute.

* :class:`AdaptiveAvgPool2d` — output ``i`` averages inputs ``[⌊iH/H_o⌋, ⌈(i+1)H/H_o⌉)``
  (uneven windows; overlapping when ``H_o ∤ H``; repeated inputs when ``H_o > H``, e.g. the
  1×1 → 7×7 of torchvision's VGG / AlexNet at CIFAR size).
* :class:`Upsample2d` — ``F.interpolate`` with ``mode`` ``"nearest"``, ``"nearest-exact"``,
  ``"bilinear"`` (``align_corners`` both ways) or ``"area"``, given ``size`` or
  ``scale_factor`` (with torch's ``recompute_scale_factor`` semantics).

Each is a linear layer ``W_l`` of seed 000's equivalent network (Eq. 3) with no bias.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .separable import AxisTaps, SeparableOperator, _image_shape

__all__ = ["AdaptiveAvgPool2d", "Upsample2d", "adaptive_taps", "interpolate_taps"]

_F32 = np.float32


# --------------------------------------------------------------------------- 1-D tap tables
def adaptive_taps(n_in: int, n_out: int) -> AxisTaps:
    """Tap table of 1-D adaptive average pooling (torch's ``start_index`` / ``end_index``).

    Output ``o`` averages ``x[s_o : e_o]`` with ``s_o = ⌊o·n_in / n_out⌋`` and
    ``e_o = ⌈(o+1)·n_in / n_out⌉`` (integer arithmetic, exact), i.e. weight ``1 / (e_o - s_o)``.
    """
    o = np.arange(n_out, dtype=np.int64)
    start = (o * n_in) // n_out
    end = ((o + 1) * n_in + n_out - 1) // n_out
    count = end - start
    k = np.arange(int(count.max()))
    valid = k[None, :] < count[:, None]
    index = np.where(valid, start[:, None] + k[None, :], start[:, None])
    weight = np.where(valid, 1.0 / count[:, None], 0.0)
    return AxisTaps(index, weight, n_in)


def _scale_value(scale: float | None, n_in: int, n_out: int, dtype) -> Any:
    """torch's ``compute_scales_value``: ``1/scale_factor`` when one was given (and is used),
    else ``n_in / n_out`` — evaluated in ``dtype`` (float32 for nearest, double for linear)."""
    if scale is not None and scale > 0:
        return dtype(1.0 / scale)
    return dtype(n_in) / dtype(n_out)


def interpolate_taps(n_in: int, n_out: int, mode: str, align_corners: bool = False,
                     scale: float | None = None) -> AxisTaps:
    """Tap table of 1-D ``F.interpolate`` on the CPU (torch's ``UpSample.h`` formulas).

    Parameters
    ----------
    n_in, n_out : input and output lengths.
    mode : ``"nearest"``, ``"nearest-exact"``, ``"linear"`` (one axis of bilinear) or ``"area"``.
    align_corners : bool
        Linear mode only.
    scale : float, optional
        The user's scale factor when torch uses it (``scale_factor`` given and
        ``recompute_scale_factor`` not set); ``None`` when the ratio comes from the sizes.

    Notes
    -----
    *nearest*: ``src = min(⌊o·s⌋, n_in-1)`` with ``s`` and the product in **float32**
    (torch's ``nearest_neighbor_compute_source_index``), except that torch copies when
    ``n_out == n_in`` and uses ``o >> 1`` when ``n_out == 2·n_in`` — whatever the scale factor.
    *nearest-exact*: ``src = min(⌊(o + ½)·s⌋, n_in-1)`` in float32, no special cases.
    *linear*: ``r = s·o`` (align_corners, ``s = (n_in-1)/(n_out-1)``) or
    ``r = max(s·(o+½) - ½, 0)`` in double; ``i0 = min(⌊float32(r)⌋, n_in-1)`` (torch floors with
    ``floorf``), ``λ1 = clamp(r - i0, 0, 1)``, ``i1 = i0 + [i0 < n_in-1]``, ``λ0 = 1 - λ1``;
    ``n_out == n_in`` copies.  *area*: :func:`adaptive_taps`.
    """
    o = np.arange(n_out, dtype=np.int64)
    if mode == "area":
        return adaptive_taps(n_in, n_out)
    if mode in ("nearest", "nearest-exact"):
        if mode == "nearest" and n_out == n_in:
            src = o
        elif mode == "nearest" and n_out == 2 * n_in:
            src = o >> 1
        else:
            s = _scale_value(scale, n_in, n_out, _F32)
            pos = o.astype(_F32) if mode == "nearest" else o.astype(_F32) + _F32(0.5)
            src = np.minimum(np.floor(pos * s).astype(np.int64), n_in - 1)
        return AxisTaps(src[:, None], np.ones((n_out, 1)), n_in)
    if mode != "linear":
        raise ValueError(f"interpolate_taps: mode must be nearest, nearest-exact, linear or area, got {mode!r}")
    if n_out == n_in:
        return AxisTaps(np.stack([o, o], 1), np.stack([np.ones(n_out), np.zeros(n_out)], 1), n_in)
    if align_corners:
        s = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        real = s * o
    else:
        s = _scale_value(scale, n_in, n_out, float)  # no n_out > 1 guard here (torch has none)
        real = np.maximum(s * (o + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(real.astype(_F32)).astype(np.int64), n_in - 1)
    lam1 = np.clip(real - i0, 0.0, 1.0)
    i1 = i0 + (i0 < n_in - 1)
    return AxisTaps(np.stack([i0, i1], 1), np.stack([1.0 - lam1, lam1], 1), n_in)


# --------------------------------------------------------------------------- operators
def _pair_sizes(value: Any, name: str, allow_none: bool = False) -> tuple:
    items = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    out = []
    for v in items:
        if v is None and allow_none:
            out.append(None)
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1:
            out.append(int(v))
        else:
            raise ValueError(f"{name} must hold positive ints{' or None' if allow_none else ''}, got {value!r}")
    return tuple(out)


class AdaptiveAvgPool2d(SeparableOperator):
    r"""``nn.AdaptiveAvgPool2d(output_size)`` as a linear operator.

    Parameters
    ----------
    input_shape : (C, H, W)
    output_size : int or (int or None, int or None)
        ``None`` keeps that input size (like torch).
    dtype : dtype

    Notes
    -----
    .. math::

        y_{c, i, j} = \frac{1}{(e_i - s_i)(f_j - t_j)}
                      \sum_{h=s_i}^{e_i - 1} \sum_{w=t_j}^{f_j - 1} x_{c, h, w},
        \qquad s_i = \lfloor iH/H_o \rfloor,\ e_i = \lceil (i+1)H/H_o \rceil

    (and likewise ``t_j, f_j`` along W).  For ``H_o > H`` windows hold one input each and
    inputs repeat (upsampling); the adjoint then sums the copies.
    """

    def __init__(self, input_shape: Sequence[int], output_size: int | Sequence[int | None], dtype: Any = np.float64):
        C, H, W = _image_shape(input_shape, "AdaptiveAvgPool2d")
        ho, wo = _pair_sizes(output_size, "AdaptiveAvgPool2d: output_size", allow_none=True)
        self.output_size = (H if ho is None else ho, W if wo is None else wo)
        super().__init__((C, H, W), adaptive_taps(H, self.output_size[0]), adaptive_taps(W, self.output_size[1]),
                         dtype=dtype)


class Upsample2d(SeparableOperator):
    r"""``F.interpolate`` / ``nn.Upsample`` on ``(C, H, W)`` as a linear operator.

    Parameters
    ----------
    input_shape : (C, H, W)
    scale_factor : float or (float, float), optional
        Exactly one of ``scale_factor`` and ``size``.  The output size is
        ``⌊H·scale_factor⌋``; torch then interpolates with ``1/scale_factor`` unless
        ``recompute_scale_factor=True`` (or ``mode="area"``), when the ratio ``H / H_out`` is
        used — the two can pick different source pixels, and this operator follows torch.
    size : int or (int, int), optional
    mode : ``"nearest"`` (default), ``"nearest-exact"``, ``"bilinear"`` or ``"area"``.
    align_corners : bool, optional
        Only for ``"bilinear"`` (default False), as in torch.
    recompute_scale_factor : bool, optional
    dtype : dtype

    Notes
    -----
    ``y_c = M_h x_c M_wᵀ`` with the 1-D maps of :func:`interpolate_taps`; bilinear is

    .. math::

        y_{c,i,j} = \sum_{a,b \in \{0,1\}} \lambda^h_{i,a} \lambda^w_{j,b}\, x_{c, h_a(i), w_b(j)},

    nearest a selection (each output copies one input; the adjoint sums the copies).  The
    formulas are torch's **CPU** kernels; torch's CUDA nearest kernel lacks the
    ``H_out == 2·H`` shortcut, so for a non-2 scale factor that happens to double the size
    the two devices differ — this operator is the CPU one on every device.
    """

    MODES = ("nearest", "nearest-exact", "bilinear", "area")

    def __init__(
        self,
        input_shape: Sequence[int],
        scale_factor: float | Sequence[float] | None = None,
        size: int | Sequence[int] | None = None,
        mode: str = "nearest",
        align_corners: bool | None = None,
        recompute_scale_factor: bool | None = None,
        dtype: Any = np.float64,
    ):
        C, H, W = _image_shape(input_shape, "Upsample2d")
        if mode not in self.MODES:
            raise ValueError(f"Upsample2d: mode must be one of {self.MODES}, got {mode!r}")
        if align_corners is not None and mode != "bilinear":
            raise ValueError(f"Upsample2d: align_corners can only be set with mode='bilinear', got mode={mode!r}")
        if (size is None) == (scale_factor is None):
            raise ValueError("Upsample2d: give exactly one of size and scale_factor")
        if size is not None and recompute_scale_factor:
            raise ValueError("Upsample2d: recompute_scale_factor is not meaningful with an explicit size")
        if size is not None:
            out, scales = _pair_sizes(size, "Upsample2d: size"), (None, None)
        else:
            sf = tuple(scale_factor) if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * 2
            if len(sf) != 2 or not all(isinstance(s, (int, float, np.number)) and not isinstance(s, bool)
                                       and math.isfinite(s) and s > 0 for s in sf):
                raise ValueError(f"Upsample2d: scale_factor must be a positive number or a pair, got {scale_factor!r}")
            out = tuple(math.floor(n * float(s)) for n, s in zip((H, W), sf))
            if min(out) < 1:
                raise ValueError(f"Upsample2d: scale_factor={scale_factor!r} gives an empty output {out} "
                                 f"for input_shape={(C, H, W)}")
            # torch uses the user's scale unless asked to recompute it from the sizes
            use = not recompute_scale_factor and mode != "area"
            scales = tuple(float(s) for s in sf) if use else (None, None)
        self.size, self.mode = out, mode
        self.align_corners = bool(align_corners) if mode == "bilinear" else None
        self.scales = scales
        axis_mode = "linear" if mode == "bilinear" else mode
        taps = [interpolate_taps(n, m, axis_mode, bool(align_corners), s) for n, m, s in zip((H, W), out, scales)]
        super().__init__((C, H, W), taps[0], taps[1], dtype=dtype)

    def __repr__(self) -> str:
        return (f"<Upsample2d {self.in_shape} -> {self.out_shape}, mode={self.mode!r}, "
                f"align_corners={self.align_corners}, scales={self.scales}>")
