"""The built-in methods of the reverse linear step, registered with :mod:`.registry`.

Every runner computes the minimum-norm least-squares correction ``a* = â + W⁺ r`` with
``r = z* − b − W â`` (seed 001 §3.1) — except ``fft``, the paper's approximation (§3.2):

==============  ==============================================================================
``dense``       factor W once (Cholesky of W Wᵀ / pivoted QR / SVD), :class:`.DenseSolver`.
``lsmr``,       scipy, per sample, on the correction from ``x0 = 0`` (so the minimum-norm one).
``lsqr``
``cg``          batched Craig (CG on W Wᵀ, MDP-shaped W; CGLS for samples where it stalls) or
                CGLS (CCP-shaped W); torch, so CPU, CUDA and cupy.
``fft``         seed 001 §3.2 (stride 1, no padding): approximate by construction.
``fft-pcg``     exact: Fourier-domain CG preconditioned by the FFT solve (beyond the paper);
                other convs: CG preconditioned by the circulant solve on the (polyphase) torus.
``fft-exact``   exact, direct: FFT + boundary capacitance matrix factored once per layer;
                unpadded stride-1 convs by :class:`.CapacitanceSolver`, all others (any zero
                padding, stride via polyphase, dilation, groups per group) by
                :class:`.ExactConvSolver` (boundary + ring); where either certifies full
                column rank (CCP), ``a* = W⁺ (z* − b)`` directly (no ``W â``; ``info["form"]``).
==============  ==============================================================================
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .capacitance import CapacitanceSolver
from .case import shape_case
from .dense import DenseSolver
from .fft import FFTConvSolver, conv_spec
from .fft_padded import ExactConvSolver, PaddedConvSolver
from .iterative import cgls, craig
from .registry import DEFAULT_TOL, SolveOptions, register_method
from .result import Problem
from .sparse import lsmr_correction

__all__ = [
    "exact_conv_spec",
    "run_cg",
    "run_dense",
    "run_fft",
    "run_fft_exact",
    "run_fft_pcg",
    "run_scipy",
    "stride1_conv_spec",
]

Run = "tuple[torch.Tensor, dict[str, Any]]"
#: Rows one capacitance solve of a single-pass solver takes at once (its BLAS-3 triangular solves).
_SOLVE_ROWS = 256


def run_dense(prob: Problem, opts: SolveOptions) -> Run:
    """``a = â + W⁺ r`` with a (prebuilt ``solver=`` or new) :class:`DenseSolver`."""
    solver = opts.extra.pop("solver", None)
    if solver is None:
        solver = DenseSolver(prob.op, max_bytes=opts.max_bytes, **opts.pop("cond_limit", "rtol"))
    elif tuple(solver.shape) != tuple(prob.op.shape):
        raise ValueError(f"solve: prebuilt DenseSolver is {solver.shape}, W is {tuple(prob.op.shape)}")
    a = prob.a_hat + solver.correction(prob.rhs())
    return a, {"tol": None, **solver.info()}


def _run_scipy(prob: Problem, opts: SolveOptions, which: str) -> Run:
    n_out, n_in = prob.op.shape
    r = prob.rhs().detach().cpu().numpy().astype(np.float64)
    # scipy's default cap min(m, n) is too small for ill-conditioned convs; allow 10x
    mi = int(opts.maxiter) if opts.maxiter is not None else 10 * min(n_out, n_in)
    delta, info = lsmr_correction(prob.op, r, which, tol=float(opts.tol) if opts.tol is not None else 1e-12,
                                  maxiter=mi, conlim=float(opts.extra.pop("conlim", 1e12)), progress=opts.progress)
    if prob.a_hat.device.type != "cpu":  # said, not hidden: the device-native exact methods are cg / fft-*
        info["device_note"] = (f"scipy {which} ran on the host: the data went from {prob.a_hat.device} to the "
                               "CPU and back; on a GPU use method='cg', 'fft-exact' or 'fft-pcg'")
    return prob.a_hat + torch.as_tensor(delta).to(prob.a_hat), info


def run_scipy(which: str):
    """The runner of scipy's ``which`` ("lsmr" or "lsqr")."""
    def runner(prob: Problem, opts: SolveOptions) -> Run:
        return _run_scipy(prob, opts, which)

    runner.__name__ = f"run_{which}"
    return runner


def run_cg(prob: Problem, opts: SolveOptions) -> Run:
    """Batched Craig (MDP-shaped W, CGLS fallback per stalled sample) or CGLS (CCP-shaped W)."""
    tol, mi, r = opts.tol if opts.tol is not None else DEFAULT_TOL, opts.krylov_maxiter(prob.op.shape), prob.rhs()
    info: dict[str, Any] = {"tol": tol}
    if shape_case(*prob.op.shape) == "CCP":
        delta, it_info = cgls(prob.fwd, prob.adj, r, tol, mi, progress=opts.progress)
        info["algorithm"] = "cgls"
    else:
        delta, it_info = craig(prob.fwd, prob.adj, r, tol, mi, progress=opts.progress)
        info["algorithm"] = "craig (CG on W Wᵀ)"
        bad = np.flatnonzero(~it_info["converged"])
        if bad.size:  # W Wᵀ y = r inconsistent (W not of full row rank): CGLS is min-norm LS
            idx = torch.as_tensor(bad, device=r.device)
            d2, i2 = cgls(prob.fwd, prob.adj, r[idx], tol, mi, progress=opts.progress)
            delta[idx] = d2
            for k in ("iterations", "converged", "relres"):
                it_info[k][bad] = i2[k]
            info["cgls_fallback_samples"] = bad
            info["algorithm"] += "; CGLS for samples where Craig did not converge"
    info.update(it_info)
    return prob.a_hat + delta, info


def _fft_solver(prob: Problem, opts: SolveOptions) -> FFTConvSolver:
    solver = opts.extra.pop("fft_solver", None)
    if solver is not None:
        return solver
    weight, in_shape = conv_spec(prob.op)
    return FFTConvSolver(weight, in_shape, device=prob.a_hat.device, dtype=prob.a_hat.dtype,
                         **opts.pop("rcond", "reg"))


def run_fft(prob: Problem, opts: SolveOptions) -> Run:
    """The paper's FFT solve (Eqs. 17–20), boundary term frozen at â: approximate."""
    fs = _fft_solver(prob, opts)
    N = prob.N
    a = fs.solve(prob.a_hat.reshape((N,) + fs.in_shape), prob.target.reshape((N,) + fs.out_shape))
    return a.reshape(N, -1), {"tol": None, **fs.info(), "approximate": True}


def run_fft_pcg(prob: Problem, opts: SolveOptions) -> Run:
    """Fourier-domain PCG (Craig / CGLS) preconditioned by the circulant FFT solve: exact.

    Padded / strided / grouped convs: the torus PCG of :class:`PaddedConvSolver` (``method="pcg"``:
    Craig / CGLS preconditioned by the circulant solve on the (polyphase) torus)."""
    try:
        conv_spec(prob.op)
    except NotImplementedError:
        return _run_padded(prob, opts, method="pcg")
    fs = _fft_solver(prob, opts)
    tol, mi, r = opts.tol if opts.tol is not None else DEFAULT_TOL, opts.krylov_maxiter(prob.op.shape), prob.rhs()

    def flat(fn, shape):  # the Krylov solvers work on flat (k, n) batches
        return lambda v: fn(v.reshape((v.shape[0],) + shape)).reshape(v.shape[0], -1)

    fwd, adj = flat(fs.forward, fs.in_shape), flat(fs.adjoint, fs.out_shape)
    info: dict[str, Any] = {"tol": tol, **fs.info()}
    if shape_case(*prob.op.shape) == "MDP":
        delta, it_info = craig(fwd, adj, r, tol, mi, M=flat(fs.M_mdp, fs.out_shape),
                               WWt=flat(fs.WWt, fs.out_shape), progress=opts.progress)
        info["algorithm"] = "PCG on W Wᵀ (Fourier-domain), circulant preconditioner S(CCᵀ)⁻¹Sᵀ"
    else:
        delta, it_info = cgls(fwd, adj, r, tol, mi, M=flat(fs.M_ccp, fs.in_shape), progress=opts.progress)
        info["algorithm"] = "PCGLS, circulant preconditioner (CᵀC)⁻¹"
    info.update(it_info)
    return prob.a_hat + delta.reshape(prob.N, -1), info


def exact_conv_spec(W: Any) -> None:
    """Applicability of ``fft-exact``: any :class:`~linop.operators.Conv2d` (stride, zero padding,
    dilation, groups); raises like :func:`conv_spec` for other operators."""
    from ..operators.conv import Conv2d

    if not isinstance(W, Conv2d):
        conv_spec(W)  # the ValueError naming what W is


stride1_conv_spec = exact_conv_spec  # the name before strides were covered


def fft_pcg_spec(W: Any) -> None:
    """Applicability of ``fft-pcg``: a conv (unpadded stride-1 ones in the Fourier domain, others
    via the polyphase / padded torus preconditioner)."""
    exact_conv_spec(W)


def _exact_solver(prob: Problem, opts: SolveOptions, method: str = "auto") -> ExactConvSolver | PaddedConvSolver:
    """A prebuilt ``padded_solver=`` (checked against W) or a new :class:`ExactConvSolver`."""
    ps = opts.extra.pop("padded_solver", None)
    if ps is None:
        kw = dict(max_bytes=opts.max_bytes, device=prob.a_hat.device, dtype=prob.a_hat.dtype)
        try:
            return ExactConvSolver.from_operator(prob.op, method=method, **kw)
        except np.linalg.LinAlgError:  # not quasi-definite in floating point: the exact PCG path
            return ExactConvSolver.from_operator(prob.op, method="pcg", **kw)
    if (tuple(ps.in_shape), tuple(ps.out_shape)) != (tuple(prob.op.in_shape), tuple(prob.op.out_shape)):
        raise ValueError(f"solve: prebuilt padded_solver maps {ps.in_shape}->{ps.out_shape}, "
                         f"W maps {prob.op.in_shape}->{prob.op.out_shape}")
    return ps


def _run_padded(prob: Problem, opts: SolveOptions, method: str = "auto") -> Run:
    """Any other conv: :class:`ExactConvSolver` (groups × polyphase × :class:`PaddedConvSolver`).

    Where the factorisation certifies a full-column-rank (CCP) ``W`` that needs no refinement
    (:attr:`.PaddedConvSolver.ccp_direct`), ``a* = W⁺ (z* − b)``: the same point as
    ``â + W⁺ (z* − b − W â)`` (``W⁺W = I``), without the conv ``W â``.  Otherwise the correction.
    The right-hand side is formed in row blocks (:meth:`.Problem.row_chunks`), never whole: a
    single-pass solver takes them as they come (:meth:`ExactConvSolver.solve_blocks`, capacitance
    solves of :data:`_SOLVE_ROWS` rows), any other one solves each block.
    """
    ps = _exact_solver(prob, opts, method)
    tol = float(opts.tol) if opts.tol is not None else None
    shape = (-1,) + tuple(ps.out_shape)
    if getattr(ps, "method", None) == "pcg":  # one batched Krylov run
        delta, it_info = ps.solve(prob.rhs().reshape(shape), tol=tol, maxiter=opts.maxiter)
        info: dict[str, Any] = {**ps.info(), **it_info, "tol": tol}
        return prob.a_hat + delta.reshape(prob.N, -1).to(prob.a_hat), info
    direct = bool(getattr(ps, "ccp_direct", False))
    rows = prob.target_rows if direct else prob.rhs_rows
    # blocks of at most 64 rows and 16 MiB (below glibc's largest mmap threshold, 32 MiB: the
    # block temporaries are reused from the heap instead of page-faulted in afresh)
    blocks = prob.row_chunks(16 * 1024**2, 64)
    form = "direct W⁺(z* − b)" if direct else "correction"
    if getattr(ps, "single_pass", False):
        d = ps.solve_blocks((rows(k0, k1).reshape(shape) for k0, k1 in blocks), _SOLVE_ROWS).reshape(prob.N, -1)
        a = d.to(prob.a_hat) if direct else prob.a_hat + d.to(prob.a_hat)
        N = prob.N
        return a, {**ps.info(), "iterations": np.zeros(N, dtype=np.int64), "converged": np.ones(N, dtype=bool),
                   "method": "capacitance", "tol": tol, "form": form}
    a = torch.empty_like(prob.a_hat)
    parts = []
    for k0, k1 in blocks:
        d, it = ps.solve(rows(k0, k1).reshape(shape), tol=tol, maxiter=opts.maxiter)
        a[k0:k1] = d.reshape(k1 - k0, -1) if direct else prob.a_hat[k0:k1] + d.reshape(k1 - k0, -1).to(prob.a_hat)
        parts.append(it)
    info = {**ps.info(), **parts[0], "tol": tol, "form": form}
    for key in ("iterations", "converged", "stagnated", "last_update"):  # per-sample arrays
        if key in parts[0]:
            info[key] = np.concatenate([p[key] for p in parts])
    return a, info


def run_fft_exact(prob: Problem, opts: SolveOptions) -> Run:
    """FFT + boundary capacitance matrix (prebuilt ``capacitance_solver=`` or new): exact, direct.
    Padded, strided, dilated or grouped convs go to :class:`ExactConvSolver` (groups × polyphase ×
    :class:`PaddedConvSolver`).  Where :attr:`.CapacitanceSolver.ccp_direct` certifies full column
    rank, ``a* = W⁺ (z* − b)`` (the same point as ``â + W⁺ r``, without ``W â``); ``info["form"]``."""
    cs = opts.extra.pop("capacitance_solver", None)
    if cs is None:
        try:
            conv_spec(prob.op)
        except NotImplementedError:
            return _run_padded(prob, opts)
        weight, in_shape = conv_spec(prob.op)
        cs = CapacitanceSolver(weight, in_shape, fft_solver=opts.extra.pop("fft_solver", None),
                               max_bytes=opts.max_bytes, device=prob.a_hat.device, dtype=prob.a_hat.dtype,
                               **opts.pop("rcond", "reg"))
    elif (cs.in_shape, cs.out_shape) != (tuple(prob.op.in_shape), tuple(prob.op.out_shape)):
        raise ValueError(f"solve: prebuilt CapacitanceSolver maps {cs.in_shape}->{cs.out_shape}, "
                         f"W maps {prob.op.in_shape}->{prob.op.out_shape}")
    info: dict[str, Any] = {**cs.fs.info(), **cs.info()}
    # a direct solve when λ = 0; the refinement tolerance only matters for the Tikhonov fallback
    rt = float(opts.tol) if opts.tol is not None else 1e-13
    mi = int(opts.maxiter) if opts.maxiter is not None else 100
    # certified full column rank (CapacitanceSolver.ccp_direct): a* = W⁺(z* − b), no W â
    direct = cs.ccp_direct
    rhs = prob.target if direct else prob.rhs()
    delta, it_info = cs.solve(rhs.reshape((prob.N,) + cs.out_shape), tol=rt, maxiter=mi)
    info.update(it_info)
    info["tol"] = rt if cs.lam > 0 else None
    info["form"] = "direct W⁺(z* − b)" if direct else "correction"
    delta = delta.reshape(prob.N, -1).to(prob.a_hat)
    return (delta if direct else prob.a_hat + delta), info


register_method("dense", run_dense, summary="direct: Cholesky of W Wᵀ / pivoted QR / SVD, factored once")
register_method("lsmr", run_scipy("lsmr"), summary="scipy LSMR per sample on the correction (exact)")
register_method("lsqr", run_scipy("lsqr"), summary="scipy LSQR per sample on the correction (exact)")
register_method("cg", run_cg, summary="batched Craig / CGLS in torch (exact; CPU, CUDA, cupy)")
register_method("fft", run_fft, applicable=conv_spec,
                summary="seed 001 §3.2 FFT solve, stride-1 unpadded convs (approximate)")
register_method("fft-pcg", run_fft_pcg, applicable=fft_pcg_spec,
                summary="CG preconditioned by the (torus / polyphase) FFT solve (exact); any conv")
register_method("fft-exact", run_fft_exact, applicable=exact_conv_spec,
                summary="FFT + boundary/ring capacitance, factored once (exact, direct); any zero padding, "
                        "stride (polyphase), dilation, groups")
