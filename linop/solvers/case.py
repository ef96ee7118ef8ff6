"""Which principle a reverse step realises: a property of W, decided once for every method.

Seed 001 §3.1 distinguishes two problems for ``W a + b = z*``:

* **MDP** (Eqs. 4–6) — W has full row rank: the constraint can be met exactly and the
  answer is the feasible point closest to ``â``;
* **CCP** (Eq. 7) — W has full column rank: the least-squares solution is unique.

When W has neither (numerical rank below both dimensions) every method still returns the
minimum-deviation least-squares point ``â + W⁺ r``, and the case is ``"rank-deficient"``.
A square W of full rank is both; it is reported as ``"MDP"`` (the constraint holds).

The label must not depend on the method that happened to run, so :func:`problem_case`
decides it from W alone: from the numerical rank (singular values above
``max(m, n)·eps·σ_max``, as ``numpy.linalg.matrix_rank``) when W is small enough for that
to be cheap (:data:`RANK_PROBE_BYTES`, and the caller's memory budget), else from the shape
(``n_out ≤ n_in`` → MDP, else CCP; full rank assumed).  A method that has factored W anyway
(``dense``) passes its rank in, so the probe costs nothing there.

**The paper's label** (:func:`channel_case`).  Seed 001 itself decides by the *architecture*:
§3.1 by the layer widths (case (a) ``n_l ≥ n_{l+1}`` → MDP, case (b) ``n_l < n_{l+1}`` →
CCP) and §3.2 for convolutions by the channels (``C_l ≥ C_{l+1}`` → MDP, else CCP), assuming
W full rank.  The two labels differ whenever the channel count and the operator's shape
disagree — e.g. a 5×5 conv 2 → 4 channels on a 12×12 map: ``C_l < C_{l+1}`` (paper: CCP) but
W is 256 × 288, full row rank (rank: MDP).  Both are reported; paper mode solves by the
paper's label (:class:`linop.network.reverse.ReverseOptions`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from ..operators.adapt import dense_array

__all__ = ["CASES", "PAPER_CASES", "RANK_PROBE_BYTES", "channel_case", "numerical_rank", "problem_case", "rank_case",
           "shape_case"]

CASES = ("MDP", "CCP", "rank-deficient")
#: The labels of :func:`channel_case` (the paper's rule knows no rank-deficient case).
PAPER_CASES = ("MDP", "CCP")
#: W whose dense factorisation (by :func:`linop.solvers.dense.dense_bytes`) fits in this many
#: bytes gets its rank computed (an SVD of at most ~1000 × 1500: well under a second).
RANK_PROBE_BYTES = 32 * 1024**2


def shape_case(n_out: int, n_in: int) -> str:
    """The case of a full-rank W of this shape: "MDP" if ``n_out ≤ n_in`` else "CCP"."""
    return "MDP" if n_out <= n_in else "CCP"


def channel_case(W: Any) -> tuple[str, str]:
    """``(case, case_from)`` of W by seed 001's own rule, from the architecture alone.

    * a convolution (an operator with a 4-d ``weight`` (C_out, C_in/groups, kh, kw) and a
      (C, H, W) ``in_shape``): ``C_in ≥ C_out`` → "MDP", else "CCP" (§3.2 (a)/(b));
      ``case_from = "channels"``;
    * anything else (fully connected layers, structural maps): ``n_in ≥ n_out`` → "MDP",
      else "CCP" (§3.1 (a)/(b), the layer widths); ``case_from = "units"``.

    Equal channels / widths are MDP, as the paper's case (a) says (``≥``).  The rank of W
    plays no part (the paper assumes W full rank): compare :func:`problem_case`.
    """
    weight = getattr(W, "weight", None)
    in_shape = tuple(getattr(W, "in_shape", ()) or ())
    out_shape = tuple(getattr(W, "out_shape", ()) or ())
    if weight is not None and getattr(weight, "ndim", 0) == 4 and len(in_shape) == 3 and len(out_shape) == 3:
        c_out, c_in = int(out_shape[0]), int(in_shape[0])
        return ("MDP" if c_in >= c_out else "CCP"), "channels"
    m, n = (int(s) for s in W.shape)
    return ("MDP" if n >= m else "CCP"), "units"


def rank_case(n_out: int, n_in: int, rank: int) -> str:
    """"MDP" (full row rank), "CCP" (full column rank) or "rank-deficient" (neither)."""
    return "MDP" if rank == n_out else ("CCP" if rank == n_in else "rank-deficient")


def numerical_rank(M: np.ndarray, rtol: float | None = None) -> int:
    """Singular values above ``rtol·σ_max`` (default ``rtol = max(m, n)·eps``), by LAPACK SVD."""
    m, n = M.shape
    s = scipy.linalg.svdvals(M, check_finite=False)
    tol = (max(m, n) * np.finfo(np.float64).eps if rtol is None else float(rtol)) * (s[0] if s.size else 0.0)
    return int(np.sum(s > tol)) if s.size and s[0] > 0 else 0


def problem_case(W: Any, max_bytes: int, rank: int | None = None) -> tuple[str, str]:
    """``(case, case_from)`` of W: ``case_from`` is "rank" or "shape" (see module docstring).

    Parameters
    ----------
    W : Operator (or anything :func:`linop.operators.as_operator` accepts)
    max_bytes : int
        The caller's memory budget; the rank probe never exceeds it.
    rank : int, optional
        W's numerical rank when already known (same definition as :func:`numerical_rank`).
    """
    from .dense import dense_bytes

    m, n = (int(s) for s in W.shape)
    if dense_bytes((m, n)) > min(RANK_PROBE_BYTES, int(max_bytes)):
        return shape_case(m, n), "shape"
    if rank is None:
        rank = numerical_rank(dense_array(W))
    return rank_case(m, n, int(rank)), "rank"
