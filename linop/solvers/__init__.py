"""Reverse linear step ``W a + b = z*`` of feature reconstruction (seed 001 §3.1–3.2).

:func:`solve` computes the minimum-norm least-squares correction::

    a* = â + W⁺ (z* − b − W â)

— the MDP solution (Eqs. 4–6: closest to ``â`` among exact solutions) when W has full row
rank, the CCP solution (Eq. 7: least computing-consistency error) when it has full column
rank, and the closest-to-``â`` least-squares solution in between.

Methods
-------
``"dense"``    factor once (Cholesky of W Wᵀ / pivoted QR / SVD fallback), :class:`DenseSolver`.
``"lsmr"``, ``"lsqr"``  scipy, exact, per sample, on the correction with ``x0 = None``.
``"cg"``       batched Craig (CG on W Wᵀ, MDP) / CGLS (CCP); torch, so CPU, CUDA and cupy.
``"fft"``      seed 001 §3.2 (stride 1, no padding): approximate by construction.
``"fft-pcg"``  exact: Fourier-domain CG preconditioned by the FFT solve (beyond the paper).
``"fft-exact"`` exact, direct: FFT + boundary capacitance matrix factored once per layer
               (Schur complement / Woodbury, :class:`~linop.solve.capacitance.CapacitanceSolver`).
``"auto"``     dense when it is small; for stride-1 unpadded convs fft-exact when its capacitance
               matrix fits the budget (1 GiB), else fft-pcg; other layers dense up to 1.5 GiB,
               else cg (every bound also capped by ``max_bytes``).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .. import backend
from .dense import DenseSolver, dense_bytes
from .capacitance import CapacitanceSolver, capacitance_bytes
from .fft import FFTConvSolver, conv_spec
from .iterative import cgls, craig
from .result import DEFAULT_MAX_BYTES, Problem, SolveResult, prepare
from .sparse import lsmr_correction

__all__ = ["solve", "SolveResult", "DenseSolver", "FFTConvSolver", "CapacitanceSolver", "craig", "cgls", "lsmr_correction",
           "METHODS", "DEFAULT_TOL"]

METHODS = ("auto", "dense", "lsmr", "lsqr", "cg", "fft", "fft-pcg", "fft-exact")
#: Default relative stopping tolerance of the exact iterative methods.
DEFAULT_TOL = 1e-10
#: "auto" uses the dense method below this many bytes of factorisation.
AUTO_DENSE_BYTES = 256 * 1024**2
#: ... and up to this many (1.5 GiB) for layers no FFT path covers (padded / strided convs, e.g. ResNet20's
#: 96→96 'same' convs on 8×8: n = 6144, 1.2 GB by dense_bytes' conservative count, one ~1 s Cholesky),
#: where CG is slow.
AUTO_DENSE_BYTES_NO_FFT = 3 * 1024**3 // 2
#: "auto" uses fft-exact when its capacitance matrix needs at most this many bytes.
AUTO_CAPACITANCE_BYTES = 1024**3


def _shape_case(n_out: int, n_in: int) -> str:
    return "MDP" if n_out <= n_in else "CCP"


def _auto(W: Any, shape: tuple[int, int], max_bytes: int) -> str:
    need = dense_bytes(shape)
    if need <= min(AUTO_DENSE_BYTES, max_bytes):
        return "dense"
    try:
        w, (_, H, Wd) = conv_spec(W)
    except (ValueError, NotImplementedError):
        return "dense" if need <= min(AUTO_DENSE_BYTES_NO_FFT, max_bytes) else "cg"
    if capacitance_bytes(int(w.shape[0]), H, Wd, int(w.shape[2]), int(w.shape[3])) <= min(AUTO_CAPACITANCE_BYTES,
                                                                                          max_bytes):
        return "fft-exact"
    return "fft-pcg"


def _fft_solver(W: Any, prob: Problem, kw: dict) -> FFTConvSolver:
    solver = kw.pop("fft_solver", None)
    if solver is not None:
        return solver
    weight, in_shape = conv_spec(W)
    return FFTConvSolver(weight, in_shape, device=prob.a_hat.device, dtype=prob.a_hat.dtype,
                         **{k: kw.pop(k) for k in ("rcond", "reg") if k in kw})


def solve(W: Any, z_star: Any, a_hat: Any, b: Any = None, method: str = "auto", tol: float | None = None,
          maxiter: int | None = None, **kw: Any) -> SolveResult:
    """Reconstruct ``a*`` with ``W a* + b ≈ z*`` closest to ``â`` (seed 001 Eqs. 4–7, 17–20).

    Parameters
    ----------
    W : dense array / tensor (n_out, n_in), linop ``Operator`` (``Linear``, ``Conv2d``, ...),
        scipy / cupyx sparse matrix, or any scipy ``LinearOperator``.
    z_star : (N, n_out) or (N, *out_shape)
        The reconstructed next pre-activation ``z*_{l+1}``.
    a_hat : (N, n_in) or (N, *in_shape)
        The forward feature ``â_l`` (numpy, torch on any device, or cupy).  The result comes
        back in its layout, type, device and dtype (computation runs in its dtype; pass
        float64 for exactness).
    b : None, scalar, (n_out,), per-channel (C_out,) or (N, n_out)
        The layer's bias.
    method : {"auto", "dense", "lsmr", "lsqr", "cg", "fft", "fft-pcg", "fft-exact"}
    tol : float
        Stopping tolerance of the iterative methods (default 1e-10; lsmr/lsqr: atol = btol).
    maxiter : int
        Iteration cap of the iterative methods (default 10·min(n) capped at 10,000 for
        cg / fft-pcg; scipy's default for lsmr/lsqr).
    **kw
        ``solver=`` a prebuilt :class:`DenseSolver` (dense) or ``fft_solver=`` a prebuilt
        :class:`FFTConvSolver` (fft, fft-pcg, fft-exact) or ``capacitance_solver=`` a prebuilt
        :class:`CapacitanceSolver` (fft-exact), to factor once per layer across batches;
        ``max_bytes=`` memory budget of the dense / fft-exact factorisations; ``cond_limit=``, ``rtol=``
        (dense); ``conlim=`` (lsmr/lsqr); ``rcond=``, ``reg=`` (fft); ``progress=True``;
        ``reference=`` an exact ``a*`` to report ``info["dist_to_exact"]`` against.

    Returns
    -------
    SolveResult
        ``a``, ``case``, ``method``, ``residual`` (per-sample ``||W a + b − z*||/||z* − b||``)
        and ``info`` (iterations, tolerances, condition numbers, timings).

    Raises
    ------
    ValueError  bad method / shapes / NaN; NotImplementedError  fft on strided or padded
    convs; MemoryError  a dense factorisation over ``max_bytes``.
    """
    if method not in METHODS:
        raise ValueError(f"solve: method must be one of {METHODS}, got {method!r}")
    if tol is not None and not (0 < float(tol) < 1):
        raise ValueError(f"solve: tol must be in (0, 1), got {tol!r}")
    if maxiter is not None and int(maxiter) < 1:
        raise ValueError(f"solve: maxiter must be a positive integer, got {maxiter!r}")
    wdt = getattr(W, "dtype", None)
    if wdt is not None and (wdt.is_complex if isinstance(wdt, torch.dtype)
                            else np.issubdtype(np.dtype(wdt), np.complexfloating)):
        # every path densifies / casts W to a real dtype, which would drop the imaginary part
        raise ValueError(f"solve: W must be real, got dtype {wdt}")
    progress = bool(kw.pop("progress", False))
    reference = kw.pop("reference", None)
    max_bytes = int(kw.pop("max_bytes", DEFAULT_MAX_BYTES))
    t0 = time.perf_counter()
    prob = prepare(W, z_star, a_hat, b)
    n_out, n_in = prob.op.shape
    if n_out == 0 or n_in == 0:
        raise ValueError(f"solve: W has an empty dimension, shape {(n_out, n_in)}")
    if method == "auto":
        method = _auto(W, (n_out, n_in), max_bytes)
    if method in ("fft", "fft-pcg", "fft-exact"):
        conv_spec(W)  # refuse strided / padded convs before any work
    tol_used = float(tol) if tol is not None else DEFAULT_TOL
    info: dict[str, Any] = {"tol": tol_used if method not in ("dense", "fft", "fft-exact") else None}
    case = _shape_case(n_out, n_in)
    info["case_from"] = "shape"
    N = prob.N

    if method == "dense":
        solver = kw.pop("solver", None)
        if solver is None:
            solver = DenseSolver(W, max_bytes=max_bytes, **{k: kw.pop(k) for k in ("cond_limit", "rtol") if k in kw})
        elif tuple(solver.shape) != (n_out, n_in):
            raise ValueError(f"solve: prebuilt DenseSolver is {solver.shape}, W is {(n_out, n_in)}")
        delta = solver.correction(prob.rhs())
        a = prob.a_hat + delta
        case, info["case_from"] = solver.case, "rank"
        info.update(solver.info())
    elif method in ("lsmr", "lsqr"):
        r = prob.rhs().detach().cpu().numpy().astype(np.float64)
        # scipy's default cap min(m, n) is too small for ill-conditioned convs; allow 10x
        mi = int(maxiter) if maxiter is not None else 10 * min(n_out, n_in)
        delta, it_info = lsmr_correction(W, r, method, tol=float(tol) if tol is not None else 1e-12, maxiter=mi,
                                         conlim=float(kw.pop("conlim", 1e12)), progress=progress)
        info.update(it_info)
        info["tol"] = it_info["tol"]
        a = prob.a_hat + torch.as_tensor(delta).to(prob.a_hat)
    elif method == "cg":
        mi = int(maxiter) if maxiter is not None else min(10 * min(n_out, n_in), 10_000)
        r = prob.rhs()
        if case == "MDP":
            delta, it_info = craig(prob.op.fwd, prob.op.adj, r, tol_used, mi, progress=progress)
            info["algorithm"] = "craig (CG on W Wᵀ)"
            bad = np.flatnonzero(~it_info["converged"])
            if bad.size:  # W Wᵀ y = r inconsistent (W not of full row rank): CGLS is min-norm LS
                idx = torch.as_tensor(bad, device=r.device)
                d2, i2 = cgls(prob.op.fwd, prob.op.adj, r[idx], tol_used, mi, progress=progress)
                delta[idx] = d2
                for k in ("iterations", "converged", "relres"):
                    it_info[k][bad] = i2[k]
                info["cgls_fallback_samples"] = bad
                info["algorithm"] += "; CGLS for samples where Craig did not converge"
        else:
            delta, it_info = cgls(prob.op.fwd, prob.op.adj, r, tol_used, mi, progress=progress)
            info["algorithm"] = "cgls"
        info.update(it_info)
        a = prob.a_hat + delta
    elif method in ("fft", "fft-pcg"):
        fs = _fft_solver(W, prob, kw)
        info.update(fs.info())
        shp_in, shp_out = (N,) + fs.in_shape, (N,) + fs.out_shape
        if method == "fft":
            a = fs.solve(prob.a_hat.reshape(shp_in), prob.target.reshape(shp_out)).reshape(N, -1)
            case = fs.case
            info["case_from"] = "channels"
            info["approximate"] = True
        else:
            mi = int(maxiter) if maxiter is not None else min(10 * min(n_out, n_in), 10_000)
            r = prob.rhs()

            def flat(fn, shape):  # the Krylov solvers work on flat (k, n) batches
                return lambda v: fn(v.reshape((v.shape[0],) + shape)).reshape(v.shape[0], -1)

            fwd, adj = flat(fs.forward, fs.in_shape), flat(fs.adjoint, fs.out_shape)
            if case == "MDP":
                delta, it_info = craig(fwd, adj, r, tol_used, mi, M=flat(fs.M_mdp, fs.out_shape),
                                       WWt=flat(fs.WWt, fs.out_shape), progress=progress)
                info["algorithm"] = "PCG on W Wᵀ (Fourier-domain), circulant preconditioner S(CCᵀ)⁻¹Sᵀ"
            else:
                delta, it_info = cgls(fwd, adj, r, tol_used, mi, M=flat(fs.M_ccp, fs.in_shape), progress=progress)
                info["algorithm"] = "PCGLS, circulant preconditioner (CᵀC)⁻¹"
            info.update(it_info)
            a = prob.a_hat + delta.reshape(N, -1)
    elif method == "fft-exact":
        cs = kw.pop("capacitance_solver", None)
        if cs is None:
            weight, in_shape = conv_spec(W)
            fs = kw.pop("fft_solver", None)
            cs = CapacitanceSolver(weight, in_shape, fft_solver=fs, max_bytes=max_bytes, device=prob.a_hat.device,
                                   dtype=prob.a_hat.dtype, **{k: kw.pop(k) for k in ("rcond", "reg") if k in kw})
        elif (cs.in_shape, cs.out_shape) != (tuple(prob.op.in_shape), tuple(prob.op.out_shape)):
            raise ValueError(f"solve: prebuilt CapacitanceSolver maps {cs.in_shape}->{cs.out_shape}, "
                             f"W maps {prob.op.in_shape}->{prob.op.out_shape}")
        info.update(cs.fs.info())
        info.update(cs.info())
        # a direct solve when λ = 0; the refinement tolerance only matters for the Tikhonov fallback
        rt = float(tol) if tol is not None else 1e-13
        mi = int(maxiter) if maxiter is not None else 100
        delta, it_info = cs.solve(prob.rhs().reshape((N,) + cs.out_shape), tol=rt, maxiter=mi)
        info.update(it_info)
        info["tol"] = rt if cs.lam > 0 else None
        a = prob.a_hat + delta.reshape(N, -1).to(prob.a_hat)
        if cs.lam == 0.0:  # the capacitance factorisation certifies the rank (see CapacitanceSolver)
            case, info["case_from"] = cs.case, "capacitance"
    else:  # pragma: no cover - guarded above
        raise ValueError(method)

    info.pop("converged_all", None)
    if "converged" in info:
        info["converged_all"] = bool(np.all(info["converged"]))
    residual = prob.residual(a)
    if reference is not None:
        ref = backend.to_torch(reference).reshape(N, -1).to(a)
        den = torch.linalg.vector_norm(ref - prob.a_hat, dim=1).clamp_min(torch.finfo(a.dtype).tiny)
        info["dist_to_exact"] = (torch.linalg.vector_norm(a - ref, dim=1) / den).cpu().numpy()
    info["seconds"] = time.perf_counter() - t0
    return SolveResult(prob.finish(a), case, method, residual, info)
