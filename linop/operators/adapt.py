"""The one edge adapter: whatever a user passes as a linear map becomes an :class:`Operator`.

Functions that take a linear map ``W`` (the reverse step :func:`linop.solvers.solve`, the
dense factorisation :class:`linop.solvers.DenseSolver`, ...) call :func:`as_operator` once at
their edge and then work with one type.  Accepted inputs:

==========================================  ==============================================
input                                        result
==========================================  ==============================================
a linop :class:`Operator`                     itself (no copy)
dense 2-D numpy array / torch tensor / cupy   :class:`MatrixOperator` (dense storage)
scipy / cupyx sparse matrix (or sparray)      :class:`MatrixOperator` (CSR storage)
any ``scipy.sparse.linalg.LinearOperator``    :class:`LinearOperatorAdapter`
==========================================  ==============================================

Both new classes exist in the three agreeing forms of every operator (batched torch
``apply``/``apply_adjoint``, scipy ``matvec``/``rmatvec``, explicit CSR ``to_sparse()``), so
``dottest`` applies to them.  The matrix ``M`` of shape ``(m, n)`` acts on flat vectors
(``in_shape = (n,)``, ``out_shape = (m,)``) unless per-sample shapes are given (a
``LinearOperator`` carrying ``in_shape`` / ``out_shape`` attributes keeps them).

:func:`dense_array` and :func:`scipy_form` give the explicit host forms that the dense
factorisation and scipy's LSMR / LSQR want, without densifying what is already explicit.
"""
from __future__ import annotations

import warnings
from math import prod
from typing import Any, Sequence

import numpy as np
import scipy.sparse
import scipy.sparse.linalg as spla
import torch

from .. import backend
from .base import Operator
from .conv import check_sparse_size

__all__ = ["as_operator", "MatrixOperator", "LinearOperatorAdapter", "dense_array", "scipy_form"]


def _is_sparse(W: Any) -> bool:
    return scipy.sparse.issparse(W) or (backend.is_cupy(W) and hasattr(W, "tocsr"))


def _is_dense(W: Any) -> bool:
    return isinstance(W, (np.ndarray, torch.Tensor)) or (backend.is_cupy(W) and not hasattr(W, "tocsr"))


def _real_dtype(dtype: Any, name: str) -> np.dtype:
    """The operator dtype of a matrix: float32/float64 kept, integers/bool promoted to float64."""
    dt = np.dtype(str(dtype).replace("torch.", "")) if isinstance(dtype, torch.dtype) else np.dtype(dtype)
    if np.issubdtype(dt, np.complexfloating):
        # every consumer computes in a real dtype: the imaginary part would be dropped silently
        raise ValueError(f"{name} must be real, got dtype {dt}")
    return dt if dt in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float64)


def _shapes(m: int, n: int, in_shape: Sequence[int] | None, out_shape: Sequence[int] | None,
            name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ins = (n,) if in_shape is None else tuple(int(s) for s in in_shape)
    outs = (m,) if out_shape is None else tuple(int(s) for s in out_shape)
    if prod(ins) != n or prod(outs) != m:
        raise ValueError(f"{name}: in_shape {ins} / out_shape {outs} do not match the matrix shape {(m, n)}")
    return ins, outs


class MatrixOperator(Operator):
    """An explicit matrix — dense or sparse, on the host or the GPU — as an :class:`Operator`.

    Parameters
    ----------
    matrix : 2-D numpy array, torch tensor (any device), cupy array, or scipy / cupyx sparse
        The matrix ``M`` (m, n).  Dense input is held as a torch view (no copy: like
        ``scipy.sparse.linalg.aslinearoperator``, the operator sees later in-place changes);
        sparse input as CSR.
    in_shape, out_shape : tuple of int, optional
        Per-sample shapes (default ``(n,)`` / ``(m,)``).

    Notes
    -----
    ``apply`` computes ``X Mᵀ`` in the data's dtype and on its device (dense: one GEMM;
    sparse: a torch CSR product, the CSR of ``M`` and of ``Mᵀ`` built once per device and
    dtype).  ``to_sparse`` of a dense matrix stores every entry, zeros included, like
    :class:`~linop.operators.Linear`.
    """

    def __init__(self, matrix: Any, in_shape: Sequence[int] | None = None,
                 out_shape: Sequence[int] | None = None):
        if _is_sparse(matrix):
            self.sparse = True
            self.matrix = matrix.tocsr()
        elif _is_dense(matrix):
            self.sparse = False
            self.matrix = backend.to_torch(matrix).detach()
        else:
            raise TypeError(f"MatrixOperator: matrix must be a dense or sparse 2-D matrix, got {type(matrix).__name__}")
        if len(self.matrix.shape) != 2:
            raise ValueError(f"MatrixOperator: matrix must be 2-D (m, n), got shape {tuple(self.matrix.shape)}")
        m, n = (int(s) for s in self.matrix.shape)
        if m == 0 or n == 0:
            raise ValueError(f"MatrixOperator: matrix has an empty dimension, shape {(m, n)}")
        ins, outs = _shapes(m, n, in_shape, out_shape, "MatrixOperator")
        super().__init__(ins, outs, dtype=_real_dtype(self.matrix.dtype, "matrix"))
        self._csr_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ torch path
    def _csr(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch CSR forms of ``M`` and ``Mᵀ`` on ``like``'s device and dtype (cached)."""
        key = (like.device, like.dtype)
        if key not in self._csr_cache:
            self._csr_cache[key] = (_torch_csr(self.matrix, like), _torch_csr(self.matrix.T, like))
        return self._csr_cache[key]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        X = x.reshape(x.shape[0], self.shape[1])
        Y = (self._csr(X)[0] @ X.T).T if self.sparse else X @ self._param("matrix", X).T
        return Y.reshape((x.shape[0],) + self.out_shape)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        Y = y.reshape(y.shape[0], self.shape[0])
        X = (self._csr(Y)[1] @ Y.T).T if self.sparse else Y @ self._param("matrix", Y)
        return X.reshape((y.shape[0],) + self.in_shape)

    # ------------------------------------------------------------------ explicit forms
    def _coo(self):
        if self.sparse:
            A = (self.matrix.get() if backend.is_cupy(self.matrix) else self.matrix).tocoo()
            return A.row, A.col, A.data
        m, n = self.shape
        check_sparse_size("MatrixOperator", m * n, m, self.dtype, None)
        return np.repeat(np.arange(m), n), np.tile(np.arange(n), m), backend.to_numpy(self.matrix).ravel()

    def host_matrix(self) -> np.ndarray | scipy.sparse.csr_matrix:
        """The matrix on the host as given (numpy dense or scipy CSR), no densification."""
        if self.sparse:
            return self.matrix.get() if backend.is_cupy(self.matrix) else self.matrix
        return backend.to_numpy(self.matrix)


def _torch_csr(A: Any, like: torch.Tensor) -> torch.Tensor:
    """A scipy / cupyx sparse matrix as a torch sparse CSR tensor on ``like``'s device / dtype."""
    A = A.tocsr()
    indptr, indices, data = (backend.to_torch(p).to(like.device) for p in (A.indptr, A.indices, A.data))
    with warnings.catch_warnings():  # torch flags sparse CSR as "beta"; the matmul we use is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(indptr.to(torch.int64), indices.to(torch.int64), data.to(like.dtype),
                                       size=A.shape, device=like.device, check_invariants=False)


class LinearOperatorAdapter(Operator):
    """A foreign ``scipy.sparse.linalg.LinearOperator`` as an :class:`Operator`.

    ``apply`` runs ``A.matmat`` on the host (columns = samples) in the data's dtype and
    returns to the data's device; ``to_sparse`` assembles ``A`` column by column from
    ``A.matmat(I)`` (after the usual CSR size check), keeping only its non-zeros.

    Parameters
    ----------
    A : LinearOperator (m, n)
    in_shape, out_shape : tuple of int, optional
        Per-sample shapes; default ``A.in_shape`` / ``A.out_shape`` when it has them, else
        ``(n,)`` / ``(m,)``.
    """

    def __init__(self, A: spla.LinearOperator, in_shape: Sequence[int] | None = None,
                 out_shape: Sequence[int] | None = None):
        if not isinstance(A, spla.LinearOperator):
            raise TypeError(f"LinearOperatorAdapter: A must be a scipy LinearOperator, got {type(A).__name__}")
        m, n = (int(s) for s in A.shape)
        if m == 0 or n == 0:
            raise ValueError(f"LinearOperatorAdapter: A has an empty dimension, shape {(m, n)}")
        in_shape = getattr(A, "in_shape", None) if in_shape is None else in_shape
        out_shape = getattr(A, "out_shape", None) if out_shape is None else out_shape
        ins, outs = _shapes(m, n, in_shape, out_shape, "LinearOperatorAdapter")
        self.A = A
        super().__init__(ins, outs, dtype=_real_dtype(A.dtype if A.dtype is not None else np.float64, "A"))

    def _host(self, fn, t: torch.Tensor, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        cols = np.ascontiguousarray(t.reshape(t.shape[0], n).detach().cpu().numpy().T)
        out = torch.as_tensor(np.asarray(fn(cols)).T, dtype=t.dtype)
        return out.to(t.device).reshape((t.shape[0],) + shape)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._host(self.A.matmat, x, self.shape[1], self.out_shape)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._host(self.A.rmatmat, y, self.shape[0], self.in_shape)

    def _coo(self):
        D = self.dense()
        r, c = np.nonzero(D)
        return r, c, D[r, c]

    def dense(self) -> np.ndarray:
        """``A`` as a float64 host array, from ``A.matmat(I)`` (size-checked first)."""
        m, n = self.shape
        check_sparse_size("LinearOperatorAdapter", m * n, m, np.float64, None)
        return np.asarray(self.A.matmat(np.eye(n)), dtype=np.float64)


def _finite_entries(W: Any, name: str) -> None:
    """ValueError naming ``name`` when a host matrix holds NaN / Inf (every product with it
    would be NaN: dottest, solves and the case analysis would report nonsense)."""
    if isinstance(W, torch.Tensor):
        ok = bool(torch.isfinite(W.detach()).all()) if W.is_floating_point() else True
    elif isinstance(W, np.ndarray):
        ok = bool(np.isfinite(W).all()) if W.dtype.kind == "f" else True
    elif scipy.sparse.issparse(W):
        ok = bool(np.isfinite(W.data).all()) if W.dtype.kind == "f" else True
    else:  # device arrays: checked where they are used
        ok = True
    if not ok:
        raise ValueError(f"{name} holds NaN / Inf entries")


def as_operator(W: Any, name: str = "W") -> Operator:
    """``W`` as a linop :class:`Operator` — the one adapter at every edge that takes a linear map.

    Parameters
    ----------
    W : Operator, dense 2-D array / tensor (numpy, torch, cupy), scipy / cupyx sparse matrix,
        or scipy ``LinearOperator``
    name : str
        The caller's argument name, used in error messages.

    Returns
    -------
    Operator
        ``W`` itself when it already is one; else a :class:`MatrixOperator` or a
        :class:`LinearOperatorAdapter` whose matrix is exactly ``W``.

    Raises
    ------
    TypeError
        ``W`` is none of the above.
    ValueError
        A dense ``W`` that is not 2-D, an empty dimension, or a complex dtype.
    """
    if isinstance(W, Operator):
        return W
    if _is_sparse(W) or _is_dense(W):
        if len(W.shape) != 2:
            raise ValueError(f"{name} must be 2-D (n_out, n_in), got shape {tuple(W.shape)}")
        _real_dtype(W.dtype, name)
        if min(W.shape) < 1:
            raise ValueError(f"{name} has an empty dimension, shape {tuple(W.shape)}")
        _finite_entries(W, name)
        return MatrixOperator(W)
    if isinstance(W, spla.LinearOperator):
        return LinearOperatorAdapter(W)
    raise TypeError(
        f"{name} must be a linop Operator, a dense 2-D array / tensor, a scipy / cupyx sparse matrix or a "
        f"scipy LinearOperator, got {type(W).__name__}"
    )


def dense_array(W: Any) -> np.ndarray:
    """The explicit float64 host matrix of any ``W`` :func:`as_operator` accepts.

    Dense input is copied as is; sparse input densified; an adapted ``LinearOperator`` is
    applied to the identity; any other operator goes through its CSR ``to_sparse()``.
    Callers check the memory budget first (this allocates ``8·m·n`` bytes)."""
    op = as_operator(W)
    if isinstance(op, MatrixOperator):
        M = op.host_matrix()
        return np.array(M.toarray() if op.sparse else M, dtype=np.float64)
    if isinstance(op, LinearOperatorAdapter):
        return op.dense()
    return op.to_sparse(dtype=np.float64).toarray()


def scipy_form(W: Any) -> Any:
    """A host form of ``W`` for scipy's iterative solvers, without densifying anything.

    An explicit matrix as given (numpy dense, or scipy CSR), a foreign ``LinearOperator``
    itself, any other operator as its float64 CSR (faster in scipy's loops than the
    matrix-free torch path)."""
    op = as_operator(W)
    if isinstance(op, MatrixOperator):
        return op.host_matrix()
    if isinstance(op, LinearOperatorAdapter):
        return op.A
    return op.to_sparse(dtype=np.float64)
