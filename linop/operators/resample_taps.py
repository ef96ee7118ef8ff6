"""1-D tap tables of torch's resampling kernels (CPU): adaptive pooling windows, nearest /
linear / cubic interpolation, anti-aliased (PIL-style) interpolation, and the window gather of
uneven adaptive max pooling.  Each returns an :class:`~linop.operators.separable.AxisTaps`;
:mod:`linop.operators.resample` builds the 2-D operators from two of them.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .separable import AxisTaps

__all__ = ["CUBIC_A", "adaptive_taps", "antialias_taps", "cubic_weights", "interpolate_taps",
           "window_gather_taps"]

_F32 = np.float32
#: torch's cubic-convolution coefficient (Keys 1981 with A = -0.75, as in OpenCV / TensorFlow)
CUBIC_A = -0.75


def cubic_weights(t: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    """The four weights ``(w_{-1}, w_0, w_1, w_2)`` of the taps at ``i0 − 1 … i0 + 2`` for the
    fraction ``t = r − i0`` (torch's ``get_cubic_upsample_coefficients``):
    ``K(s) = ((a+2)s − (a+3))s² + 1`` for ``|s| ≤ 1`` and ``((as − 5a)s + 8a)s − 4a`` for
    ``1 < |s| < 2``, at ``s = t+1, t, 1−t, 2−t``.  They sum to 1 for every ``t``."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


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


def antialias_taps(n_in: int, n_out: int, mode: str, align_corners: bool = False,
                   scale: float | None = None) -> AxisTaps:
    """Tap table of 1-D ``F.interpolate(..., antialias=True)`` (torch's CPU ``_upsample_*_aa``,
    the PIL scheme) for ``mode`` ``"linear"`` or ``"cubic"``.

    With ``s`` torch's scale (``n_in / n_out``, ``1 / scale_factor``, or ``(n_in-1)/(n_out-1)``
    with ``align_corners``), the filter is stretched by ``max(s, 1)``: support
    ``σ = (K/2)·max(s, 1)`` (``K`` = 2 taps for linear, 4 for cubic).  Output ``o`` centred at
    ``c = s·(o + ½)`` reads inputs ``j ∈ [x_min, x_max)``, ``x_min = max(⌊c − σ + ½⌋, 0)``,
    ``x_max = min(⌊c + σ + ½⌋, n_in)`` (at most ``2⌈σ⌉ + 1``), weights
    ``f((j − c + ½) / max(s, 1))`` normalised to sum 1, where ``f`` is the triangle ``1 − |x|``
    (linear) or the Keys kernel with ``A = −0.5`` (cubic; not the −0.75 of plain bicubic).
    """
    if mode not in ("linear", "cubic"):
        raise ValueError(f"antialias_taps: mode must be linear or cubic, got {mode!r}")
    if align_corners:
        s = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
        s = _scale_value(scale, n_in, n_out, float)
    half = 1.0 if mode == "linear" else 2.0
    support = half * s if s >= 1.0 else half
    inv = 1.0 / s if s >= 1.0 else 1.0
    width = int(math.ceil(support)) * 2 + 1
    center = s * (np.arange(n_out) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xsize = np.clip(np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in) - xmin, 0, width)
    j = np.arange(width)[None, :]
    x = np.abs((j + xmin[:, None] - center[:, None] + 0.5) * inv)
    if mode == "linear":
        w = np.where(x < 1.0, 1.0 - x, 0.0)
    else:
        a = -0.5
        w = np.where(x < 1.0, ((a + 2) * x - (a + 3)) * x * x + 1,
                     np.where(x < 2.0, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
    valid = j < xsize[:, None]
    w = np.where(valid, w, 0.0)
    total = w.sum(1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    index = np.where(valid, np.minimum(xmin[:, None] + j, n_in - 1), np.minimum(xmin, n_in - 1)[:, None])
    return AxisTaps(index, w, n_in)


def interpolate_taps(n_in: int, n_out: int, mode: str, align_corners: bool = False,
                     scale: float | None = None) -> AxisTaps:
    """Tap table of 1-D ``F.interpolate`` on the CPU (torch's ``UpSample.h`` formulas).

    Parameters
    ----------
    n_in, n_out : input and output lengths.
    mode : ``"nearest"``, ``"nearest-exact"``, ``"linear"`` (one axis of bilinear), ``"cubic"``
        (one axis of bicubic) or ``"area"``.
    align_corners : bool
        Linear and cubic modes only.
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
    ``n_out == n_in`` copies.  *cubic*: ``r`` as for linear but not clamped at 0 (torch's
    ``cubic=true``), ``i0 = min(⌊float32(r)⌋, n_in-1)``, ``t = clamp(r − i0, 0, 1)``, taps
    ``clamp(i0 − 1 + j, 0, n_in − 1)``, ``j = 0..3``, weights :func:`cubic_weights` ``(t)``.
    *area*: :func:`adaptive_taps`.
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
    if mode == "cubic":
        if align_corners:
            real = ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0) * o
        else:
            real = _scale_value(scale, n_in, n_out, float) * (o + 0.5) - 0.5
        i0 = np.minimum(np.floor(real.astype(_F32)).astype(np.int64), n_in - 1)
        t = np.clip(real - i0, 0.0, 1.0)
        index = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
        return AxisTaps(index, cubic_weights(t), n_in)
    if mode != "linear":
        raise ValueError(f"interpolate_taps: mode must be nearest, nearest-exact, linear, cubic or area, got {mode!r}")
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


def window_gather_taps(n_in: int, n_out: int) -> AxisTaps:
    """Selection taps laying the adaptive windows side by side: output ``o·K + k`` reads
    ``s_o + min(k, e_o − s_o − 1)`` (``K = max_o (e_o − s_o)``; a short window repeats its last
    input)."""
    t = adaptive_taps(n_in, n_out)
    count = np.count_nonzero(t.weight, axis=1)
    k = np.minimum(np.arange(t.k)[None, :], count[:, None] - 1)
    index = t.index[:, :1] + k
    return AxisTaps(index.reshape(-1, 1), np.ones((index.size, 1)), n_in)
