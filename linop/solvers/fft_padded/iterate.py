"""The iterative parts of :class:`.PaddedConvSolver`: refinement / iterated Tikhonov and the PCG fallback."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..iterative import cgls, craig

__all__ = ["padded_pcg", "refine"]


def refine(ps: Any, r: torch.Tensor, d: torch.Tensor, tol: float, maxiter: int, ch: int) -> tuple[torch.Tensor, dict]:
    """Iterated Tikhonov / iterative refinement ``δ ← δ + T (r − W δ)`` on the active samples.

    With ``λ = 0`` it removes the rounding error of the direct solve (which grows like
    ``eps·cond(W)²``: the capacitance system is a normal-equations form) down to about
    ``eps·cond(W)``; with ``λ > 0`` it converges to ``W⁺ r`` (package docstring).  A sample
    stops when its update, or the predicted rest ``ρ·rel/(1 − ρ)`` of the updates (contraction
    ``ρ``), is ≤ ``tol`` relative to δ, or when the update grows (the rounding floor).
    """
    N = r.shape[0]
    iters = np.zeros(N, dtype=np.int64)
    conv = np.zeros(N, dtype=bool)
    stag = np.zeros(N, dtype=bool)
    last = np.full(N, np.inf)
    active = torch.arange(N, device=r.device)
    for it in range(1, int(maxiter) + 1):
        if active.numel() == 0:
            break
        da, ra = d[active], r[active]
        res = ra - torch.cat([ps.forward(da[k:k + ch]) for k in range(0, da.shape[0], ch)])
        upd = ps.tikhonov(res, ch)
        rel = (torch.linalg.vector_norm(upd.reshape(upd.shape[0], -1), dim=1)
               / torch.linalg.vector_norm(da.reshape(da.shape[0], -1), dim=1).clamp_min(torch.finfo(d.dtype).tiny))
        rel = rel.cpu().numpy()
        idx = active.cpu().numpy()
        grew = rel >= last[idx]  # no longer contracting: the rounding floor; keep the previous iterate
        keep = ~grew
        d[active[torch.as_tensor(keep, device=r.device)]] += upd[torch.as_tensor(keep, device=r.device)]
        iters[idx[keep]] = it
        # the error left after this update, from the contraction ρ of the iteration: measured as
        # rel/last from the second step on; at λ = 0 the first step's ρ is the direct solve's own
        # relative error, i.e. rel itself (the same solver is applied to the residual).  The
        # geometric tail ρ·rel/(1 − ρ) bounds the remaining updates.
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.where(np.isfinite(last[idx]), rel / last[idx], rel if ps.lam == 0.0 else 1.0)
        tail = np.where(rho < 0.5, rel * rho / (1.0 - np.minimum(rho, 0.5)), np.inf)
        last[idx] = np.minimum(rel, last[idx])
        ok = (rel <= tol) | (tail <= tol)
        conv[idx[ok & keep]] = True
        stag[idx[grew]] = True
        active = active[torch.as_tensor(~(ok | grew), device=r.device)]
    return d, {"iterations": iters, "converged": conv | stag, "stagnated": stag, "last_update": last,
               "method": "capacitance" + (" + Tikhonov refinement" if ps.lam > 0.0 else " + refinement")}


def padded_pcg(ps: Any, r: torch.Tensor, tol: float, maxiter: int) -> tuple[torch.Tensor, dict]:
    """Fallback of :class:`PaddedConvSolver`: Craig / CGLS with a circulant preconditioner.

    MDP: Craig on ``W Wᵀ`` preconditioned by ``S (C Cᵀ + ε)⁻¹ Sᵀ`` (iterates stay in
    ``range(Wᵀ)``: minimum norm); samples where it does not converge (W not of full row
    rank) are redone by CGLS.  CCP: CGLS preconditioned by ``Eᵀ (Cᵀ C + ε)⁻¹ E``.  ``W``,
    ``Wᵀ`` are the direct convs; exact to ``tol``, O(batch) memory.
    """
    N, fs = r.shape[0], ps.fs

    def flat(fn, shape):  # the Krylov solvers work on flat (k, n) batches
        return lambda v: fn(v.reshape((v.shape[0],) + shape)).reshape(v.shape[0], -1)

    def torus_apply(M, lift, crop):
        return lambda x: crop(ps._irfft(ps._mul(M, ps._rfft(lift(x)))))

    fwd, adj = flat(ps.forward, ps.in_shape), flat(ps.adjoint, ps.out_shape)
    mask = ps._mask if ps._mask is not None else 1.0  # fixed-zero entries: keep the iterates off them
    M_ccp = lambda: flat(torus_apply(fs._precond("ccp"), lambda x: ps.embed(x * mask),
                                     lambda c: c[:, :, : ps.H, : ps.W] * mask), ps.in_shape)
    rf = r.reshape(N, -1)
    if ps.case == "MDP":
        M = flat(torus_apply(fs._precond("mdp"), ps.place, ps.select), ps.out_shape)
        delta, info = craig(fwd, adj, rf, tol, maxiter, M=M)
        bad = np.flatnonzero(~info["converged"])
        if bad.size:  # W Wᵀ y = r inconsistent (W not of full row rank): CGLS is min-norm LS
            idx = torch.as_tensor(bad, device=r.device)
            d2, i2 = cgls(fwd, adj, rf[idx], tol, maxiter, M=M_ccp())
            delta[idx] = d2
            for k in ("iterations", "converged", "relres"):
                info[k][bad] = i2[k]
            info["cgls_fallback_samples"] = bad
    else:
        delta, info = cgls(fwd, adj, rf, tol, maxiter, M=M_ccp())
    info["method"] = "pcg"
    return delta.reshape((N,) + ps.in_shape), info
