"""1-D layers (``(C, L)`` tensors) as thin adapters over the 2-D operators with ``H = 1``.

A 1-D convolution or pooling over ``L`` is the 2-D one over a ``(1, L)`` image with a ``1 × k``
window: flattening ``(C, 1, L)`` and ``(C, L)`` in C order gives the same vector, so the matrix
is *the same matrix*.  The adapters only add / drop the unit axis; every formula (taps, CSR
assembly, argmax selection) stays in :mod:`~linop.operators.conv` and
:mod:`~linop.operators.pool`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import Operator, as_shape
from .conv import Conv2d, as_cpu_tensor, sample_tensor
from .pool import AvgPool2d, MaxPool2d

__all__ = ["AvgPool1d", "Conv1d", "Lift1d", "MaxPool1d", "UnitAxis"]


def _one(value: Any, name: str, minimum: int = 1) -> int:
    """``int`` or 1-sequence -> int ``>= minimum`` (torch's 1-D argument forms)."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} (or a 1-tuple), got {value!r}")
    return int(value)


def _line_shape(shape: Sequence[int], who: str) -> tuple[int, int]:
    s = as_shape(shape, "input_shape")
    if len(s) != 2:
        raise ValueError(f"{who}: input_shape must be (C, L), got {tuple(shape)}")
    return s  # type: ignore[return-value]


class UnitAxis(Operator):
    """``(C, L) -> (C, 1, L)`` (``squeeze=False``) or back (``squeeze=True``): the identity
    matrix between the two shapes (C-order flattening is the same vector).  It lets a 1-D
    tensor enter a 2-D node of the equivalent network (max pooling of ``(C, 1, L)``) and come
    back, with no node kind of its own.

    Parameters
    ----------
    input_shape : (C, L), or (C, 1, L) with ``squeeze=True``
    squeeze : bool
    dtype : dtype
    """

    def __init__(self, input_shape: Sequence[int], squeeze: bool = False, dtype: Any = np.float64):
        s = as_shape(input_shape, "input_shape")
        if squeeze:
            if len(s) != 3 or s[1] != 1:
                raise ValueError(f"UnitAxis: with squeeze=True input_shape must be (C, 1, L), got {tuple(input_shape)}")
            out = (s[0], s[2])
        else:
            C, L = _line_shape(s, "UnitAxis")
            out = (C, 1, L)
        self.squeeze = bool(squeeze)
        super().__init__(s, out, dtype=dtype)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape((x.shape[0],) + self.out_shape)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape((y.shape[0],) + self.in_shape)

    def _coo(self):
        n = self.shape[0]
        return np.arange(n), np.arange(n), np.ones(n)


class Lift1d(Operator):
    """A 2-D operator on ``(C, 1, L)`` seen as an operator on ``(C, L)``.

    Parameters
    ----------
    op2d : Operator
        Maps ``(C, 1, L) -> (C', 1, L')``.
    """

    def __init__(self, op2d: Operator):
        if len(op2d.in_shape) != 3 or len(op2d.out_shape) != 3 or op2d.in_shape[1] != 1 or op2d.out_shape[1] != 1:
            raise ValueError(f"Lift1d: op2d must map (C, 1, L) -> (C', 1, L'), got {op2d.in_shape} -> {op2d.out_shape}")
        self.op2d = op2d
        (c, _, n), (co, _, no) = op2d.in_shape, op2d.out_shape
        super().__init__((c, n), (co, no), dtype=op2d.dtype)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.op2d._apply(x.unsqueeze(2)).squeeze(2)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.op2d._apply_adjoint(y.unsqueeze(2)).squeeze(2)

    def to_sparse(self, gpu: bool = False, dtype: Any = None, **kw):
        """The 2-D operator's CSR (the same matrix; options are passed on)."""
        return self.op2d.to_sparse(gpu=gpu, dtype=dtype, **kw)

    def _coo(self):
        return self.op2d._coo()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.in_shape} -> {self.out_shape} via {self.op2d!r}>"


class Conv1d(Lift1d):
    """``F.conv1d`` without bias: :class:`~linop.operators.conv.Conv2d` with a ``1 × k`` kernel.

    Parameters
    ----------
    weight : array or tensor, shape ``(C_out, C_in / groups, k)``
    input_shape : (C_in, L)
    stride, dilation : int or 1-tuple
    padding : int, 1-tuple, (left, right), ``"same"`` or ``"valid"``
        Zero padding (other padding modes: compose a :class:`~linop.operators.padding.Pad2d`
        on the ``(C, 1, L)`` view, or pad first).
    groups : int
    """

    def __init__(self, weight: Any, input_shape: Sequence[int], stride: int | Sequence[int] = 1,
                 padding: int | str | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1):
        w = as_cpu_tensor(weight, "weight")
        if w.dim() != 3:
            raise ValueError(f"Conv1d: weight must have shape (C_out, C_in/groups, k), got {tuple(w.shape)}")
        C, L = _line_shape(input_shape, "Conv1d")
        s, d = _one(stride, "Conv1d: stride"), _one(dilation, "Conv1d: dilation")
        if isinstance(padding, str):
            if padding == "same" and s != 1:
                raise ValueError(f"Conv1d: padding='same' is not supported for strided convolutions (stride={s})")
            pad2d: Any = padding
        elif isinstance(padding, (tuple, list)) and len(padding) == 2:
            pad2d = (0, 0, _one(padding[0], "Conv1d: padding", 0), _one(padding[1], "Conv1d: padding", 0))
        else:
            p = _one(padding, "Conv1d: padding", 0)
            pad2d = (0, 0, p, p)
        super().__init__(Conv2d(w.unsqueeze(2), (C, 1, L), stride=(1, s), padding=pad2d, dilation=(1, d), groups=groups))
        self.weight, self.stride, self.dilation, self.groups = w, s, d, self.op2d.groups
        self.padding = self.op2d.padding[2:]  # (left, right)

    @property
    def nnz(self) -> int:
        return self.op2d.nnz


class AvgPool1d(Lift1d):
    """``F.avg_pool1d``: :class:`~linop.operators.pool.AvgPool2d` with a ``1 × k`` window.

    Parameters
    ----------
    input_shape : (C, L)
    kernel_size, stride, padding : int or 1-tuple (``stride`` defaults to ``kernel_size``)
    ceil_mode, count_include_pad : bool
        As torch.
    dtype : dtype
    """

    def __init__(self, input_shape: Sequence[int], kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] | None = None, padding: int | Sequence[int] = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True, dtype: Any = np.float64):
        C, L = _line_shape(input_shape, "AvgPool1d")
        k = _one(kernel_size, "AvgPool1d: kernel_size")
        s = k if stride is None else _one(stride, "AvgPool1d: stride")
        p = _one(padding, "AvgPool1d: padding", 0)
        super().__init__(AvgPool2d((C, 1, L), (1, k), (1, s), (0, p), count_include_pad=count_include_pad,
                                   ceil_mode=ceil_mode, dtype=dtype))


class MaxPool1d(Lift1d):
    """``F.max_pool1d`` at a point ``x``: the argmax selection of :class:`~linop.operators.pool.MaxPool2d`.

    Parameters
    ----------
    x : tensor or array, shape (C, L) (or (1, C, L))
        The point the selection is taken at.
    kernel_size, stride, padding, dilation : int or 1-tuple
    ceil_mode : bool

    Attributes
    ----------
    indices : tensor (C, L_out)
        torch's ``return_indices`` (position along L of each selected input).
    """

    def __init__(self, x: Any, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, ceil_mode: bool = False):
        t = sample_tensor(x, 2, "MaxPool1d: x")
        k = _one(kernel_size, "MaxPool1d: kernel_size")
        s = k if stride is None else _one(stride, "MaxPool1d: stride")
        p, d = _one(padding, "MaxPool1d: padding", 0), _one(dilation, "MaxPool1d: dilation")
        super().__init__(MaxPool2d(t.unsqueeze(1), (1, k), (1, s), (0, p), (1, d), ceil_mode=ceil_mode))
        self.indices = self.op2d.indices.squeeze(1)

    @classmethod
    def from_indices(cls, indices: Any, input_shape: Sequence[int], dtype: Any = np.float64) -> MaxPool1d:
        """Selection from torch's 1-D ``return_indices`` (shape ``(C, L_out)``, positions along L)."""
        C, L = _line_shape(input_shape, "MaxPool1d.from_indices")
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if idx.dim() == 3 and idx.shape[0] == 1:
            idx = idx[0]
        if idx.dim() != 2:
            raise ValueError(f"MaxPool1d.from_indices: indices must have shape ({C}, L_out), got {tuple(idx.shape)}")
        op = cls.__new__(cls)
        Lift1d.__init__(op, MaxPool2d.from_indices(idx.unsqueeze(1), (C, 1, L), planar=True, dtype=dtype))
        op.indices = op.op2d.indices.squeeze(1)
        return op
