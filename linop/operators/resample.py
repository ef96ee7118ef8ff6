"""Resampling layers as explicit linear operators: adaptive average pooling and upsampling.

Both are separable (:class:`~linop.operators.separable.SeparableOperator`): each builds one
1-D tap table per spatial axis that reproduces torch's CPU index / weight formulas, including
their single-precision quirks, so the matrix equals what ``nn.AdaptiveAvgPool2d`` and
``F.interpolate`` compute.

* :class:`AdaptiveAvgPool2d` — output ``i`` averages inputs ``[⌊iH/H_o⌋, ⌈(i+1)H/H_o⌉)``
  (uneven windows; overlapping when ``H_o ∤ H``; repeated inputs when ``H_o > H``, e.g. the
  1×1 → 7×7 of torchvision's VGG / AlexNet at CIFAR size).
* :class:`AdaptiveWindows` — the windows of an uneven ``nn.AdaptiveMaxPool2d`` laid side by
  side (a selection), so that an ordinary max pool after it is the adaptive max pool.
* :class:`Upsample2d` — ``F.interpolate`` with ``mode`` ``"nearest"``, ``"nearest-exact"``,
  ``"bilinear"``, ``"bicubic"`` (``align_corners`` both ways; ``antialias`` for the last two)
  or ``"area"``, given ``size`` or ``scale_factor`` (with torch's ``recompute_scale_factor``
  semantics).  Bicubic is linear in the input too: four taps per axis with the Keys
  cubic-convolution weights (``A = −0.75``), border taps clamped to the edge (they add up on
  the edge pixel).

The 1-D tap tables are in :mod:`linop.operators.resample_taps`.

Each is a linear layer ``W_l`` of seed 000's equivalent network (Eq. 3) with no bias.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .resample_taps import (CUBIC_A, adaptive_taps, antialias_taps, cubic_weights,  # noqa: F401
                            interpolate_taps, window_gather_taps)
from .separable import SeparableOperator, _image_shape

__all__ = ["AdaptiveAvgPool2d", "AdaptiveWindows", "Upsample2d", "CUBIC_A", "adaptive_taps", "antialias_taps",
           "cubic_weights", "interpolate_taps", "window_gather_taps"]


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


class AdaptiveWindows(SeparableOperator):
    r"""The windows of ``nn.AdaptiveMaxPool2d(output_size)`` laid side by side: a selection.

    Output ``(c, i·K_h + a, j·K_w + b)`` copies input ``(c, s_i + min(a, e_i − s_i − 1),
    t_j + min(b, f_j − t_j − 1))`` with torch's adaptive windows ``[s_i, e_i) × [t_j, f_j)``
    (:func:`adaptive_taps`) and ``K`` the largest window along each axis.  A max pool with
    kernel = stride = ``(K_h, K_w)`` of the result is the adaptive max pool, exactly: every
    ``K_h × K_w`` block holds its window's inputs, a short window's last one repeated, and a
    max ignores repeats.  So uneven, overlapping adaptive max pooling enters the equivalent
    network as this linear gather followed by an ordinary max pool node, whose argmax
    selection composed with this gather is the selection of the window's argmax (the same
    Jacobian rule as every max pool, seed 000 appendix C).

    Parameters
    ----------
    input_shape : (C, H, W)
    output_size : int or (int or None, int or None)
    dtype : dtype
    """

    def __init__(self, input_shape: Sequence[int], output_size: int | Sequence[int | None], dtype: Any = np.float64):
        C, H, W = _image_shape(input_shape, "AdaptiveWindows")
        ho, wo = _pair_sizes(output_size, "AdaptiveWindows: output_size", allow_none=True)
        self.output_size = (H if ho is None else ho, W if wo is None else wo)
        th, tw = window_gather_taps(H, self.output_size[0]), window_gather_taps(W, self.output_size[1])
        self.kernel_size = (th.n_out // self.output_size[0], tw.n_out // self.output_size[1])
        super().__init__((C, H, W), th, tw, dtype=dtype)


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
    mode : ``"nearest"`` (default), ``"nearest-exact"``, ``"bilinear"``, ``"bicubic"`` or ``"area"``.
    align_corners : bool, optional
        Only for ``"bilinear"`` and ``"bicubic"`` (default False), as in torch.
    recompute_scale_factor : bool, optional
    dtype : dtype
    antialias : bool
        Bilinear / bicubic only: torch's anti-aliased taps (:func:`antialias_taps`; when
        downsampling the filter widens with the scale, so every input contributes).

    Notes
    -----
    ``y_c = M_h x_c M_wᵀ`` with the 1-D maps of :func:`interpolate_taps`; bilinear is

    .. math::

        y_{c,i,j} = \sum_{a,b \in \{0,1\}} \lambda^h_{i,a} \lambda^w_{j,b}\, x_{c, h_a(i), w_b(j)},

    bicubic the same sum over ``a, b ∈ {−1, 0, 1, 2}`` with the cubic weights of
    :func:`cubic_weights` (edge taps clamped), nearest a selection (each output copies one
    input; the adjoint sums the copies).  The
    formulas are torch's **CPU** kernels; torch's CUDA nearest kernel lacks the
    ``H_out == 2·H`` shortcut, so for a non-2 scale factor that happens to double the size
    the two devices differ — this operator is the CPU one on every device.
    """

    MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
    _AXIS_MODE = {"bilinear": "linear", "bicubic": "cubic"}

    def __init__(
        self,
        input_shape: Sequence[int],
        scale_factor: float | Sequence[float] | None = None,
        size: int | Sequence[int] | None = None,
        mode: str = "nearest",
        align_corners: bool | None = None,
        recompute_scale_factor: bool | None = None,
        dtype: Any = np.float64,
        antialias: bool = False,
    ):
        C, H, W = _image_shape(input_shape, "Upsample2d")
        if antialias and mode not in self._AXIS_MODE:
            raise ValueError(f"Upsample2d: antialias=True needs mode='bilinear' or 'bicubic' (like torch), got {mode!r}")
        if mode not in self.MODES:
            raise ValueError(f"Upsample2d: mode must be one of {self.MODES}, got {mode!r}")
        if align_corners is not None and mode not in self._AXIS_MODE:
            raise ValueError(f"Upsample2d: align_corners can only be set with mode='bilinear' or 'bicubic', "
                             f"got mode={mode!r}")
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
        self.align_corners = bool(align_corners) if mode in self._AXIS_MODE else None
        self.scales = scales
        axis_mode = self._AXIS_MODE.get(mode, mode)
        self.antialias = bool(antialias)
        make = antialias_taps if antialias else interpolate_taps
        taps = [make(n, m, axis_mode, bool(align_corners), s) for n, m, s in zip((H, W), out, scales)]
        super().__init__((C, H, W), taps[0], taps[1], dtype=dtype)

    def __repr__(self) -> str:
        return (f"<Upsample2d {self.in_shape} -> {self.out_shape}, mode={self.mode!r}, "
                f"align_corners={self.align_corners}, scales={self.scales}"
                + (", antialias=True>" if self.antialias else ">"))
