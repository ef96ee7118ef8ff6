"""Shared pieces of the reverse linear step: the result type and problem normalisation.

Every solver computes the minimum-norm least-squares correction (seed 001 §3.1)::

    a* = â + W⁺ (z* − b − W â),

which is the MDP solution (Eqs. 4–6) when W has full row rank, the CCP solution (Eq. 7)
when W has full column rank, and the minimum-deviation least-squares solution otherwise.
This module turns the many accepted forms of ``W`` (dense array / tensor, a linop
``Operator`` such as ``Linear`` or ``Conv2d``, a scipy or cupyx sparse matrix, any
``LinearOperator``) into one batched linear map on torch tensors, and the many layouts of
``â``, ``z*`` and ``b`` into flat ``(N, n)`` batches.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import scipy.sparse
import scipy.sparse.linalg as spla
import torch

from .. import backend

__all__ = ["SolveResult", "LinearMap", "as_linear_map", "Problem", "prepare", "DEFAULT_MAX_BYTES"]

#: Default memory budget (bytes) for dense factorisations; override with ``max_bytes=``.
DEFAULT_MAX_BYTES = 2 * 1024**3


@dataclass
class SolveResult:
    """Outcome of a reverse linear step ``W a + b = z*``.

    Attributes
    ----------
    a : array
        The reconstructed feature ``a*`` in the layout, type and device of ``a_hat``.
    case : {"MDP", "CCP", "rank-deficient"}
        Which principle the answer realises.  Dense solves decide from the numerical rank;
        iterative / FFT solves decide from the shape (``info["case_from"]`` says which).
    method : str
        The method that ran (``"dense"``, ``"lsmr"``, ``"lsqr"``, ``"cg"``, ``"fft"``,
        ``"fft-pcg"``).
    residual : numpy array (N,)
        Per-sample relative constraint residual ``||W a* + b − z*|| / ||z* − b||``
        (exactly 0 when ``z* − b = 0`` and the constraint holds).  For CCP this is the
        least-squares misfit, not a failure.
    info : dict
        Iterations, tolerances, condition numbers, ``dist_to_exact`` when known, ...
    """

    a: Any
    case: str
    method: str
    residual: np.ndarray
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        r = self.residual
        rmax = float(np.max(r)) if r.size else 0.0
        return f"SolveResult(case={self.case!r}, method={self.method!r}, N={r.size}, max residual={rmax:.3e})"


class LinearMap:
    """A batched linear map on torch tensors: ``fwd`` (N, n_in) → (N, n_out), ``adj`` back.

    Built by :func:`as_linear_map`; carries the per-sample ``in_shape`` / ``out_shape`` and
    the original ``W`` (for solvers that want its explicit form).
    """

    def __init__(self, W: Any, n_out: int, n_in: int, fwd: Callable, adj: Callable,
                 in_shape: tuple[int, ...] | None = None, out_shape: tuple[int, ...] | None = None,
                 kind: str = "operator"):
        self.W = W
        self.shape = (int(n_out), int(n_in))
        self._fwd = fwd
        self._adj = adj
        self.in_shape = tuple(in_shape) if in_shape is not None else (int(n_in),)
        self.out_shape = tuple(out_shape) if out_shape is not None else (int(n_out),)
        self.kind = kind

    def fwd(self, X: torch.Tensor) -> torch.Tensor:
        return self._fwd(X)

    def adj(self, Y: torch.Tensor) -> torch.Tensor:
        return self._adj(Y)


def _torch_sparse_csr(A: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A scipy / cupyx CSR matrix as a torch sparse CSR tensor on ``device``."""
    A = A.tocsr()
    parts = [backend.to_torch(p) for p in (A.indptr, A.indices, A.data)]
    indptr, indices, data = (p.to(device) for p in parts)
    with warnings.catch_warnings():  # torch flags sparse CSR as "beta"; the matmul we use is stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(indptr.to(torch.int64), indices.to(torch.int64), data.to(dtype),
                                       size=A.shape, device=device, check_invariants=False)


def as_linear_map(W: Any, device: torch.device, dtype: torch.dtype) -> LinearMap:
    """Wrap any supported ``W`` as a :class:`LinearMap` computing on ``device``/``dtype``."""
    from ..operators.base import Operator

    if isinstance(W, Operator):
        op = W

        def fwd(X):
            return op.apply(X.reshape((X.shape[0],) + op.in_shape)).reshape(X.shape[0], -1)

        def adj(Y):
            return op.apply_adjoint(Y.reshape((Y.shape[0],) + op.out_shape)).reshape(Y.shape[0], -1)

        return LinearMap(W, op.shape[0], op.shape[1], fwd, adj, op.in_shape, op.out_shape, "operator")
    if isinstance(W, torch.Tensor) or isinstance(W, np.ndarray) or (backend.is_cupy(W) and not scipy.sparse.issparse(W)
                                                                     and hasattr(W, "ndim") and not hasattr(W, "tocsr")):
        M = backend.to_torch(W)
        if M.ndim != 2:
            raise ValueError(f"solve: a dense W must be 2-D (n_out, n_in), got shape {tuple(M.shape)}")
        M = M.to(device=device, dtype=dtype)
        return LinearMap(W, M.shape[0], M.shape[1], lambda X: X @ M.T, lambda Y: Y @ M, kind="dense")
    if scipy.sparse.issparse(W) or (backend.is_cupy(W) and hasattr(W, "tocsr")):
        S = _torch_sparse_csr(W, device, dtype)
        St = _torch_sparse_csr(W.T, device, dtype)
        return LinearMap(W, W.shape[0], W.shape[1], lambda X: (S @ X.T).T, lambda Y: (St @ Y.T).T, kind="sparse")
    if isinstance(W, spla.LinearOperator):
        if device.type != "cpu":
            raise ValueError("solve: a generic scipy LinearOperator W only works with CPU (numpy/torch) data")

        def fwd(X):
            out = W.matmat(np.ascontiguousarray(X.detach().cpu().numpy().T))
            return torch.as_tensor(np.asarray(out).T, dtype=dtype)

        def adj(Y):
            out = W.rmatmat(np.ascontiguousarray(Y.detach().cpu().numpy().T))
            return torch.as_tensor(np.asarray(out).T, dtype=dtype)

        ins = getattr(W, "in_shape", None)
        outs = getattr(W, "out_shape", None)
        return LinearMap(W, W.shape[0], W.shape[1], fwd, adj, ins, outs, "linear-operator")
    raise ValueError(
        f"solve: unsupported W of type {type(W).__name__}; pass a dense array/tensor, a linop Operator, "
        "a scipy/cupyx sparse matrix or a scipy LinearOperator"
    )


@dataclass
class Problem:
    """A normalised reverse step: flat batches and the map, plus how to undo the layout."""

    op: LinearMap
    a_hat: torch.Tensor  # (N, n_in)
    target: torch.Tensor  # (N, n_out) = z* − b
    like: Any  # the caller's a_hat (for the output type / layout)
    a_layout: tuple[int, ...]  # caller's a_hat shape

    @property
    def N(self) -> int:
        return self.a_hat.shape[0]

    def rhs(self) -> torch.Tensor:
        """``r = z* − b − W â`` (N, n_out): the right-hand side of the correction."""
        return self.target - self.op.fwd(self.a_hat)

    def finish(self, a_flat: torch.Tensor) -> Any:
        """``a_flat`` back in the caller's layout, type and device."""
        a = a_flat.reshape(self.a_layout)
        if isinstance(self.like, torch.Tensor):
            return a.to(self.like.dtype)
        return backend.from_torch(a, like=self.like)

    def residual(self, a_flat: torch.Tensor) -> np.ndarray:
        """Per-sample ``||W a + b − z*|| / ||z* − b||`` as float64 numpy."""
        res = torch.linalg.vector_norm(self.op.fwd(a_flat) - self.target, dim=1)
        den = torch.linalg.vector_norm(self.target, dim=1)
        tiny = torch.finfo(res.dtype).tiny
        return (res / torch.clamp(den, min=tiny)).detach().cpu().numpy().astype(np.float64)


def _flat_batch(x: Any, n: int, shape: tuple[int, ...], what: str, device, dtype) -> torch.Tensor:
    t = backend.to_torch(x)
    if not t.is_floating_point():
        raise ValueError(f"solve: {what} must be floating point, got dtype {t.dtype}")
    if t.ndim >= 1 and tuple(t.shape[1:]) == tuple(shape):
        pass
    elif t.ndim == 2 and t.shape[1] == n:
        pass
    else:
        alt = "" if tuple(shape) == (n,) else f" or (N, {', '.join(map(str, shape))})"
        hint = " (batched: add a leading axis for one sample)" if t.ndim == len(shape) else ""
        raise ValueError(f"solve: {what} must have shape (N, {n}){alt}, got {tuple(t.shape)}{hint}")
    t = t.reshape(t.shape[0], n).to(device=device, dtype=dtype)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"solve: {what} contains NaN or inf")
    return t


def _bias(b: Any, N: int, n_out: int, out_shape: tuple[int, ...], device, dtype) -> torch.Tensor | None:
    if b is None:
        return None
    t = backend.to_torch(b) if not np.isscalar(b) else torch.tensor(float(b), dtype=torch.float64)  # not float32
    t = t.to(device=device, dtype=dtype)
    if t.ndim == 0:
        return t.expand(1, n_out)
    if t.numel() == n_out:
        return t.reshape(1, n_out)
    if t.ndim == 1 and len(out_shape) > 1 and t.shape[0] == out_shape[0]:  # per-channel conv bias
        return t.reshape((1, out_shape[0]) + (1,) * (len(out_shape) - 1)).expand((1,) + out_shape).reshape(1, n_out)
    if t.ndim >= 2 and t.shape[0] == N and t[0].numel() == n_out:
        return t.reshape(N, n_out)
    raise ValueError(
        f"solve: bias b of shape {tuple(t.shape)} does not fit the output {out_shape} (n_out={n_out}); "
        "pass a scalar, a vector of length n_out, a per-channel vector or a (N, n_out) batch"
    )


def prepare(W: Any, z_star: Any, a_hat: Any, b: Any = None, dtype: torch.dtype | None = None) -> Problem:
    """Validate and normalise the inputs of :func:`linop.solve.solve` (raises ValueError early)."""
    if a_hat is None or z_star is None:
        raise ValueError("solve: a_hat and z_star are required")
    a_t = backend.to_torch(a_hat)
    device = a_t.device
    dt = dtype or (a_t.dtype if a_t.is_floating_point() else torch.float64)
    op = as_linear_map(W, device, dt)
    n_out, n_in = op.shape
    a = _flat_batch(a_hat, n_in, op.in_shape, "a_hat", device, dt)
    z = _flat_batch(z_star, n_out, op.out_shape, "z_star", device, dt)
    if a.shape[0] != z.shape[0]:
        raise ValueError(f"solve: a_hat has {a.shape[0]} samples but z_star has {z.shape[0]}")
    bb = _bias(b, a.shape[0], n_out, op.out_shape, device, dt)
    target = z if bb is None else z - bb
    return Problem(op, a, target, a_hat, tuple(a_t.shape))
