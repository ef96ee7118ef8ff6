"""Structural operators of the equivalent network: bias restriction ``R_l``, channel
zero-padding, strided subsampling, slicing, flatten, scaling, identity.

These are the wiring of seed 000's equivalent model (Fig. 2, appendix C): ``R_l`` reads
layer l's slice of the extended input ``x_b`` and broadcasts it over the layer's output
(Eq. C.5–C.8); the ResNet20 shortcut at a stage change is strided subsampling ("avg-pool
with window 1, stride 2") plus zero channels (Table D.3).  Compositions (chains, sums,
stacks, whole graphs) live in :mod:`linop.operators.composite`.
"""
from __future__ import annotations

from math import prod
from typing import Any, Sequence

import numpy as np
import torch.nn.functional as F

from .base import Operator, as_shape, numpy_dtype
from .conv import as_cpu_tensor, pair

__all__ = [
    "BiasRestriction",
    "ChannelPad",
    "Subsample",
    "Slice",
    "Flatten",
    "Scale",
    "Identity",
]


class BiasRestriction(Operator):
    """Restriction-and-broadcast ``R_l`` of a bias slice into a layer's output (seed 000 Eq. C.5).

    Parameters
    ----------
    out_shape : the layer's per-sample output shape, ``(C, H, W)`` or ``(F,)``.
    mode : ``"channel"`` (one bias per channel / feature, broadcast over the remaining
        axes — conv and FC biases, folded BatchNorm), ``"scalar"`` (one value for the whole
        layer — Fixup biases) or ``"unit"`` (one value per output unit).
    bias_size, offset : optional
        With ``bias_size=M`` the operator reads ``x_b[offset : offset + m]`` of the full
        extended-input bias vector ``x_b`` (length M) — the matrix ``R_l`` of Eq. C.8;
        without it the input is just the slice (length C, 1 or prod(out_shape)).
    """

    MODES = ("channel", "scalar", "unit")

    def __init__(self, out_shape: Sequence[int], mode: str = "channel", bias_size: int | None = None,
                 offset: int = 0, dtype: Any = np.float64):
        out = as_shape(out_shape, "out_shape")
        if mode not in self.MODES:
            raise ValueError(f"BiasRestriction: mode must be one of {self.MODES}, got {mode!r}")
        m = {"channel": out[0], "scalar": 1, "unit": prod(out)}[mode]
        M = m if bias_size is None else int(bias_size)
        offset = int(offset)
        if offset < 0 or offset + m > M:
            raise ValueError(
                f"BiasRestriction: slice [{offset}, {offset + m}) (mode={mode!r}, {m} values) does not fit "
                f"bias_size={M}"
            )
        self.mode, self.offset, self.slice_len = mode, offset, m
        super().__init__((M,), out, dtype=numpy_dtype(dtype))

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.slice_len)

    def _apply(self, x):
        n = x.shape[0]
        b = x[:, self.slice]
        if self.mode == "unit":
            return b.reshape((n,) + self.out_shape).contiguous()
        if self.mode == "channel":
            b = b.reshape((n, self.out_shape[0]) + (1,) * (len(self.out_shape) - 1))
        else:
            b = b.reshape((n,) + (1,) * len(self.out_shape))
        return b.expand((n,) + self.out_shape).contiguous()

    def _apply_adjoint(self, y):
        n = y.shape[0]
        if self.mode == "unit":
            part = y.reshape(n, -1)
        elif self.mode == "channel":
            part = y.reshape(n, self.out_shape[0], -1).sum(2)
        else:
            part = y.reshape(n, -1).sum(1, keepdim=True)
        if self.slice_len == self.shape[1]:
            return part.contiguous()
        z = y.new_zeros((n, self.shape[1]))
        z[:, self.slice] = part
        return z

    def _coo(self):
        rows = np.arange(self.shape[0])
        if self.mode == "unit":
            cols = rows
        elif self.mode == "channel":
            cols = rows // (self.shape[0] // self.out_shape[0])
        else:
            cols = np.zeros_like(rows)
        return rows, cols + self.offset, np.ones(rows.size)


class ChannelPad(Operator):
    """Zero channels before/after (``F.pad`` on the channel axis; ResNet20 shortcut, Table D.3).

    ``input_shape`` is ``(C, ...)``; output ``(before + C + after, ...)``.
    """

    pinv_by_pattern = True  # at most one non-zero per row and column

    def __init__(self, input_shape: Sequence[int], before: int, after: int, dtype: Any = np.float64):
        ins = as_shape(input_shape, "input_shape")
        for name, v in (("before", before), ("after", after)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"ChannelPad: {name} must be a non-negative int, got {v!r}")
        self.before, self.after = int(before), int(after)
        super().__init__(ins, (ins[0] + self.before + self.after,) + ins[1:], dtype=numpy_dtype(dtype))

    def _apply(self, x):
        pad = (0, 0) * (len(self.in_shape) - 1) + (self.before, self.after)
        return F.pad(x, pad)

    def _apply_adjoint(self, y):
        return y[:, self.before:self.before + self.in_shape[0]].contiguous()

    def _coo(self):
        cols = np.arange(self.shape[1])
        return cols + self.before * prod(self.in_shape[1:]), cols, np.ones(cols.size)


class Subsample(Operator):
    """Strided subsampling ``x[:, o_h::s_h, o_w::s_w]`` of a ``(C, H, W)`` tensor.

    The ResNet20 shortcut's "average pooling with window 1, stride 2" (Table D.3) is
    ``Subsample(stride=(2, 2))``.
    """

    pinv_by_pattern = True  # at most one non-zero per row and column

    def __init__(self, input_shape: Sequence[int], stride: int | Sequence[int] = (2, 2),
                 offset: int | Sequence[int] = (0, 0), dtype: Any = np.float64):
        ins = as_shape(input_shape, "input_shape")
        if len(ins) != 3:
            raise ValueError(f"Subsample: input_shape must be (C, H, W), got {tuple(input_shape)}")
        s = pair(stride, "stride")
        o = pair(offset, "offset", minimum=0)
        C, H, W = ins
        if o[0] >= H or o[1] >= W:
            raise ValueError(f"Subsample: offset={o} must be smaller than the spatial size {(H, W)}")
        self.stride, self.offset = s, o
        Ho, Wo = -(-(H - o[0]) // s[0]), -(-(W - o[1]) // s[1])
        super().__init__(ins, (C, Ho, Wo), dtype=numpy_dtype(dtype))

    def _apply(self, x):
        (sh, sw), (oh, ow) = self.stride, self.offset
        return x[:, :, oh::sh, ow::sw].contiguous()

    def _apply_adjoint(self, y):
        (sh, sw), (oh, ow) = self.stride, self.offset
        z = y.new_zeros((y.shape[0],) + self.in_shape)
        z[:, :, oh::sh, ow::sw] = y
        return z

    def _coo(self):
        C, H, W = self.in_shape
        _, Ho, Wo = self.out_shape
        c, i, j = np.meshgrid(np.arange(C), np.arange(Ho), np.arange(Wo), indexing="ij")
        cols = (c * H + self.offset[0] + i * self.stride[0]) * W + self.offset[1] + j * self.stride[1]
        return np.arange(self.shape[0]), cols.ravel(), np.ones(self.shape[0])


class Slice(Operator):
    """``x[start:stop]`` of a flat vector of length ``n`` (a coordinate selection; e.g. one
    layer's bias slice of the extended input ``x_b``, the left factor of ``R_l`` in Eq. C.8)."""

    def __init__(self, n: int, start: int, stop: int, dtype: Any = np.float64):
        vals = (n, start, stop)
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in vals) or not 0 <= start <= stop <= n:
            raise ValueError(f"Slice: need ints 0 <= start <= stop <= n, got n={n!r}, start={start!r}, stop={stop!r}")
        if stop == start:
            raise ValueError(f"Slice: the slice [{start}, {stop}) is empty")
        self.start, self.stop = int(start), int(stop)
        super().__init__((int(n),), (self.stop - self.start,), dtype=numpy_dtype(dtype))

    def _apply(self, x):
        return x[:, self.start:self.stop]

    def _apply_adjoint(self, y):
        z = y.new_zeros((y.shape[0], self.shape[1]))
        z[:, self.start:self.stop] = y
        return z

    def _coo(self):
        i = np.arange(self.shape[0])
        return i, i + self.start, np.ones(i.size)


class Identity(Operator):
    """The identity on tensors of shape ``shape``."""

    pinv_by_pattern = True  # at most one non-zero per row and column

    def __init__(self, shape: Sequence[int], dtype: Any = np.float64):
        shp = as_shape(shape, "shape")
        super().__init__(shp, shp, dtype=numpy_dtype(dtype))

    def _apply(self, x):
        return x

    _apply_adjoint = _apply

    def _coo(self):
        i = np.arange(self.shape[0])
        return i, i, np.ones(i.size)


class Flatten(Operator):
    """``(C, H, W) -> (C·H·W,)`` in C order (identity matrix; changes only the shape)."""

    pinv_by_pattern = True  # at most one non-zero per row and column

    def __init__(self, input_shape: Sequence[int], dtype: Any = np.float64):
        ins = as_shape(input_shape, "input_shape")
        super().__init__(ins, (prod(ins),), dtype=numpy_dtype(dtype))

    def _apply(self, x):
        return x.reshape(x.shape[0], -1)

    def _apply_adjoint(self, y):
        return y.reshape((y.shape[0],) + self.in_shape)

    def _coo(self):
        i = np.arange(self.shape[0])
        return i, i, np.ones(i.size)


class Scale(Operator):
    """``y = α x`` with a scalar α, or one α per channel (axis 0 of ``shape``) — e.g. a
    Fixup multiplier.  Entries with α = 0 are not stored by ``to_sparse``."""

    pinv_by_pattern = True  # at most one non-zero per row and column

    def __init__(self, shape: Sequence[int], alpha: Any):
        shp = as_shape(shape, "shape")
        a = as_cpu_tensor(alpha, "alpha").reshape(-1)
        if a.numel() == 1:
            a = a.reshape((1,) * len(shp))
        elif a.numel() == shp[0]:
            a = a.reshape((shp[0],) + (1,) * (len(shp) - 1))
        else:
            raise ValueError(f"Scale: alpha must be a scalar or have C={shp[0]} entries for shape {shp}, got {a.numel()}")
        self.alpha = a.contiguous()
        super().__init__(shp, shp, dtype=numpy_dtype(a.dtype))

    def _apply(self, x):
        return x * self._param("alpha", x)

    _apply_adjoint = _apply

    def _coo(self):
        v = np.broadcast_to(self.alpha.numpy(), self.in_shape).ravel()
        i = np.flatnonzero(v)
        return i, i, v[i]
