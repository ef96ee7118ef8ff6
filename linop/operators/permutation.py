"""Channel permutations as explicit operators (ShuffleNet's channel shuffle).

A channel permutation ``y[j] = x[π(j)]`` is an orthogonal 0/1 matrix ``P = P_π ⊗ I_S`` (``S`` the
number of entries per channel); its adjoint is its inverse, ``x[π(j)] = y[j]``.  In seed 000's
equivalent network it is a linear ``W_l`` without bias, the identity being exact through it.
"""
from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

import numpy as np
import torch

from .base import Operator, as_shape, numpy_dtype

__all__ = ["ChannelPermutation", "ChannelShuffle"]


class ChannelPermutation(Operator):
    """``y[:, j] = x[:, perm[j]]`` on ``(C, ...)`` tensors.

    Parameters
    ----------
    input_shape : (C, ...)
    perm : sequence of int
        A permutation of ``range(C)``: output channel ``j`` is input channel ``perm[j]``.
    dtype : dtype

    Notes
    -----
    ``P[(j, s), (perm[j], s)] = 1``: one entry per row and per column, ``Pᵀ = P⁻¹``.
    """

    def __init__(self, input_shape: Sequence[int], perm: Sequence[int], dtype: Any = np.float64):
        ins = as_shape(input_shape, "input_shape")
        p = np.asarray(perm)
        if p.ndim != 1 or p.size != ins[0] or not np.issubdtype(p.dtype, np.integer) \
                or not np.array_equal(np.sort(p), np.arange(ins[0])):
            raise ValueError(f"{type(self).__name__}: perm must be a permutation of range({ins[0]}) "
                             f"(C of input_shape={ins}), got {perm!r}")
        self.perm = torch.from_numpy(p.astype(np.int64))
        self.inverse = torch.argsort(self.perm)
        super().__init__(ins, ins, dtype=numpy_dtype(dtype))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self._index("perm", x))

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y.index_select(1, self._index("inverse", y))

    def _coo(self):
        S = prod(self.in_shape[1:])
        n = self.shape[0]
        rows = np.arange(n)
        cols = self.perm.numpy()[rows // S] * S + rows % S
        return rows, cols, np.ones(n)


class ChannelShuffle(ChannelPermutation):
    """``nn.ChannelShuffle(groups)`` (ShuffleNet): view ``(g, C/g)``, transpose, flatten.

    Parameters
    ----------
    input_shape : (C, ...)
        ``C`` divisible by ``groups``.
    groups : int
    dtype : dtype

    Notes
    -----
    Output channel ``j = a·g + b`` (``0 ≤ b < g``) is input channel ``b·(C/g) + a``, i.e.
    ``perm[j] = (j mod g)·(C/g) + ⌊j/g⌋``.
    """

    def __init__(self, input_shape: Sequence[int], groups: int, dtype: Any = np.float64):
        ins = as_shape(input_shape, "input_shape")
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1 or ins[0] % groups:
            raise ValueError(f"ChannelShuffle: groups must be a positive int dividing C={ins[0]}, got {groups!r}")
        self.groups = int(groups)
        j = np.arange(ins[0])
        super().__init__(ins, (j % self.groups) * (ins[0] // self.groups) + j // self.groups, dtype=dtype)
