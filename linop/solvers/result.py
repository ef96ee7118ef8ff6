"""Shared pieces of the reverse linear step: the result type and problem normalisation.

Every solver computes the minimum-norm least-squares correction (seed 001 §3.1)::

    a* = â + W⁺ (z* − b − W â),

which is the MDP solution (Eqs. 4–6) when W has full row rank, the CCP solution (Eq. 7)
when W has full column rank, and the minimum-deviation least-squares solution otherwise.
``W`` reaches the solvers as one type, an :class:`~linop.operators.Operator`
(:func:`linop.operators.as_operator` adapts dense / sparse matrices and foreign
``LinearOperator`` s at the edge); this module turns the many layouts of ``â``, ``z*`` and
``b`` into flat ``(N, n)`` torch batches, and back.

**Batch rule.**  ``â`` and ``z*`` are batches ``(N, n)`` / ``(N, *shape)``, or one sample
``(n,)`` / ``shape``; the result has the layout of ``â`` (one sample in → one sample out).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import backend
from ..operators.adapt import as_operator
from ..operators.base import Operator

__all__ = ["SolveResult", "Problem", "prepare", "DEFAULT_MAX_BYTES", "CHUNK_BYTES"]

#: Default memory budget (bytes) for dense factorisations; override with ``max_bytes=``.
DEFAULT_MAX_BYTES = 2 * 1024**3


@dataclass
class SolveResult:
    """Outcome of a reverse linear step ``W a + b = z*``.

    Attributes
    ----------
    a : array
        The reconstructed feature ``a*`` in the layout, type and device of ``a_hat``.
    case : {"MDP", "CCP", "rank-deficient"}
        Which principle the answer realises — a property of W, the same whichever method ran
        (:func:`linop.solvers.case.problem_case`: from the numerical rank when W is small,
        else from the shape; ``info["case_from"]`` says which).
    method : str
        The method that ran (a name of :data:`linop.solvers.METHODS`, never ``"auto"``).
    residual : numpy array (N,)
        Per-sample relative constraint residual ``||W a* + b − z*|| / ||z* − b||``
        (exactly 0 when ``z* − b = 0`` and the constraint holds).  For CCP this is the
        least-squares misfit, not a failure.
    info : dict
        Iterations, tolerances, condition numbers, ``dist_to_exact`` when known, ...
    """

    a: Any
    case: str
    method: str
    residual: np.ndarray
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        r = self.residual
        rmax = float(np.max(r)) if r.size else 0.0
        return f"SolveResult(case={self.case!r}, method={self.method!r}, N={r.size}, max residual={rmax:.3e})"


#: Rows per chunk of :meth:`Problem.residual` on the CPU: about this many bytes of output.  A
#: whole-batch temporary of a wide layer (3→32 at 32×32, batch 256: 67 MB) is above glibc's mmap
#: threshold, so every such temporary is fresh memory whose page faults cost as much as the
#: direct conv itself (measured: conv + subtract + norm of that batch 70 ms whole, 12 ms in 2 MiB
#: chunks, 2 threads); chunks are reused from the heap.  Not smaller: each chunk is a few parallel
#: regions, which cost far more when another process holds the cores (conv0's solve, 2 threads
#: beside a 2-worker job: 2.5 s with 2 MiB chunks, 1.2 s with 16 MiB; 1 thread, quiet: 0.19 s
#: vs 0.23 s) — 8 MiB is between.
CHUNK_BYTES = 8 * 1024**2


@dataclass
class Problem:
    """A normalised reverse step: flat batches and the map, plus how to undo the layout.

    ``target = z* − b`` is formed on first use (and kept); :meth:`target_rows` gives a block of
    its rows without forming the whole batch, for runners that work in row chunks."""

    op: Operator
    a_hat: torch.Tensor  # (N, n_in)
    z: torch.Tensor  # (N, n_out) = z*
    like: Any  # the caller's a_hat (for the output type / layout)
    a_layout: tuple[int, ...]  # caller's a_hat shape
    bias: torch.Tensor | None = None  # (1, n_out) or (N, n_out)
    _target: torch.Tensor | None = field(default=None, repr=False)

    @property
    def N(self) -> int:
        return self.a_hat.shape[0]

    @property
    def target(self) -> torch.Tensor:
        """``z* − b`` (N, n_out), formed once."""
        if self._target is None:
            self._target = self.z if self.bias is None else self.z - self.bias
        return self._target

    def target_rows(self, k0: int, k1: int) -> torch.Tensor:
        """Rows ``k0:k1`` of :attr:`target` (from the kept target, else formed for these rows only)."""
        if self._target is not None or self.bias is None:
            return (self._target if self._target is not None else self.z)[k0:k1]
        return self.z[k0:k1] - (self.bias if self.bias.shape[0] == 1 else self.bias[k0:k1])

    def row_chunks(self, max_bytes: int = CHUNK_BYTES, max_rows: int | None = None) -> list[tuple[int, int]]:
        """``(k0, k1)`` row blocks of at most ``max_bytes`` of output (and ``max_rows`` rows) each, at
        least one row; on a GPU one block (its caching allocator has no fresh-memory cost)."""
        N = self.N
        if self.a_hat.device.type != "cpu":
            return [(0, N)]
        step = max(1, int(max_bytes) // max(1, self.op.shape[0] * self.z.element_size()))
        step = step if max_rows is None else max(1, min(step, int(max_rows)))
        return [(k, min(N, k + step)) for k in range(0, N, step)]

    def fwd(self, X: torch.Tensor) -> torch.Tensor:
        """``W x`` for a flat batch (k, n_in) → (k, n_out)."""
        return self.op.apply(X.reshape((X.shape[0],) + self.op.in_shape)).reshape(X.shape[0], -1)

    def adj(self, Y: torch.Tensor) -> torch.Tensor:
        """``Wᵀ y`` for a flat batch (k, n_out) → (k, n_in)."""
        return self.op.apply_adjoint(Y.reshape((Y.shape[0],) + self.op.out_shape)).reshape(Y.shape[0], -1)

    def rhs(self) -> torch.Tensor:
        """``r = z* − b − W â`` (N, n_out): the right-hand side of the correction."""
        return self.rhs_rows(0, self.N)

    def rhs_rows(self, k0: int, k1: int) -> torch.Tensor:
        """Rows ``k0:k1`` of :meth:`rhs`."""
        return self.target_rows(k0, k1) - self.fwd(self.a_hat[k0:k1])

    def finish(self, a_flat: torch.Tensor) -> Any:
        """``a_flat`` back in the caller's layout, type and device."""
        a = a_flat.reshape(self.a_layout)
        if isinstance(self.like, torch.Tensor):
            return a.to(self.like.dtype)
        return backend.from_torch(a, like=self.like)

    def residual(self, a_flat: torch.Tensor) -> np.ndarray:
        """Per-sample ``||W a + b − z*|| / ||z* − b||`` as float64 numpy.

        A real evaluation of ``W a`` (the operator's own forward), in row chunks of
        :meth:`row_chunks` so that no whole-batch output temporary is formed."""
        res = a_flat.new_empty(self.N, dtype=self.z.dtype)
        den = torch.empty_like(res)
        for k0, k1 in self.row_chunks():
            t = self.target_rows(k0, k1)
            res[k0:k1] = torch.linalg.vector_norm(self.fwd(a_flat[k0:k1]).to(t.dtype) - t, dim=1)
            den[k0:k1] = torch.linalg.vector_norm(t, dim=1)
        tiny = torch.finfo(res.dtype).tiny
        return (res / torch.clamp(den, min=tiny)).detach().cpu().numpy().astype(np.float64)


def _flat_batch(x: Any, n: int, shape: tuple[int, ...], what: str, device, dtype) -> torch.Tensor:
    try:
        t = backend.to_torch(x)
    except (TypeError, ValueError, RuntimeError) as exc:  # strings, ragged lists, objects
        raise TypeError(f"solve: {what} must be an array / tensor of floats, got {type(x).__name__} ({exc})") from None
    if not t.is_floating_point():
        raise ValueError(f"solve: {what} must be floating point, got dtype {t.dtype}")
    if (t.ndim >= 1 and tuple(t.shape[1:]) == tuple(shape)) or (t.ndim == 2 and t.shape[1] == n):
        t = t.reshape(t.shape[0], n)  # a batch
    elif tuple(t.shape) == tuple(shape) or tuple(t.shape) == (n,):
        t = t.reshape(1, n)  # one sample
    else:
        alt = "" if tuple(shape) == (n,) else f" or (N, {', '.join(map(str, shape))})"
        raise ValueError(f"solve: {what} must have shape (N, {n}){alt} or be one sample of that shape, "
                         f"got {tuple(t.shape)}")
    t = t.to(device=device, dtype=dtype)
    if not _all_finite(t):
        raise ValueError(f"solve: {what} contains NaN or inf")
    return t


def _all_finite(t: torch.Tensor) -> bool:
    """Every entry finite.  A NaN or inf entry makes the sum non-finite, so a finite sum proves
    it at the cost of one reduction (~15× cheaper than the elementwise test on a batch); a
    non-finite sum (also an overflow of finite entries) falls back to the elementwise test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _bias(b: Any, N: int, n_out: int, out_shape: tuple[int, ...], device, dtype) -> torch.Tensor | None:
    if b is None:
        return None
    t = backend.to_torch(b) if not np.isscalar(b) else torch.tensor(float(b), dtype=torch.float64)  # not float32
    t = t.to(device=device, dtype=dtype)
    if t.ndim == 0:
        return t.expand(1, n_out)
    if t.numel() == n_out:
        return t.reshape(1, n_out)
    if t.ndim == 1 and len(out_shape) > 1 and t.shape[0] == out_shape[0]:  # per-channel conv bias
        return t.reshape((1, out_shape[0]) + (1,) * (len(out_shape) - 1)).expand((1,) + out_shape).reshape(1, n_out)
    if t.ndim >= 2 and t.shape[0] == N and t[0].numel() == n_out:
        return t.reshape(N, n_out)
    raise ValueError(
        f"solve: bias b of shape {tuple(t.shape)} does not fit the output {out_shape} (n_out={n_out}); "
        "pass a scalar, a vector of length n_out, a per-channel vector or a (N, n_out) batch"
    )


def prepare(W: Any, z_star: Any, a_hat: Any, b: Any = None, dtype: torch.dtype | None = None) -> Problem:
    """Validate and normalise the inputs of :func:`linop.solvers.solve` (raises ValueError early).

    ``W`` goes through :func:`~linop.operators.as_operator`; computation runs on ``a_hat``'s
    device, in ``dtype`` (default: ``a_hat``'s floating dtype, float64 for integer input)."""
    if a_hat is None or z_star is None:
        raise ValueError("solve: a_hat and z_star are required")
    op = as_operator(W, "W")
    try:
        a_t = backend.to_torch(a_hat)
    except (TypeError, ValueError, RuntimeError) as exc:  # strings, ragged lists, objects
        raise TypeError(f"solve: a_hat must be an array / tensor of floats, got {type(a_hat).__name__} ({exc})") from None
    device = a_t.device
    dt = dtype or (a_t.dtype if a_t.is_floating_point() else torch.float64)
    n_out, n_in = op.shape
    a = _flat_batch(a_hat, n_in, op.in_shape, "a_hat", device, dt)
    z = _flat_batch(z_star, n_out, op.out_shape, "z_star", device, dt)
    if a.shape[0] != z.shape[0]:
        raise ValueError(f"solve: a_hat has {a.shape[0]} samples but z_star has {z.shape[0]}")
    bb = _bias(b, a.shape[0], n_out, op.out_shape, device, dt)
    return Problem(op, a, z, a_hat, tuple(a_t.shape), bias=bb)
