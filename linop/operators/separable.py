"""Separable spatial operators ``y[c] = M_h · x[c] · M_wᵀ`` given by per-axis tap tables.

Adaptive average pooling, nearest / bilinear / area resampling and reflect / replicate /
circular / zero padding all act on each channel's ``(H, W)`` plane as a product of two 1-D
matrices, ``M_h`` (``H_out × H``) along the rows and ``M_w`` (``W_out × W``) along the columns.
On the flattened ``(C, H, W)`` tensor (C order) the layer matrix is the Kronecker product

.. math::

    A = I_C \\otimes M_h \\otimes M_w ,
    \\qquad A_{(c, o_h, o_w), (c, i_h, i_w)} = (M_h)_{o_h i_h} (M_w)_{o_w i_w},

and its adjoint is ``I_C ⊗ M_hᵀ ⊗ M_wᵀ``.  Each 1-D matrix is stored as a *tap table*: every
output ``o`` reads ``K`` inputs ``index[o, k]`` with weights ``weight[o, k]`` (rows with fewer
taps are padded with zero weights); the explicit CSR is built from it.  The torch path maps one
axis at a time: a selection axis (one tap of weight 1: nearest resampling, padding) is an
``index_select`` (adjoint: ``index_add_``, so copies add up), any other axis a product with the
small dense 1-D matrix (``n_out × n_in``; BLAS beats a K-tap gather, and the zeros it multiplies
add exactly nothing for finite data).  No loops over pixels.

These are all linear maps; in seed 000's equivalent network (Eq. 3, appendix C) such a layer is
a ``W_l`` with no bias (``R_l = 0``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse
import torch

from .base import Operator, as_shape, numpy_dtype
from .conv import check_sparse_size, finish_csr

__all__ = ["AxisTaps", "SeparableOperator"]


class AxisTaps:
    """A 1-D linear map ``M`` (``n_out × n_in``) as a tap table.

    Parameters
    ----------
    index : int array, shape ``(n_out, K)``
        Input position read by tap ``k`` of output ``o`` (``0 <= index < n_in``).
    weight : float array, shape ``(n_out, K)``
        Its weight; ``M[o, i] = Σ_k weight[o, k] · [index[o, k] == i]`` (repeated indices add).
        Zero weights pad short rows and are not structural entries of ``M``.
    n_in : int
        Input length.
    """

    def __init__(self, index: np.ndarray, weight: np.ndarray, n_in: int):
        index = np.asarray(index, dtype=np.int64)
        weight = np.asarray(weight, dtype=np.float64)
        if index.ndim != 2 or index.shape != weight.shape or index.shape[0] < 1 or index.shape[1] < 1:
            raise ValueError(f"AxisTaps: index and weight must be equal non-empty (n_out, K) arrays, "
                             f"got {index.shape} and {weight.shape}")
        if int(n_in) < 1 or index.min() < 0 or index.max() >= n_in:
            raise ValueError(f"AxisTaps: index must lie in [0, n_in={n_in})")
        self.index, self.weight, self.n_in = index, weight, int(n_in)
        self.n_out, self.k = index.shape
        # one tap of weight 1 per output: a pure gather (selection, padding)
        self.unit = self.k == 1 and bool(np.all(weight == 1.0))

    def matrix(self) -> scipy.sparse.csr_matrix:
        """``M`` as canonical CSR, structural non-zeros only (duplicates summed, zeros dropped)."""
        rows = np.repeat(np.arange(self.n_out), self.k)
        M = scipy.sparse.csr_matrix((self.weight.ravel(), (rows, self.index.ravel())),
                                    shape=(self.n_out, self.n_in))
        M.sum_duplicates()
        M.eliminate_zeros()
        M.sort_indices()
        return M


def _as3d(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` viewed as ``(before, n, after)`` around ``dim`` (2-D ``(before, n)`` when ``dim`` is
    last): torch's ``index_select`` / ``index_add_`` are several times faster on these views than
    on an inner axis of a 4-D tensor."""
    before = int(np.prod(t.shape[:dim], dtype=np.int64))
    if dim == t.dim() - 1:
        return t.reshape(before, t.shape[dim])
    return t.reshape(before, t.shape[dim], -1)


def _select(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``y[.., o, ..] = x[.., index[o], ..]`` along ``dim`` (a unit-tap axis)."""
    shape = list(x.shape)
    shape[dim] = index.shape[0]
    return _as3d(x, dim).index_select(1, index).reshape(shape)


def _select_adjoint(y: torch.Tensor, dim: int, index: torch.Tensor, n_in: int) -> torch.Tensor:
    """Adjoint of :func:`_select`: ``z[.., i, ..] = Σ_{o: index[o]=i} y[.., o, ..]`` (copies add up)."""
    shape = list(y.shape)
    shape[dim] = n_in
    z = _as3d(y.new_zeros(shape), dim)
    return z.index_add_(1, index, _as3d(y, dim)).reshape(shape)


class SeparableOperator(Operator):
    """``I_C ⊗ M_h ⊗ M_w`` on ``(C, H, W)`` tensors, from two :class:`AxisTaps`.

    Parameters
    ----------
    input_shape : (C, H, W)
    taps_h, taps_w : AxisTaps
        The row map ``M_h`` (``n_in = H``) and the column map ``M_w`` (``n_in = W``).
    dtype : dtype
        Nominal dtype (``apply`` computes in the dtype of its input; the weights are held
        in float64 and cast once per dtype / device).

    Notes
    -----
    ``apply`` maps along W, then along H (the order torch's separable CPU kernels use);
    ``apply_adjoint`` runs the transposed steps in reverse order.  Data with inf / NaN would
    spread through the dense-axis products (``0 · inf``) where torch's kernels skip the zero
    taps; the library's data are finite.  ``to_sparse`` is
    ``kron(I_C, kron(M_h, M_w))`` of the two canonical 1-D CSR matrices, so it stores exactly
    ``C · nnz(M_h) · nnz(M_w)`` entries.
    """

    def __init__(self, input_shape: Sequence[int], taps_h: AxisTaps, taps_w: AxisTaps, dtype: Any = np.float64):
        C, H, W = _image_shape(input_shape, type(self).__name__)
        if taps_h.n_in != H or taps_w.n_in != W:
            raise ValueError(f"{type(self).__name__}: tap tables read lengths ({taps_h.n_in}, {taps_w.n_in}), "
                             f"input_shape has (H, W) = ({H}, {W})")
        self.taps_h, self.taps_w = taps_h, taps_w
        # selection axes keep their index; weighted axes their (small) dense 1-D matrix
        self.select_h = torch.from_numpy(taps_h.index[:, 0].copy()) if taps_h.unit else None
        self.select_w = torch.from_numpy(taps_w.index[:, 0].copy()) if taps_w.unit else None
        self.dense_h = None if taps_h.unit else torch.from_numpy(taps_h.matrix().toarray())
        self.dense_w = None if taps_w.unit else torch.from_numpy(taps_w.matrix().toarray())
        super().__init__((C, H, W), (C, taps_h.n_out, taps_w.n_out), dtype=numpy_dtype(dtype))

    # ------------------------------------------------------------------ torch path
    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        # along W, then along H: a gather for selection axes, else a product with the small
        # dense 1-D matrix (BLAS beats a K-tap gather; the zeros it adds are exact)
        if self.taps_w.unit:
            t = _select(x, 3, self._index("select_w", x))
        else:
            t = x @ self._param("dense_w", x).mT
        if self.taps_h.unit:
            return _select(t, 2, self._index("select_h", x))
        return torch.matmul(self._param("dense_h", x), t)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        _, H, W = self.in_shape
        if self.taps_h.unit:
            t = _select_adjoint(y, 2, self._index("select_h", y), H)
        else:
            t = torch.matmul(self._param("dense_h", y).mT, y)
        if self.taps_w.unit:
            return _select_adjoint(t, 3, self._index("select_w", y), W)
        return t @ self._param("dense_w", y)

    # ------------------------------------------------------------------ sparse form
    @property
    def nnz(self) -> int:
        """Entries ``to_sparse()`` stores: ``C · nnz(M_h) · nnz(M_w)``."""
        return self.in_shape[0] * self.taps_h.matrix().nnz * self.taps_w.matrix().nnz

    def to_sparse(self, gpu: bool = False, dtype: Any = None, max_bytes: int | None = None):
        """Explicit CSR ``kron(I_C, kron(M_h, M_w))`` (canonical: sorted, no duplicates, no zeros).

        Parameters
        ----------
        gpu : bool
            Return a ``cupyx.scipy.sparse.csr_matrix``.
        dtype : dtype, optional
            Value dtype (default: the operator's).
        max_bytes : int, optional
            Refuse (``MemoryError``, before allocating) matrices larger than this.
        """
        dt = numpy_dtype(dtype) if dtype is not None else self.dtype
        Mh, Mw = self.taps_h.matrix(), self.taps_w.matrix()
        check_sparse_size(type(self).__name__, self.in_shape[0] * Mh.nnz * Mw.nnz, self.shape[0], dt, max_bytes)
        block = scipy.sparse.kron(Mh, Mw, format="csr")
        A = scipy.sparse.kron(scipy.sparse.identity(self.in_shape[0], format="csr"), block, format="csr").astype(dt)
        A.sum_duplicates()
        A.eliminate_zeros()  # a product of non-zeros cannot vanish unless it underflows
        A.sort_indices()
        return finish_csr(A, gpu)

    def _coo(self):
        A = self.to_sparse().tocoo()
        return A.row, A.col, A.data


def _image_shape(shape: Sequence[int], who: str) -> tuple[int, int, int]:
    s = as_shape(shape, "input_shape")
    if len(s) != 3:
        raise ValueError(f"{who}: input_shape must be (C, H, W), got {tuple(shape)}")
    return s  # type: ignore[return-value]
