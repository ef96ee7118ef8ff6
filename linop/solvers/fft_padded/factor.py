"""Block Cholesky of the symmetric quasi-definite capacitance system (package docstring)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.linalg import lapack

from ..fft import small_lapack

__all__ = ["SINGULAR_COND", "SINGULAR_EIG", "QuasiDefiniteFactor", "lifted_spectra"]

#: A factor whose condition estimate exceeds this (eps·cond > 1e-2) is treated as singular:
#: exactly rank-deficient W measured cond_est ≈ 1e16–6e16; a full-rank W with cond(W) = 4e6
#: measured 4e12 (and is refined to ~eps·cond(W)).
SINGULAR_COND = 1e-2 / np.finfo(np.float64).eps
#: ... and so is one whose smallest eigenvalue estimate ``‖M‖₁ / cond_est`` is below this.  The
#: blocks are scaled by ``s_max`` (the Schur complements are projector-plus-Gram matrices of
#: O(1) entries), so an absolute floor applies: a structurally singular system can be *uniformly*
#: tiny (every pivot at the rounding level ~1e-16 of ``I − C⁺C``, cond_est ≈ 1) and pass the
#: relative test; a full-rank W with cond(W) = 4e6 measured ≥ 1e-11.
SINGULAR_EIG = 1e3 * np.finfo(np.float64).eps


def _cond_est(L: torch.Tensor, anorm: float) -> float:
    """LAPACK ``pocon`` 1-norm condition estimate of ``L Lᵀ`` (CPU only; nan elsewhere)."""
    if L.numel() == 0:
        return 1.0
    if L.device.type != "cpu":
        return float("nan")
    with small_lapack():  # O(m²) BLAS-2: threads only add contention
        rc, inf = lapack.dpocon(L.detach().to(torch.float64).numpy().T, anorm, uplo="U")
    return float(1.0 / rc) if (inf == 0 and rc > 0) else float("inf")


def _syrk_lower(S: torch.Tensor, X: torch.Tensor, blocks: int = 8) -> None:
    """``S += XᵀX`` on the lower triangle only (block rows; ~56 % of the full product's flops).

    The strict upper triangle of ``S`` is left stale (updated only inside the diagonal blocks);
    the Cholesky factorisation reads the lower one only (LAPACK ``potrf``, ``uplo='L'``; tested).
    """
    n = S.shape[0]
    nb = max(128, -(-n // blocks))
    for i0 in range(0, n, nb):  # a handful of block rows
        i1 = min(n, i0 + nb)
        S[i0:i1, :i1].addmm_(X[:, i0:i1].T, X[:, :i1])


def _sym_norm1(S: torch.Tensor) -> float:
    """1-norm of the symmetric matrix whose lower triangle ``S`` holds."""
    if S.numel() == 0:
        return 0.0
    Lo = torch.tril(S).abs_()
    return float((Lo.sum(0) + Lo.sum(1) - Lo.diagonal()).max())


class QuasiDefiniteFactor:
    """Block Cholesky of the symmetric quasi-definite ``[[−A_BB, Gᵀ_BP], [G_PB, Z_s,PP]]``.

    ``definite_first="B"`` (MDP): ``L₁L₁ᵀ = A_BB``, ``X = L₁⁻¹ Gᵀ_BP``, ``L₂L₂ᵀ = Z_s,PP + XᵀX``;
    ``"P"`` (CCP): ``L₁L₁ᵀ = Z_s,PP``, ``X = L₁⁻¹ G_PB``, ``L₂L₂ᵀ = A_BB + XᵀX``.  ``ok`` is False
    when a Cholesky fails (the Schur complement is not SPD: W rank deficient in that case).

    Parameters
    ----------
    first : tensor, the definite diagonal block (consumed)
    coupling, second : callables returning the coupling block (rows of ``first``) and the
        other diagonal block, built only once the first factor succeeded (bounded peak memory)
    definite_first : "B" or "P"
    """

    def __init__(self, first: torch.Tensor, coupling: Any, second: Any, definite_first: str):
        self.order = definite_first
        self.ok, self.cond_est, self.min_eig_est = False, (float("nan"), float("nan")), float("nan")
        n1 = float(first.abs().sum(0).max()) if first.numel() else 0.0  # 1-norm (symmetric)
        # torch's LAPACK Cholesky (MKL): measured ~5x faster than scipy's OpenBLAS potrf here
        L1, info = torch.linalg.cholesky_ex(first)
        del first
        if int(info) != 0:
            return
        X = torch.linalg.solve_triangular(L1, coupling(), upper=False)  # L₁⁻¹ (coupling)
        Sch = second()
        _syrk_lower(Sch, X)  # the Schur complement, in place (lower triangle: all Cholesky reads)
        n2 = _sym_norm1(Sch)
        L2, info = torch.linalg.cholesky_ex(Sch)
        del Sch
        if int(info) != 0:
            return
        self.L1, self.X, self.L2 = L1, X, L2
        self.cond_est = (_cond_est(L1, n1), _cond_est(L2, n2))
        self.min_eig_est = min(n1 / self.cond_est[0] if L1.numel() else np.inf,
                               n2 / self.cond_est[1] if L2.numel() else np.inf)
        self.ok = True

    def solve(self, bB: torch.Tensor, bP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_B, x_P)`` for (N, m_B), (N, m_P) right-hand sides: triangular solves (BLAS-3)."""
        tri = torch.linalg.solve_triangular
        L1, X, L2 = self.L1, self.X, self.L2
        if self.order == "B":  # w = L₁⁻¹b_B; x_P = (Z_s + XᵀX)⁻¹(b_P + Xᵀw); x_B = L₁⁻ᵀ(X x_P − w)
            w = tri(L1, bB.T, upper=False)
            xP = tri(L2.T, tri(L2, bP.T + X.T @ w, upper=False), upper=True)
            xB = tri(L1.T, X @ xP - w, upper=True)
        else:  # w = L₁⁻¹b_P; x_B = (A + XᵀX)⁻¹(Xᵀw − b_B); x_P = L₁⁻ᵀ(w − X x_B)
            w = tri(L1, bP.T, upper=False)
            xB = tri(L2.T, tri(L2, X.T @ w - bB.T, upper=False), upper=True)
            xP = tri(L1.T, w - X @ xB, upper=True)
        return xB.T, xP.T


def lifted_spectra(case: str, lam: float, s_max: float, Un: np.ndarray, sn: np.ndarray,
                   Vhn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frequency ``Â`` (C_out²), ``Ĝ`` (C_in × C_out), ``Ẑ_s`` (C_in²) of the lifted system.

    From the SVD ``K̂ = U diag(σ) Vᴴ`` (``Un``, ``sn``, ``Vhn``, batched over frequencies), the
    shift ``λ`` and the scale ``s_max`` (package docstring): ``Ĝ = s_max V σ/(σ²+λ) Uᴴ``; MDP
    ``Â = s_max² (K̂K̂ᴴ+λ)⁻¹``, ``Ẑ_s = I − V σ²/(σ²+λ) Vᴴ``; CCP ``Â = I − U σ²/(σ²+λ) Uᴴ``,
    ``Ẑ_s = s_max² (K̂ᴴK̂+λ)⁻¹``.
    """
    Uh = np.conj(np.swapaxes(Un, -1, -2))
    V = np.conj(np.swapaxes(Vhn, -1, -2))
    d = sn**2 + lam
    with np.errstate(divide="ignore", invalid="ignore"):
        G = (V * (s_max * sn / d)[..., None, :]) @ Uh
        if case == "MDP":  # U square: A = s²(CCᵀ+λ)⁻¹, Z_s = λ(CᵀC+λ)⁻¹ = I − V σ²/(σ²+λ) Vᴴ
            A = (Un * (s_max**2 / d)[..., None, :]) @ Uh
            Z = np.eye(V.shape[-2]) - (V * (sn**2 / d)[..., None, :]) @ Vhn
        else:  # V square: A = λ(CCᵀ+λ)⁻¹ = I − U σ²/(σ²+λ) Uᴴ, Z_s = s²(CᵀC+λ)⁻¹
            A = np.eye(Un.shape[-2]) - (Un * (sn**2 / d)[..., None, :]) @ Uh
            Z = (V * (s_max**2 / d)[..., None, :]) @ Vhn
    return A, G, Z
