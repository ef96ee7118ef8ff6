""":func:`solve`: validate, pick a method, dispatch to the registry, build the result."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .. import backend
from ..operators.base import Operator
from .capacitance import capacitance_bytes
from .case import problem_case
from .dense import dense_bytes
from .fft import conv_spec
from .fft_padded import exact_conv_bytes
from .methods import exact_conv_spec
from .registry import METHODS, SolveOptions, get_method
from .result import DEFAULT_MAX_BYTES, Problem, SolveResult, prepare

__all__ = ["AUTO_CAPACITANCE_BYTES", "AUTO_DENSE_BYTES", "AUTO_DENSE_BYTES_NO_FFT", "auto_method", "solve"]

#: "auto" uses the dense method below this many bytes of factorisation.
AUTO_DENSE_BYTES = 256 * 1024**2
#: ... and up to this many (1.5 GiB) for operators no FFT path covers (non-conv operators, convs whose
#: stride does not divide the input size) and for convs whose capacitance is larger than the dense factor.
AUTO_DENSE_BYTES_NO_FFT = 3 * 1024**3 // 2
#: "auto" uses fft-exact when its capacitance matrix needs at most this many bytes.
AUTO_CAPACITANCE_BYTES = 1024**3


def auto_method(op: Operator, max_bytes: int) -> str:
    """The method ``"auto"`` picks for ``op`` under the memory budget ``max_bytes``: the fastest exact one.

    * stride-1 unpadded convs: ``dense`` when its factorisation is small
      (:data:`AUTO_DENSE_BYTES`), else ``fft-exact`` when its capacitance matrix fits
      (:data:`AUTO_CAPACITANCE_BYTES`), else ``fft-pcg``;
    * every other :class:`~linop.operators.Conv2d` (padding, stride, dilation, groups):
      ``fft-exact`` (:class:`.ExactConvSolver`) when its factorisations fit and are smaller than
      the dense one (both are ``O(m³)`` direct factorisations, so the smaller is the faster),
      else ``dense`` up to :data:`AUTO_DENSE_BYTES_NO_FFT`, else ``fft-pcg`` (CG preconditioned by
      the torus FFT solve); ``cg`` where no polyphase form exists (a stride not dividing the size);
    * other operators: ``dense`` up to :data:`AUTO_DENSE_BYTES_NO_FFT`, else ``cg``.

    Every bound is also capped by ``max_bytes``.
    """
    need = dense_bytes(op.shape)
    try:
        w, (_, H, Wd) = conv_spec(op)
    except (ValueError, NotImplementedError):
        return _auto_other(op, need, max_bytes)
    if need <= min(AUTO_DENSE_BYTES, max_bytes):
        return "dense"
    cap = capacitance_bytes(int(w.shape[0]), H, Wd, int(w.shape[2]), int(w.shape[3]))
    return "fft-exact" if cap <= min(AUTO_CAPACITANCE_BYTES, max_bytes) else "fft-pcg"


def _auto_other(op: Operator, need_dense: int, max_bytes: int) -> str:
    """Padded / strided / dilated / grouped convs and non-conv operators (:func:`auto_method`)."""
    dense_ok = need_dense <= min(AUTO_DENSE_BYTES_NO_FFT, max_bytes)
    try:
        exact_conv_spec(op)
        cap = exact_conv_bytes(op)
    except (ValueError, NotImplementedError):  # not a conv, or no polyphase form
        return "dense" if dense_ok else "cg"
    if cap <= min(AUTO_CAPACITANCE_BYTES, max_bytes) and (cap <= need_dense or not dense_ok):
        return "fft-exact"
    return "dense" if dense_ok else "fft-pcg"


def _options(method: str, tol: float | None, maxiter: int | None, kw: dict) -> SolveOptions:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"solve: method must be one of {tuple(METHODS)}, got {method!r}")
    # a number, not a string / array / bool (float("1e-3") or an array's truth value would
    # either slip through or fail deep inside numpy without naming the argument)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer))
                            or not (0 < float(tol) < 1)):
        raise ValueError(f"solve: tol must be a number in (0, 1), got {tol!r}")
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, (int, np.integer))
                                or int(maxiter) < 1):
        raise ValueError(f"solve: maxiter must be a positive integer, got {maxiter!r}")
    progress = bool(kw.pop("progress", False))
    max_bytes = int(kw.pop("max_bytes", DEFAULT_MAX_BYTES))
    return SolveOptions(tol=None if tol is None else float(tol), maxiter=maxiter, max_bytes=max_bytes, progress=progress, extra=kw)


def _result(prob: Problem, a: torch.Tensor, method: str, info: dict, opts: SolveOptions, reference: Any,
            t0: float) -> SolveResult:
    """The :class:`SolveResult`: W's case, residuals, ``dist_to_exact``, timing."""
    case, info["case_from"] = problem_case(prob.op, opts.max_bytes, info.get("rank"))
    info.pop("converged_all", None)
    if "converged" in info:
        info["converged_all"] = bool(np.all(info["converged"]))
    residual = prob.residual(a)
    if reference is not None:
        ref = backend.to_torch(reference).reshape(prob.N, -1).to(a)
        den = torch.linalg.vector_norm(ref - prob.a_hat, dim=1).clamp_min(torch.finfo(a.dtype).tiny)
        info["dist_to_exact"] = (torch.linalg.vector_norm(a - ref, dim=1) / den).cpu().numpy()
    info["seconds"] = time.perf_counter() - t0
    return SolveResult(prob.finish(a), case, method, residual, info)


def solve(W: Any, z_star: Any, a_hat: Any, b: Any = None, method: str = "auto", tol: float | None = None,
          maxiter: int | None = None, **kw: Any) -> SolveResult:
    """Reconstruct ``a*`` with ``W a* + b ≈ z*`` closest to ``â`` (seed 001 Eqs. 4–7, 17–20).

    Computes the minimum-norm least-squares correction ``a* = â + W⁺ (z* − b − W â)``: the
    MDP solution (Eqs. 4–6, closest to ``â`` among exact solutions) when W has full row
    rank, the CCP solution (Eq. 7, least computing-consistency error) when it has full
    column rank, the closest-to-``â`` least-squares solution in between.  ``method="fft"``
    is the paper's approximation (§3.2) instead.

    Parameters
    ----------
    W : linop ``Operator`` (``Linear``, ``Conv2d``, ...), dense array / tensor (n_out, n_in),
        scipy / cupyx sparse matrix, or any scipy ``LinearOperator``
        (adapted by :func:`linop.operators.as_operator`).
    z_star : (N, n_out) or (N, *out_shape), or one sample (n_out,) / out_shape
        The reconstructed next pre-activation ``z*_{l+1}``.
    a_hat : (N, n_in) or (N, *in_shape), or one sample (n_in,) / in_shape
        The forward feature ``â_l`` (numpy, torch on any device, or cupy).
    b : None, scalar, (n_out,), per-channel (C_out,) or (N, n_out)
        The layer's bias.
    method : str
        ``"auto"`` or a registered method (:data:`linop.solvers.METHODS`; built in:
        ``"dense"``, ``"lsmr"``, ``"lsqr"``, ``"cg"``, ``"fft"``, ``"fft-pcg"``,
        ``"fft-exact"``, see :mod:`linop.solvers.methods`; add your own with
        :func:`linop.solvers.register_method`).  ``"auto"``: :func:`auto_method`.
    tol : float
        Stopping tolerance of the iterative methods (default 1e-10; lsmr/lsqr: atol = btol
        = 1e-12; fft-exact's Tikhonov refinement 1e-13).
    maxiter : int
        Iteration cap of the iterative methods (default 10·min(n) capped at 10,000 for
        cg / fft-pcg; 10·min(n) for lsmr/lsqr; 100 refinement steps for fft-exact).
    **kw
        ``solver=`` a prebuilt :class:`DenseSolver` (dense) or ``fft_solver=`` a prebuilt
        :class:`FFTConvSolver` (fft, fft-pcg, fft-exact) or ``capacitance_solver=`` a prebuilt
        :class:`CapacitanceSolver` (fft-exact, unpadded stride-1 convs) or ``padded_solver=`` a
        prebuilt :class:`~linop.solvers.fft_padded.ExactConvSolver` (fft-exact / fft-pcg on any
        other conv), to factor once per layer across batches;
        ``max_bytes=`` memory budget of the dense / fft-exact factorisations; ``cond_limit=``, ``rtol=``
        (dense); ``conlim=`` (lsmr/lsqr); ``rcond=``, ``reg=`` (fft); ``progress=True``;
        ``reference=`` an exact ``a*`` to report ``info["dist_to_exact"]`` against.

    Returns
    -------
    SolveResult
        ``a`` — **return rule**: in the array type of ``a_hat`` (numpy in → numpy out, torch →
        torch on its device and dtype, cupy → cupy) and its layout (a batch gives a batch, one
        sample gives one sample); computation runs in ``a_hat``'s dtype (pass float64 for
        exactness).  ``case`` (a property of W, the same for every method:
        :func:`linop.solvers.case.problem_case`), ``method``, ``residual`` (per sample,
        ``||W a + b − z*||/||z* − b||``, shape (N,), N = 1 for one sample) and ``info``
        (iterations, tolerances, condition numbers, timings).

    Raises
    ------
    TypeError  W of an unsupported type; ValueError  bad method / shapes / NaN / complex W;
    NotImplementedError  fft on strided or padded convs; MemoryError  a dense
    factorisation over ``max_bytes``.
    """
    reference = kw.pop("reference", None)
    opts = _options(method, tol, maxiter, kw)
    t0 = time.perf_counter()
    prob = prepare(W, z_star, a_hat, b)
    name = auto_method(prob.op, opts.max_bytes) if method == "auto" else method
    entry = get_method(name)
    if entry.applicable is not None:
        entry.applicable(prob.op)  # refuse before any work
    a, info = entry.runner(prob, opts)
    return _result(prob, a, name, dict(info), opts, reference, t0)
