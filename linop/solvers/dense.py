"""Dense reverse linear step: factor W once per layer, apply to the whole batch.

Seed 001 §3.1 solves the MDP through the KKT system (Eq. 6) and the CCP as a least-squares
problem (Eq. 7).  Eliminating ``λ`` from Eq. 6 gives ``a* = â + Wᵀ (W Wᵀ)⁻¹ (z* − b − W â)``,
so one Cholesky factorisation of the ``n_{l+1} × n_{l+1}`` matrix ``W Wᵀ`` serves every
sample of every batch.  The CCP uses a column-pivoted QR of W (``a* = â + P R⁻¹ Qᵀ r``).
When W is (numerically) rank deficient — or so ill conditioned that the Cholesky route of
the normal equations of the second kind would lose more than ``cond_limit²·eps`` — the
solver falls back to the SVD pseudo-inverse and reports the condition number.

Factorisations run once in float64 with LAPACK (scipy); the factors are then kept as torch
tensors so the per-batch application runs on the data's device (CPU, or CUDA for cupy /
CUDA-tensor batches).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg
import torch

from ..operators.adapt import as_operator, dense_array
from .result import DEFAULT_MAX_BYTES

__all__ = ["DenseSolver", "dense_bytes", "check_dense_budget"]


def dense_bytes(shape: tuple[int, int], itemsize: int = 8) -> int:
    """Bytes a dense factorisation of an ``(m, n)`` W needs (W, its factor and the SVD work)."""
    m, n = shape
    k = min(m, n)
    # W itself + (W Wᵀ or Q/R or U, Vᵀ) + LAPACK work: ≈ 3 copies of the larger factor.
    return itemsize * (m * n + max(m * n, m * m if m <= n else m * n + n * n) + k * (m + n))


def check_dense_budget(shape: tuple[int, int], max_bytes: int) -> None:
    """MemoryError (before any allocation) when a dense factorisation of W exceeds ``max_bytes``."""
    need = dense_bytes(shape)
    if need > max_bytes:
        raise MemoryError(
            f"solve(method='dense'): W is {shape[0]}x{shape[1]}; its dense factorisation needs about "
            f"{need / 2**30:.2f} GiB > budget {max_bytes / 2**30:.2f} GiB. Use method='cg', 'lsmr' or "
            "'fft-pcg' for large layers, solve a smaller layer / fewer channels, or raise max_bytes="
        )


class DenseSolver:
    """Factor ``W`` once; solve ``a* = â + W⁺ (z* − b − W â)`` for any number of batches.

    Parameters
    ----------
    W : anything :func:`linop.operators.as_operator` accepts
        The layer's linear map (``n_out × n_in``), densified after a memory check.
    cond_limit : float
        Largest condition number of W accepted for the Cholesky route (MDP); beyond it the
        expected error ``eps·cond²`` is too large and the SVD fallback is used.
    rtol : float, optional
        Relative singular-value cut-off for the numerical rank (default
        ``max(m, n)·eps``, as ``numpy.linalg.matrix_rank``).
    max_bytes : int
        Memory budget for the dense factorisation (raises ``MemoryError`` beyond it).

    Attributes
    ----------
    case : {"MDP", "CCP", "rank-deficient"}
    factorization : {"cholesky", "qr", "svd"}
    rank : int
    cond : float
        Condition number estimate of W (exact from the SVD in the fallback; LAPACK
        ``pocon`` / ``trcon`` estimates otherwise); ``inf`` when W is singular.
    """

    def __init__(self, W: Any, cond_limit: float = 1e4, rtol: float | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        op = as_operator(W, "W")
        check_dense_budget(op.shape, max_bytes)
        M = dense_array(op)
        if not np.all(np.isfinite(M)):
            raise ValueError("solve: W contains NaN or inf")
        m, n = M.shape
        self.shape = (m, n)
        self.cond_limit = float(cond_limit)
        self.rtol = float(rtol) if rtol is not None else max(m, n) * np.finfo(np.float64).eps
        self._M = M
        self._cache: dict = {}
        self.factorization = None
        if m <= n and self._try_cholesky(M):
            return
        if m > n and self._try_qr(M):
            return
        self._svd(M)

    # --------------------------------------------------------------- factorisations
    def _try_cholesky(self, M: np.ndarray) -> bool:
        G = M @ M.T
        try:
            c, lower = scipy.linalg.cho_factor(G, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            return False
        anorm = np.abs(G).sum(axis=0).max()
        rc, info = scipy.linalg.lapack.dpocon(c, anorm, uplo="L")
        cond_w = float(np.sqrt(1.0 / rc)) if rc > 0 else np.inf
        if info != 0 or not cond_w <= self.cond_limit:
            return False
        self.factorization, self.rank, self.cond, self.case = "cholesky", M.shape[0], cond_w, "MDP"
        self._L = np.tril(c)
        return True

    def _try_qr(self, M: np.ndarray) -> bool:
        Q, R, P = scipy.linalg.qr(M, mode="economic", pivoting=True, check_finite=False)
        d = np.abs(np.diag(R))
        if d.size == 0 or d[0] == 0 or d[-1] <= self.rtol * d[0]:
            return False  # numerically rank deficient: let the SVD decide the rank
        rc, info = scipy.linalg.lapack.dtrcon(R, norm="1", uplo="U", diag="N")
        self.factorization, self.rank, self.case = "qr", M.shape[1], "CCP"
        self.cond = float(1.0 / rc) if rc > 0 else np.inf
        self._Q, self._R, self._P = Q, R, P
        return True

    def _svd(self, M: np.ndarray) -> None:
        m, n = M.shape
        U, s, Vt = scipy.linalg.svd(M, full_matrices=False, check_finite=False, lapack_driver="gesdd")
        smax = s[0] if s.size else 0.0
        rank = int(np.sum(s > self.rtol * smax)) if smax > 0 else 0
        self.factorization, self.rank = "svd", rank
        self.singular_values = s
        self.cond = float(smax / s[-1]) if s.size and s[-1] > 0 else np.inf
        self.cond_effective = float(smax / s[rank - 1]) if rank else np.inf
        self.case = "MDP" if rank == m else ("CCP" if rank == n else "rank-deficient")
        self._U, self._sinv, self._Vt = U[:, :rank], 1.0 / s[:rank], Vt[:rank]

    # --------------------------------------------------------------- application
    def _t(self, name: str, arr: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.device, like.dtype)
        t = self._cache.get(key)
        if t is None:
            t = torch.as_tensor(np.ascontiguousarray(arr)).to(device=like.device, dtype=like.dtype)
            self._cache[key] = t
        return t

    def correction(self, r: torch.Tensor) -> torch.Tensor:
        """``W⁺ r`` for a batch ``r`` of shape (N, n_out) → (N, n_in) (torch, any device)."""
        R = r.T  # columns = samples
        if self.factorization == "cholesky":
            L = self._t("L", self._L, r)
            y = torch.linalg.solve_triangular(L, R, upper=False)
            y = torch.linalg.solve_triangular(L.T, y, upper=True)
            return (y.T @ self._t("M", self._M, r))
        if self.factorization == "qr":
            Q, Rr = self._t("Q", self._Q, r), self._t("R", self._R, r)
            x = torch.linalg.solve_triangular(Rr, Q.T @ R, upper=True)
            out = torch.empty_like(x)
            out[torch.as_tensor(self._P, device=r.device)] = x
            return out.T
        U, sinv, Vt = self._t("U", self._U, r), self._t("sinv", self._sinv, r), self._t("Vt", self._Vt, r)
        return ((U.T @ R) * sinv[:, None]).T @ Vt

    def info(self) -> dict:
        d = {"factorization": self.factorization, "rank": self.rank, "cond": self.cond,
             "cond_limit": self.cond_limit, "rank_rtol": self.rtol}
        if self.factorization == "svd":
            d["cond_effective"] = self.cond_effective
        return d

    def __repr__(self) -> str:
        return f"DenseSolver({self.shape[0]}x{self.shape[1]}, {self.factorization}, case={self.case}, cond={self.cond:.3g})"
