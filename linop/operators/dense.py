"""Fully connected layer ``y = W x`` (no bias) as an explicit linear operator.

The FC layer of seed 000 (``w_L`` in Eq. C.8; RM0 maps one of its rows back) and the
small "kConv + mFC" nets of seed 001 (whose reverse step solves MDP/CCP with this ``W``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import Operator, numpy_dtype
from .conv import as_cpu_tensor, check_sparse_size

__all__ = ["Linear"]


class Linear(Operator):
    """Dense matrix ``W`` of shape ``(out, in)``: in_shape ``(in,)``, out_shape ``(out,)``.

    Parameters
    ----------
    weight : array or tensor, shape ``(out_features, in_features)``

    Notes
    -----
    ``to_sparse()`` stores every entry of ``W``, zeros included (a dense layer has a dense
    structural pattern; exact zeros of trained weights are kept as structural entries).
    """

    def __init__(self, weight: Any):
        w = as_cpu_tensor(weight, "weight")
        if w.dim() != 2:
            raise ValueError(f"Linear: weight must have shape (out_features, in_features), got {tuple(w.shape)}")
        if min(w.shape) < 1:
            raise ValueError(f"Linear: weight has an empty dimension, shape {tuple(w.shape)}")
        self.weight = w
        super().__init__((w.shape[1],), (w.shape[0],), dtype=numpy_dtype(w.dtype))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self._param("weight", x).T

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self._param("weight", y)

    def _coo(self):
        n_out, n_in = self.shape
        check_sparse_size("Linear", n_out * n_in, n_out, self.dtype, None)
        rows = np.repeat(np.arange(n_out), n_in)
        cols = np.tile(np.arange(n_in), n_out)
        return rows, cols, self.weight.numpy().ravel()
