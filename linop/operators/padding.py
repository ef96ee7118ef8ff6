"""Spatial padding (``F.pad`` on the last two axes) as an explicit gather matrix.

Every padding mode is a separable selection (:class:`~linop.operators.separable.SeparableOperator`):
output ``(o_h, o_w)`` copies input ``(src_h(o_h), src_w(o_w))`` or, in constant mode outside the
input, is zero.  Reflect / replicate / circular padding read some inputs several times, so the
matrix has repeated columns and the adjoint *sums* the copies back (the same as torch's
``reflection_pad2d_backward`` etc.).  It is a linear ``W_l`` of seed 000's equivalent network
(Eq. 3); constant padding with a non-zero value is affine, its value being a bias.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch.nn.functional as F

from .separable import AxisTaps, SeparableOperator, _image_shape

__all__ = ["Pad2d", "pad_taps"]

MODES = ("constant", "reflect", "replicate", "circular")


def pad_taps(n: int, lo: int, hi: int, mode: str) -> AxisTaps:
    """1-D tap table of ``F.pad`` along one axis of length ``n`` (``lo`` before, ``hi`` after).

    Output ``o`` reads ``i = o - lo`` folded back into ``[0, n)``: *reflect* mirrors about the
    edge samples (``-i``, ``2(n-1) - i``; the edge is not repeated), *replicate* clamps,
    *circular* wraps (``i mod n``), *constant* reads nothing (weight 0) outside.  Negative
    ``lo`` / ``hi`` (constant mode) crop.
    """
    i = np.arange(n + lo + hi, dtype=np.int64) - lo
    weight = np.ones((i.size, 1))
    if mode == "reflect":
        i = np.abs(i)
        i = np.where(i > n - 1, 2 * (n - 1) - i, i)
    elif mode == "replicate":
        i = np.clip(i, 0, n - 1)
    elif mode == "circular":
        i = np.mod(i, n)
    else:  # constant: zero weight (not a structural entry) outside the input
        inside = (i >= 0) & (i < n)
        weight[~inside, 0] = 0.0
        i = np.where(inside, i, 0)
    return AxisTaps(i[:, None], weight, n)


class Pad2d(SeparableOperator):
    r"""``F.pad(x, pad, mode)`` on ``(C, H, W)`` tensors (the last two axes) as a linear operator.

    Parameters
    ----------
    input_shape : (C, H, W)
    pad : int or (left, right, top, bottom)
        ``F.pad``'s order for the last two axes.  Non-negative, except in constant mode
        where negative values crop (as in torch).
    mode : ``"constant"`` (zeros; ``"zeros"`` is accepted too), ``"reflect"``, ``"replicate"``
        or ``"circular"``.  torch's limits apply: reflect needs each pad ``< `` the size of
        its axis, circular ``<=``.
    value : float
        Constant-mode fill; only 0 is linear (a non-zero fill is a bias: use ``value=0`` and
        add it through the extended input ``x_b``).
    dtype : dtype

    Notes
    -----
    ``y_{c, o_h, o_w} = x_{c, s_h(o_h), s_w(o_w)}`` (zero outside in constant mode), with the
    index maps of :func:`pad_taps`: a 0/1 matrix with one entry in every row that reads an
    input (every row, except the zero border of constant mode).  Its adjoint sums the output
    entries that copied each input.
    """

    def __init__(self, input_shape: Sequence[int], pad: int | Sequence[int], mode: str = "constant",
                 value: float = 0.0, dtype: Any = np.float64):
        C, H, W = _image_shape(input_shape, "Pad2d")
        if mode == "zeros":
            mode = "constant"
        if mode not in MODES:
            raise ValueError(f"Pad2d: mode must be one of {MODES} (or 'zeros'), got {mode!r}")
        if value != 0:
            raise ValueError(f"Pad2d: value={value!r} makes constant padding affine, not linear; use value=0 and "
                             f"enter the fill as a bias")
        p = _parse_pad(pad)
        left, right, top, bottom = p
        if mode != "constant" and min(p) < 0:
            raise ValueError(f"Pad2d: pad={pad!r} must be non-negative in mode {mode!r}")
        for name, amount, size in (("left", left, W), ("right", right, W), ("top", top, H), ("bottom", bottom, H)):
            if mode == "reflect" and amount >= size:
                raise ValueError(f"Pad2d: pad {name}={amount} must be smaller than the input size {size} "
                                 f"along its axis for reflect padding (input_shape={(C, H, W)})")
            if mode == "circular" and amount > size:
                raise ValueError(f"Pad2d: pad {name}={amount} must be at most the input size {size} "
                                 f"along its axis for circular padding (input_shape={(C, H, W)})")
        if H + top + bottom < 1 or W + left + right < 1:
            raise ValueError(f"Pad2d: pad={pad!r} crops input_shape={(C, H, W)} to an empty output")
        self.pad, self.mode = p, mode
        super().__init__((C, H, W), pad_taps(H, top, bottom, mode), pad_taps(W, left, right, mode), dtype=dtype)

    def _apply(self, x):
        # torch's own padding: the same selection, exact, one fused kernel on every device
        return F.pad(x, self.pad, mode=self.mode)

    def _apply_adjoint(self, y):
        if self.mode == "constant":  # adjoint of zero-padding is cropping (and vice versa)
            return F.pad(y, tuple(-p for p in self.pad))
        return super()._apply_adjoint(y)  # copies of an input add up (index_add_)

    def __repr__(self) -> str:
        return f"<Pad2d {self.in_shape} -> {self.out_shape}, pad={self.pad}, mode={self.mode!r}>"


def _parse_pad(pad: Any) -> tuple[int, int, int, int]:
    if isinstance(pad, (int, np.integer)) and not isinstance(pad, bool):
        return (int(pad),) * 4  # type: ignore[return-value]
    try:
        vals = tuple(pad)
    except TypeError:
        raise ValueError(f"Pad2d: pad must be an int or (left, right, top, bottom), got {pad!r}") from None
    if len(vals) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        raise ValueError(f"Pad2d: pad must be an int or (left, right, top, bottom) ints, got {pad!r}")
    return tuple(int(v) for v in vals)  # type: ignore[return-value]
