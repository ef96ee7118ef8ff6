"""The operator base class and the ``dottest`` adjoint check.

Every layer of the equivalent network is an :class:`Operator`: a
``scipy.sparse.linalg.LinearOperator`` acting on NCHW tensors flattened in C order,
that exists in three agreeing forms:

* ``apply`` / ``apply_adjoint`` — batched torch evaluation on tensors of shape
  ``(N, *in_shape)`` / ``(N, *out_shape)`` (the fast path, CPU or CUDA);
* ``matvec`` / ``rmatvec`` / ``matmat`` / ``rmatmat`` (and ``.T``/``.H``) on flat numpy or
  cupy arrays, routed through the torch path with zero-copy views;
* ``to_sparse()`` — the explicit CSR matrix (scipy.sparse, or cupyx on request).

Subclasses implement ``_apply``, ``_apply_adjoint`` and ``_coo`` (the structural
non-zeros as ``rows, cols, vals``); everything else is derived here.  Subclasses keep
their parameters as CPU torch tensors; ``_param`` moves / casts them lazily to the
device and dtype of the data they meet, and caches the result.
"""
from __future__ import annotations

import inspect
from math import prod
from typing import Any, Sequence

import numpy as np
import scipy.sparse
import scipy.sparse.linalg as spla
import torch

from .. import backend

__all__ = ["Operator", "AdjointOperator", "dottest", "torch_dtype", "as_shape"]

_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16,
}


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype for a numpy dtype / torch dtype / string."""
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = np.dtype(dtype)
    if dt not in _TORCH_DTYPES:
        raise ValueError(f"unsupported dtype {dt}; use float32 or float64")
    return _TORCH_DTYPES[dt]


def numpy_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        return np.dtype(str(dtype).replace("torch.", ""))
    return np.dtype(dtype)


def as_shape(shape: Sequence[int] | int, name: str = "shape") -> tuple[int, ...]:
    """Validate a per-sample shape (positive ints)."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (int(shape),)
    # strings iterate as digits ("144" would read as (1, 4, 4)) and int(1.5) truncates: refuse both
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"{name} must be a sequence of positive ints, got {shape!r}")
    items = list(shape)
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in items):
        raise TypeError(f"{name} must be a sequence of positive ints, got {shape!r}")
    out = tuple(int(s) for s in items)
    if not out or any(s <= 0 for s in out):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {shape!r}")
    return out


class Operator(spla.LinearOperator):
    """Base class of all explicit CNN layer operators.

    Parameters
    ----------
    in_shape, out_shape : tuple of int
        Per-sample shapes of the input and output (e.g. ``(C, H, W)`` or ``(F,)``);
        the operator's matrix shape is ``(prod(out_shape), prod(in_shape))``.
    dtype : numpy dtype
        Native dtype of the operator's parameters.  ``apply`` computes in the dtype of
        the data it is given (parameters are cast, once, and cached).
    """

    #: lazily filled memos, not content (``linop.studies.store.content_hash`` skips them)
    _memo_attrs = ("_param_cache", "_structure")

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], dtype: Any = np.float64):
        self.in_shape = as_shape(in_shape, "in_shape")
        self.out_shape = as_shape(out_shape, "out_shape")
        super().__init__(dtype=numpy_dtype(dtype), shape=(prod(self.out_shape), prod(self.in_shape)))
        self._param_cache: dict[tuple, torch.Tensor] = {}

    #: the matrix may have at most one non-zero per row and per column (selections, paddings,
    #: scalings, diagonals, window-1 pooling): a reverse step then tries the closed form
    #: ``W⁺ = Wᵀ`` with reciprocal values (it checks the actual pattern of ``to_sparse()``).  A
    #: general operator (False, the default) is never assembled for that test.  A user's
    #: operator of that kind sets it to get the closed-form reverse step.
    pinv_by_pattern: bool = False

    def average_windows(self) -> tuple[Any, Any, Any] | None:
        """``(kernel_size, stride, padding)`` when the operator averages its input over pooling
        windows (average pooling in floor mode, no divisor override): the windows into which
        seed 001 §3.4(b) copies a pooled target back (``ReverseOptions.avgpool == "copy"``).
        None (the default) for every other operator."""
        return None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        own = cls.__dict__.get("apply_parts")
        if own is not None and "out" not in inspect.signature(own).parameters:
            # a user block row written as ``apply_parts(self, xs)`` (before ``out=``): it keeps
            # working in chunked sweeps — its result is returned and the caller copies it
            def apply_parts(self, xs, out=None, _own=own):
                return _own(self, xs)

            apply_parts.__doc__ = own.__doc__  # (no __wrapped__: signature() must show out=)
            cls.apply_parts = apply_parts

    # ----------------------------------------------------------------- subclass API
    def _apply(self, x: torch.Tensor) -> torch.Tensor:  # (N, *in_shape) -> (N, *out_shape)
        raise NotImplementedError

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # (N, *out_shape) -> (N, *in_shape)
        raise NotImplementedError

    def _coo(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Structural non-zeros ``(rows, cols, vals)`` of the matrix (no explicit zeros
        for out-of-bounds taps).  Duplicates are summed by the CSR conversion."""
        raise NotImplementedError

    # ----------------------------------------------------------------- evaluation strategies
    # The sweep engine (linop.linearize) evaluates every local operator through these three
    # methods only, never by testing its type: an operator (a user's too) gets a fused path by
    # implementing them.  Each is an evaluation strategy of ``_apply``: the same values, bit for bit.
    def apply_parts(self, xs: Sequence[torch.Tensor | None], out: torch.Tensor | None = None) -> torch.Tensor:
        r"""``y = Σ_i A_i x_i`` on the operator's inputs, one batch per part; a plain operator is a
        block row with one part, ``y = A x_0``.

        Parameters
        ----------
        xs : sequence of tensors
            ``xs[i]`` of shape ``(N, *part_shape_i)``; a plain operator takes exactly one.
            Block rows (:class:`~linop.operators.composite.BlockRow`) accept ``None`` for a
            zero input.
        out : tensor, optional
            A batch of the result's shape ``(N, *out_shape)``, dtype and memory layout, possibly
            a view into a larger state (a chunk's slot); it never aliases an input.  The
            operator may write the result into it (then it returns ``out``) or return a new
            tensor (then the caller copies it into ``out``): the values are the same either way.

        Returns
        -------
        tensor
            ``y``, bit for bit the values of the plain path (``_apply`` of the parts, summed
            left to right).  The default writes into ``out`` when :meth:`apply_into` does.
        """
        if len(xs) != 1:
            raise ValueError(f"{type(self).__name__}.apply_parts: a plain operator takes one input, got len(xs)={len(xs)}")
        x = xs[0]
        if x is None:
            raise ValueError(f"{type(self).__name__}.apply_parts: xs[0] is None; the result's batch size is unknown")
        if out is not None and self.apply_into(x, out):
            return out
        return self._apply(x)

    def apply_into(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Write ``A x`` into ``out`` (a batch of the result's shape and layout that does not
        alias ``x``; possibly a view into a larger state) when the operator has such a form for
        these batches, with the values of ``_apply(x)`` bit for bit.

        Returns
        -------
        bool
            Whether it wrote ``out``.  The default has no such form (False): the caller
            evaluates ``_apply(x)`` and copies.  An override must return False whenever a
            subclass overrides ``_apply`` (the fast path must not bypass the override).
        """
        return False

    def apply_(self, x: torch.Tensor) -> bool:
        """Overwrite ``x`` with ``A x`` in place (``in_shape == out_shape``; the caller
        guarantees nothing else reads ``x``), with the values of ``_apply(x)`` bit for bit.

        Returns
        -------
        bool
            Whether it did; the default has no in-place form (False, ``x`` untouched).  An
            override must return False whenever a subclass overrides ``_apply``.
        """
        return False

    def sweep_workspace(self, itemsize: int, channels_last: bool) -> int:
        """Elements per batch entry of the temporary workspace that the torch path allocates
        beyond its input and its output, for data of ``itemsize`` bytes in the sweep's layout
        (``channels_last``: 4-D batches channels-last) — a term of the sweep's memory plan
        (:func:`linop.linearize.schedule.memory_plan`).  The default, 0, suits every operator
        whose torch path makes no large temporaries (a convolution's column buffers: override)."""
        return 0

    def _applies_as(self, cls: type) -> bool:
        """Whether this operator evaluates by ``cls._apply`` (no subclass overrides it): only then
        is a fast path that ``cls`` defines an evaluation strategy of this operator's own map."""
        return type(self)._apply is cls._apply

    # ----------------------------------------------------------------- parameters
    def _param(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Parameter ``name`` (a CPU tensor attribute) on ``like``'s device and dtype."""
        key = (name, like.device, like.dtype)
        t = self._param_cache.get(key)
        if t is None:
            t = getattr(self, name).to(device=like.device, dtype=like.dtype)
            self._param_cache[key] = t
        return t

    def _index(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Integer table ``name`` (a CPU tensor attribute, e.g. a selection's indices) on
        ``like``'s device — moved, never cast to the data's dtype; cached per device."""
        key = (name, like.device)
        t = self._param_cache.get(key)
        if t is None:
            t = getattr(self, name).to(like.device)
            self._param_cache[key] = t
        return t

    # ----------------------------------------------------------------- torch path
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Batched forward ``y = A x`` on a tensor of shape ``(N, *in_shape)``.

        Floating inputs are computed in their own dtype; integer / bool inputs are cast to
        the operator's dtype first (never the parameters to the integer dtype)."""
        self._check_batch(x, self.in_shape, "input")
        return self._apply(self._as_float(x))

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Batched adjoint ``x = Aᵀ y`` on a tensor of shape ``(N, *out_shape)`` (dtypes as
        in :meth:`apply`)."""
        self._check_batch(y, self.out_shape, "output")
        return self._apply_adjoint(self._as_float(y))

    def _as_float(self, t: torch.Tensor) -> torch.Tensor:
        # _param casts the parameters to the data's dtype: an integer tensor would truncate
        # them (silently wrong numbers), a complex one is not a real operator's domain here
        if t.is_complex():
            raise ValueError(f"{type(self).__name__}: complex input (dtype {t.dtype}) is not supported; "
                             "apply the operator to the real and imaginary parts separately")
        if t.dtype in (torch.float16, torch.bfloat16):  # the parameters would be rounded to half precision
            raise ValueError(f"{type(self).__name__}: input has dtype {t.dtype}; pass float32 or float64 "
                             "(half precision would round the operator's parameters)")
        return t if t.is_floating_point() else t.to(torch_dtype(self.dtype))

    def __call__(self, x):  # torch tensors go through the batched path
        if isinstance(x, torch.Tensor):
            return self.apply(x)
        return super().__call__(x)

    def _check_batch(self, t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: expected a torch.Tensor {what}, got {type(t).__name__}")
        if tuple(t.shape[1:]) != shape:
            raise ValueError(
                f"{type(self).__name__}: {what} must have shape (N, {', '.join(map(str, shape))}), "
                f"got {tuple(t.shape)}"
            )

    # ----------------------------------------------------------------- scipy path
    def _run(self, a: Any, fn, shape_in: tuple[int, ...], n_out: int, columns: bool) -> Any:
        t = self._as_float(backend.to_torch(a))
        k = t.shape[1] if columns else 1
        batch = (t.T if columns else t).reshape((k,) + shape_in)
        out = fn(batch).reshape(k, n_out)
        out = out.T if columns else out.reshape(n_out)
        return backend.from_torch(out.contiguous(), like=a)

    def _check_vector(self, x: Any, n: int, what: str) -> None:
        # scipy's own check says only "dimension mismatch", naming neither argument nor sizes
        shp = tuple(getattr(x, "shape", np.shape(x)))
        if shp not in ((n,), (n, 1)):
            raise ValueError(f"{type(self).__name__}.{what}: x must have shape ({n},) or ({n}, 1), got {shp}")

    def matvec(self, x):
        self._check_vector(x, self.shape[1], "matvec")
        return super().matvec(x)

    def rmatvec(self, x):
        self._check_vector(x, self.shape[0], "rmatvec")
        return super().rmatvec(x)

    def _matvec(self, x):
        return self._run(x, self._apply, self.in_shape, self.shape[0], columns=False)

    def _rmatvec(self, y):
        return self._run(y, self._apply_adjoint, self.out_shape, self.shape[1], columns=False)

    def _matmat(self, X):
        return self._run(X, self._apply, self.in_shape, self.shape[0], columns=True)

    def _rmatmat(self, Y):
        return self._run(Y, self._apply_adjoint, self.out_shape, self.shape[1], columns=True)

    def _adjoint(self) -> "AdjointOperator":
        return AdjointOperator(self)

    _transpose = _adjoint  # real operators: transpose == adjoint

    # ----------------------------------------------------------------- sparse form
    def to_sparse(self, gpu: bool = False, dtype: Any = None):
        """Explicit CSR matrix (``scipy.sparse.csr_matrix``; cupyx when ``gpu=True``)."""
        rows, cols, vals = self._coo()
        dt = numpy_dtype(dtype) if dtype is not None else self.dtype
        A = scipy.sparse.csr_matrix(
            (np.asarray(vals, dtype=dt), (np.asarray(rows), np.asarray(cols))), shape=self.shape
        )
        A.sum_duplicates()
        A.sort_indices()
        if gpu:
            if not backend.cupy_available():
                raise RuntimeError("to_sparse(gpu=True) needs cupy and a CUDA device")
            A = backend.get_sparse_module(backend._cupy.empty(0)).csr_matrix(A)
        return A

    @property
    def structure(self) -> tuple[np.ndarray, np.ndarray]:
        """The structural CSR pattern ``(indptr, indices)`` of :meth:`to_sparse`.

        Computed once and kept on the operator (an operator is immutable, so its pattern is
        too); receptive-field geometry and cost models read it instead of re-assembling."""
        s = self.__dict__.get("_structure")
        if s is None:
            A = self.to_sparse()
            A = A if hasattr(A, "indptr") else A.tocsr()
            s = (np.asarray(A.indptr), np.asarray(A.indices))
            self._structure = s
        return s

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.in_shape} -> {self.out_shape}, dtype={self.dtype}>"


class AdjointOperator(Operator):
    """The adjoint (transpose) of an :class:`Operator`, as an operator."""

    def __init__(self, op: Operator):
        self.op = op
        super().__init__(op.out_shape, op.in_shape, op.dtype)

    def _apply(self, x):
        return self.op._apply_adjoint(x)

    def _apply_adjoint(self, y):
        return self.op._apply(y)

    def _coo(self):
        r, c, v = self.op._coo()
        return c, r, v

    def _adjoint(self):
        return self.op

    def to_sparse(self, gpu: bool = False, dtype: Any = None, **kw):
        """CSR of the transpose, from the parent's CSR (a CSR->CSR transpose is linear in
        nnz; rebuilding from COO triplets would sort them again)."""
        A = self.op.to_sparse(gpu=gpu, dtype=dtype, **kw).T.tocsr()
        A.sort_indices()
        return A


def dottest(
    op: spla.LinearOperator,
    rng: np.random.Generator | int | None = None,
    dtype: Any = np.float64,
    rtol: float | None = None,
    raise_error: bool = True,
) -> tuple[float, float]:
    """Adjoint identity check ``<A x, y> == <x, Aᵀ y>`` with random x, y.

    Parameters
    ----------
    op : LinearOperator, sparse matrix or dense 2-D array / tensor
        Operator under test; anything but a ``scipy.sparse.linalg.LinearOperator`` goes
        through :func:`linop.as_operator` (which raises TypeError naming ``op`` otherwise).
    rng : Generator or seed, optional
    dtype : dtype of the random vectors (float64 by default; the check is exact up to
        rounding, so the default tolerance is a few hundred ulps of that dtype).
    rtol : float, optional
        Relative tolerance on ``|<Ax,y> - <x,Aᵀy>| / max(|<Ax,y>|, |<x,Aᵀy>|)``.
    raise_error : bool
        Raise ``AssertionError`` on failure (else just return the two numbers).

    Returns
    -------
    (yAx, xAty) : the two inner products.
    """
    if not isinstance(op, spla.LinearOperator):
        from .adapt import as_operator  # adapt imports this module

        op = as_operator(op, name="op")
    try:
        rng = np.random.default_rng(rng)
    except (TypeError, ValueError) as exc:  # numpy's message does not name the argument
        raise TypeError(f"rng must be a numpy Generator, a non-negative int seed or None, got {rng!r} ({exc})") from None
    n_out, n_in = op.shape
    x = rng.standard_normal(n_in).astype(dtype)
    y = rng.standard_normal(n_out).astype(dtype)
    Ax = np.asarray(backend.to_numpy(op.matvec(x))).ravel()
    yAx = float(np.dot(y, Ax))
    xAty = float(np.dot(x, np.asarray(backend.to_numpy(op.rmatvec(y))).ravel()))
    if rtol is None:
        # Both sides are sums of ~nnz rounded products; 1e3 ulps covers any realistic layer.
        rtol = 1e3 * np.finfo(dtype).eps
    # Rounding errors scale with the size of the terms, not with the (possibly cancelled)
    # result: floor the scale at the typical size of <Ax, y> for random y, ||Ax||·||y||/√n.
    typical = float(np.linalg.norm(Ax.astype(np.float64)) * np.linalg.norm(y.astype(np.float64))) / np.sqrt(max(n_out, 1))
    scale = max(abs(yAx), abs(xAty), typical, np.finfo(dtype).tiny)
    err = abs(yAx - xAty) / scale
    if raise_error and not err <= rtol:
        raise AssertionError(
            f"dottest failed for {op!r}: <Ax,y>={yAx!r}, <x,A^T y>={xAty!r}, rel. err {err:.3e} > {rtol:.1e}"
        )
    return yAx, xAty
