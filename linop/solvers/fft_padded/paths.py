"""The per-batch solve paths of :class:`.PaddedConvSolver` (a mixin): ``δ = W⁺ r`` from the factors.

:class:`SolvePaths` turns a layer's factorisation into answers: the direct solve
(:meth:`~SolvePaths.tikhonov`: right-hand sides, the capacitance solve, the lift back, in row
chunks; or ``W⁻¹ r`` on the square path), its lazily-fed form (:meth:`~SolvePaths.solve_blocks`),
and :meth:`~SolvePaths.solve`, which adds the refinement / Tikhonov iteration or runs PCG
(:mod:`.iterate`).  The factorisation itself is built by :class:`.PaddedConvSolver`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ... import backend
from .iterate import padded_pcg
from .iterate import refine as refine_steps

__all__ = ["SolvePaths"]


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class SolvePaths:
    """``W⁺ r`` by the factored capacitance system (or the square path), refinement or PCG.

    Needs, from the class it is mixed into: ``method``, ``case``, ``lam``, ``refine``, ``_sq``
    (:class:`.SquareSchur` or ``None``), ``_maps`` (:class:`.TorusLift`), ``_qd``
    (:class:`.QuasiDefiniteFactor`), ``_zero_rows``, ``out_shape``, ``device``, ``dtype`` and
    ``forward`` / ``adjoint`` (:class:`.TorusMaps`) for the iterations.
    """

    @property
    def ccp_direct(self) -> bool:
        """Whether ``a* = W⁺ t`` (``t = z* − b``) may be solved for directly, without ``r = t − W â``.

        True for the lifted capacitance factorisation of the CCP case at ``λ = 0`` whose direct solve
        needs no refinement.  *Exact:* that factorisation succeeds (both Cholesky factors, the
        condition and eigenvalue floors :data:`.SINGULAR_COND`, :data:`.SINGULAR_EIG`) only when its
        Schur complement is SPD, i.e. ``W`` has full column rank; then ``W⁺W = I`` and
        ``â + W⁺(t − W â) = W⁺ t`` — ``â`` plays no part (seed 001 Eq. 7).  *Accuracy:* the direct
        solve's error is ≲ ``eps·cond_est`` (≤ 1e-12 without refinement; the estimate is 10–100×
        pessimistic) relative to what it returns, so ``‖ã − a*‖ ≲ 1e-12 ‖a*‖`` here against
        ``eps·cond·‖a* − â‖ + eps‖a*‖`` for the correction form: the two differ only relative to a
        correction much smaller than ``a*``, where no float answer beats ``eps‖a*‖`` anyway.
        The square path (``W⁻¹``, refined only above ``eps·cond_est = 1e-8``) and the Tikhonov /
        PCG paths keep the correction form.
        """
        return (self.method == "capacitance" and self._sq is None and self.case == "CCP" and self.lam == 0.0
                and not self.refine)

    @property
    def single_pass(self) -> bool:
        """One direct solve is the answer (capacitance or square path, ``λ = 0``, no refinement):
        :meth:`solve_blocks` applies."""
        return self.method == "capacitance" and self.lam == 0.0 and not self.refine

    def tikhonov(self, r: torch.Tensor | Iterable[torch.Tensor], chunk: int = 64) -> torch.Tensor:
        """``W⁺ r`` (λ = 0) or ``(WᵀW + λI)⁻¹ Wᵀ r``: (N, *out_shape) → (N, *in_shape).

        ``chunk`` samples at a time: right-hand sides (:meth:`.TorusLift.rhs`), the capacitance
        solve, the lift back (:meth:`.TorusLift.lift`) — memory bounded by the chunk.  ``r`` may
        also be an iterable of row blocks ``(n_i, *out_shape)`` on the solver's device and dtype,
        consumed one at a time: only a block's small side (the capacitance right-hand sides and
        the kept spectrum) waits until ``chunk`` rows are gathered for one capacitance solve, so
        the wide side is never formed whole while the triangular solves still get ``chunk``
        right-hand sides (BLAS-3: measured ~1.3× faster per row at 256 than at 64, 1 thread).
        """
        ch = int(chunk)
        blocks = (r[k:k + ch] for k in range(0, r.shape[0], ch)) if isinstance(r, torch.Tensor) else r
        if self._sq is not None:  # square W: W⁻¹ r directly (square.py)
            return _cat([self._sq.solve(blk) for blk in blocks])
        out, pending, rows = [], [], 0
        for blk in blocks:
            # (the maps take r itself: the scaling r̃ = r / s_max is folded into their first matrix)
            if self._zero_rows is not None:  # zero rows of W: W⁺ ignores them (ring_entries)
                blk = blk * self._zero_rows
            pending.append(self._maps.rhs(blk))
            rows += blk.shape[0]
            if rows >= ch:
                out.append(self._capacitance_lift(pending))
                pending, rows = [], 0
        if pending:
            out.append(self._capacitance_lift(pending))
        return _cat(out)

    def _capacitance_lift(self, pending: list) -> torch.Tensor:
        """The capacitance solve and the lift of gathered ``(b_B, b_P, spectrum)`` blocks."""
        bB, bP, Y = (_cat(list(part)) for part in zip(*pending))
        xB, xP = self._qd.solve(bB, bP)
        return self._maps.lift(Y, xB, xP)

    def solve_blocks(self, blocks: Iterable[torch.Tensor], chunk: int = 256) -> torch.Tensor:
        """``δ = W⁺ r`` for ``r`` given as row blocks (formed lazily by the caller), by one direct
        solve (:attr:`single_pass` required; :meth:`tikhonov`).  Returns (N, *in_shape)."""
        if not self.single_pass:
            raise ValueError("PaddedConvSolver.solve_blocks: needs a single-pass solver (capacitance, λ = 0, "
                             "no refinement); use solve()")
        if isinstance(chunk, bool) or int(chunk) < 1:
            raise ValueError(f"PaddedConvSolver.solve_blocks: chunk must be ≥ 1, got {chunk!r}")
        return self.tikhonov((blk.to(device=self.device, dtype=self.dtype) for blk in blocks), int(chunk))

    def _check_r(self, r: Any, chunk: int) -> torch.Tensor:
        r = backend.to_torch(r) if not isinstance(r, torch.Tensor) else r
        if r.ndim != 4 or tuple(r.shape[1:]) != self.out_shape:
            raise ValueError(f"PaddedConvSolver.solve: r must have shape (N, {', '.join(map(str, self.out_shape))}), "
                             f"got {tuple(r.shape)}")
        if isinstance(chunk, bool) or int(chunk) < 1:
            raise ValueError(f"PaddedConvSolver.solve: chunk must be ≥ 1, got {chunk!r}")
        return r.to(device=self.device, dtype=self.dtype)

    def solve(self, r: Any, tol: float | None = None, maxiter: int | None = None, chunk: int = 64,
              refine: bool | None = None) -> tuple[torch.Tensor, dict]:
        """``δ = W⁺ r`` for a batch ``r`` (N, *out_shape); returns ``(δ, info)``.

        Capacitance: one direct application of :meth:`tikhonov`, then — when ``λ > 0``, or
        when ``refine`` (default: :attr:`refine`, decided from the condition estimate) — the
        refinement ``δ ← δ + T (r − W δ)`` until each sample's update is ≤ ``tol`` (default
        1e-13) relative to its δ, stops decreasing (rounding floor), or ``maxiter`` steps
        (default 100 with ``λ > 0``, else 10).  PCG: Craig (MDP) / CGLS (CCP) to ``tol``
        (default 1e-12), at most ``maxiter`` (1000) iterations.  ``info["iterations"]`` (per
        sample) counts refinement steps resp. CG iterations.
        """
        r = self._check_r(r, chunk)
        if self.method == "pcg":
            return padded_pcg(self, r, 1e-12 if tol is None else float(tol), 1000 if maxiter is None else int(maxiter))
        tol = 1e-13 if tol is None else float(tol)
        maxiter = (100 if self.lam > 0.0 else 10) if maxiter is None else int(maxiter)
        ch = int(chunk)
        d = self.tikhonov(r, ch)
        if self.lam > 0.0 or (self.refine if refine is None else bool(refine)):
            return refine_steps(self, r, d, tol, maxiter, ch)
        N = r.shape[0]
        return d, {"iterations": np.zeros(N, dtype=np.int64), "converged": np.ones(N, dtype=bool),
                   "method": "capacitance"}
