"""Batched Krylov solvers for the minimum-norm correction ``δ = W⁺ r`` (seed 001 §3.1).

Every sample of the batch runs its own conjugate-gradient recurrence (its own ``α``,
``β``), but all of them share each application of ``W`` / ``Wᵀ`` — one batched conv per
step.  Samples that meet their tolerance are dropped from the active set, so the cost
follows the slowest sample only for the samples still running.  Everything is torch, so
the same code runs on CPU tensors, CUDA tensors and (through DLPack, see
:mod:`linop.backend`) cupy arrays.

* :func:`craig` — CG on ``W Wᵀ y = r`` with ``δ = Wᵀ y`` (CGNE / Craig's method), the MDP
  (Eqs. 4–6).  Started at 0 every iterate lies in ``range(Wᵀ)``, so the limit is the
  minimum-norm solution.  Stops when ``||r − W δ|| ≤ tol·||r||`` (the constraint residual
  of the correction).
* :func:`cgls` — CG on the normal equations ``Wᵀ W δ = Wᵀ r`` in the CGLS form, the CCP
  (Eq. 7).  Started at 0 it converges to the minimum-norm least-squares solution.  Stops
  when ``||Wᵀ (r − W δ)|| ≤ tol·||Wᵀ r||``.

Both take an optional symmetric positive definite preconditioner ``M`` (for ``craig`` an
approximation of ``(W Wᵀ)⁻¹``, for ``cgls`` of ``(Wᵀ W)⁻¹``); :mod:`linop.solvers.fft` builds
the circulant (FFT) one used by ``method="fft-pcg"``.  With a preconditioner, ``craig``
still returns ``δ = Wᵀ y`` (in ``range(Wᵀ)``, hence minimum-norm); ``cgls`` returns the
unique least-squares solution when W has full column rank.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["craig", "cgls"]

Op = Callable[[torch.Tensor], torch.Tensor]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


def _bar(maxiter: int, N: int, progress: bool, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=N, desc=desc, unit="sample", leave=False)


def craig(W: Op, Wt: Op, r: torch.Tensor, tol: float = 1e-10, maxiter: int = 1000,
          M: Op | None = None, WWt: Op | None = None, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Minimum-norm solution of ``W δ = r`` for a batch ``r`` (N, n_out) → δ (N, n_in).

    Parameters
    ----------
    W, Wt : callables on (k, n_in) / (k, n_out) torch batches.
    r : (N, n_out) right-hand sides (``z* − b − W â``).
    tol : relative constraint-residual tolerance ``||r − W δ|| / ||r||`` per sample.
    maxiter : iteration cap.
    M : optional SPD preconditioner ≈ ``(W Wᵀ)⁻¹`` on (k, n_out) batches.
    WWt : optional fused ``y ↦ W Wᵀ y`` (e.g. one Fourier-domain product); then the
        iteration runs on ``y`` and ``δ = Wᵀ y`` is formed once at the end.

    Returns
    -------
    delta, info : info has per-sample ``iterations`` and ``converged`` (numpy) and the
        recurred ``relres``.
    """
    N = r.shape[0]
    rnorm0 = torch.linalg.vector_norm(r, dim=1)
    y = torch.zeros_like(r)
    its = np.zeros(N, dtype=np.int64)
    relres = np.zeros(N)
    conv = np.zeros(N, dtype=bool)
    active = torch.nonzero(rnorm0 > 0).flatten()
    conv[(rnorm0 == 0).cpu().numpy()] = True
    s = r[active].clone()
    z = M(s) if M is not None else s
    p = z.clone()
    rho = _dot(s, z)
    thr = tol * rnorm0[active]
    ys = torch.zeros_like(s)
    ds = None
    if WWt is None:
        ds_full = torch.zeros((N, Wt(r[:1]).shape[1]), dtype=r.dtype, device=r.device)  # n_in from one probe
        ds = torch.zeros((active.numel(), ds_full.shape[1]), dtype=r.dtype, device=r.device)
    bar = _bar(maxiter, N, progress, "craig")
    it = 0
    while active.numel() and it < maxiter:
        it += 1
        if WWt is None:
            q = Wt(p)
            Ap = W(q)
            pAp = _dot(q, q)
        else:
            Ap = WWt(p)
            pAp = _dot(p, Ap)
        alpha = rho / pAp
        ys += alpha[:, None] * p
        if ds is not None:
            ds += alpha[:, None] * q
        s -= alpha[:, None] * Ap
        snorm = torch.linalg.vector_norm(s, dim=1)
        done = snorm <= thr
        if bool(done.any()) or it == maxiter:
            fin = done if it < maxiter else torch.ones_like(done)
            idx = active[fin]
            y[idx] = ys[fin]
            if ds is not None:
                ds_full[idx] = ds[fin]
            ii = idx.cpu().numpy()
            its[ii] = it
            conv[ii] = done[fin].cpu().numpy()
            relres[ii] = (snorm[fin] / rnorm0[idx]).cpu().numpy()
            keep = ~fin
            active, s, p, rho, ys, thr = active[keep], s[keep], p[keep], rho[keep], ys[keep], thr[keep]
            if ds is not None:
                ds = ds[keep]
            if bar is not None:
                bar.update(int(fin.sum()))
            if not active.numel():
                break
        z = M(s) if M is not None else s
        rho_new = _dot(s, z)
        beta = rho_new / rho
        rho = rho_new
        p = z + beta[:, None] * p
    if bar is not None:
        bar.close()
    delta = Wt(y) if WWt is not None else ds_full
    return delta, {"iterations": its, "converged": conv, "relres": relres, "tol": tol, "maxiter": maxiter}


def cgls(W: Op, Wt: Op, r: torch.Tensor, tol: float = 1e-10, maxiter: int = 1000,
         M: Op | None = None, WtW: Op | None = None, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Minimum-norm least-squares solution of ``W δ ≈ r`` (CGLS, optionally preconditioned).

    Stops per sample when ``||Wᵀ(r − W δ)|| ≤ tol·||Wᵀ r||``.  ``WtW`` (fused ``Wᵀ W``)
    replaces the two separate products when given; the residual is then recurred on the
    normal equations instead of on ``r − W δ``.
    """
    N = r.shape[0]
    g0 = Wt(r)
    gnorm0 = torch.linalg.vector_norm(g0, dim=1)
    delta = torch.zeros_like(g0)
    its = np.zeros(N, dtype=np.int64)
    relres = np.zeros(N)
    conv = np.zeros(N, dtype=bool)
    conv[(gnorm0 == 0).cpu().numpy()] = True
    active = torch.nonzero(gnorm0 > 0).flatten()
    s = r[active].clone()
    g = g0[active]
    z = M(g) if M is not None else g
    p = z.clone()
    rho = _dot(g, z)
    thr = tol * gnorm0[active]
    xs = torch.zeros_like(g)
    bar = _bar(maxiter, N, progress, "cgls")
    it = 0
    while active.numel() and it < maxiter:
        it += 1
        if WtW is None:
            q = W(p)
            alpha = rho / _dot(q, q)
            xs += alpha[:, None] * p
            s -= alpha[:, None] * q
            g = Wt(s)
        else:
            Ap = WtW(p)
            alpha = rho / _dot(p, Ap)
            xs += alpha[:, None] * p
            g = g - alpha[:, None] * Ap
        gnorm = torch.linalg.vector_norm(g, dim=1)
        done = gnorm <= thr
        if bool(done.any()) or it == maxiter:
            fin = done if it < maxiter else torch.ones_like(done)
            idx = active[fin]
            delta[idx] = xs[fin]
            ii = idx.cpu().numpy()
            its[ii] = it
            conv[ii] = done[fin].cpu().numpy()
            relres[ii] = (gnorm[fin] / gnorm0[idx]).cpu().numpy()
            keep = ~fin
            active, s, g, p, rho, xs, thr = active[keep], s[keep], g[keep], p[keep], rho[keep], xs[keep], thr[keep]
            if bar is not None:
                bar.update(int(fin.sum()))
            if not active.numel():
                break
        z = M(g) if M is not None else g
        rho_new = _dot(g, z)
        beta = rho_new / rho
        rho = rho_new
        p = z + beta[:, None] * p
    if bar is not None:
        bar.close()
    return delta, {"iterations": its, "converged": conv, "relres": relres, "tol": tol, "maxiter": maxiter}
