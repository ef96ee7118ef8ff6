"""Exact sparse reverse step with scipy's LSMR / LSQR, one column per sample.

For a convolution of any stride and padding, W is the explicit sparse conv matrix
(``Conv2d.to_sparse()``).  LSQR and LSMR, started from ``x0 = None`` (zero), generate
iterates in ``range(Wᵀ)`` and therefore converge to the *minimum-norm* least-squares
solution.  That is why they are run on the correction ``W δ = z* − b − W â`` and ``â`` is
added afterwards: started at ``â`` they would return a different (not minimum-deviation)
point whenever W has a null space — exactly the MDP case (seed 001 Eq. 4).

scipy's solvers take one right-hand side at a time, so this module loops over samples
(the inherent interface of the reference solver; the batched, vectorised alternative is
``method="cg"``).  ``progress=True`` shows a tqdm bar.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse.linalg as spla

from ..operators.adapt import scipy_form

__all__ = ["lsmr_correction"]


def lsmr_correction(W: Any, r: np.ndarray, solver: str = "lsmr", tol: float = 1e-12,
                    maxiter: int | None = None, conlim: float = 1e12, progress: bool = False) -> tuple[np.ndarray, dict]:
    """``δ_i = W⁺ r_i`` for each row of ``r`` (N, n_out) with scipy ``lsmr``/``lsqr`` from x0 = 0.

    ``tol`` is passed as both ``atol`` and ``btol`` (scipy's stopping rules: relative
    residual for consistent systems, relative normal-equation residual otherwise).
    """
    if solver not in ("lsmr", "lsqr"):
        raise ValueError(f"solve: solver must be 'lsmr' or 'lsqr', got {solver!r}")
    A = scipy_form(W)  # explicit matrices as given, other operators as their CSR
    fn = spla.lsmr if solver == "lsmr" else spla.lsqr
    N = r.shape[0]
    out = np.zeros((N, A.shape[1]), dtype=np.float64)
    its = np.zeros(N, dtype=np.int64)
    istop = np.zeros(N, dtype=np.int64)
    rows = range(N)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=solver, unit="sample", leave=False)
    for i in rows:
        if solver == "lsmr":
            res = fn(A, r[i], atol=tol, btol=tol, conlim=conlim, maxiter=maxiter)
        else:
            res = fn(A, r[i], atol=tol, btol=tol, conlim=conlim, iter_lim=maxiter)
        out[i] = res[0]
        istop[i], its[i] = res[1], res[2]
    # istop 1/2: tolerance met; 3: conlim hit; 7: iteration limit (scipy docs)
    return out, {"iterations": its, "istop": istop, "converged": np.isin(istop, (0, 1, 2, 4, 5)),
                 "tol": tol, "conlim": conlim, "maxiter": maxiter, "solver": solver}
