"""The solver-method registry: each method of the reverse linear step by name.

A method is a *runner* — ``runner(problem, options) -> (a, info)`` computing the flat
reconstruction ``a`` (N, n_in) of a normalised :class:`~linop.solvers.result.Problem` — plus
an optional *applicability check* ``applicable(op)`` that raises ``ValueError`` /
``NotImplementedError`` (with the reason) before any work when the method cannot handle the
operator.  :func:`linop.solvers.solve` validates its arguments, picks a method, checks it,
runs it and builds the :class:`~linop.solvers.SolveResult`; it never branches on the method.

Users add methods with :func:`register_method`; :data:`METHODS` lists ``"auto"`` and every
registered name (a live view, so a method registered later is accepted everywhere that
checks ``name in METHODS``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..operators.base import Operator
from .result import Problem

__all__ = ["Method", "SolveOptions", "register_method", "get_method", "METHODS", "DEFAULT_TOL"]

#: Default relative stopping tolerance of the exact iterative methods.
DEFAULT_TOL = 1e-10


@dataclass
class SolveOptions:
    """What :func:`~linop.solvers.solve` hands every runner besides the problem.

    ``tol`` / ``maxiter`` are None when the caller left them to the method's default;
    ``extra`` holds the method-specific keywords (``solver=``, ``fft_solver=``, ``conlim=``,
    ...): a runner pops the ones it uses and ignores the others.
    """

    tol: float | None = None
    maxiter: int | None = None
    max_bytes: int = 2 * 1024**3
    progress: bool = False
    extra: dict = field(default_factory=dict)

    def krylov_maxiter(self, shape: tuple[int, int]) -> int:
        """The iteration cap of the batched Krylov methods: 10·min(m, n), at most 10,000."""
        return int(self.maxiter) if self.maxiter is not None else min(10 * min(shape), 10_000)

    def pop(self, *keys: str) -> dict:
        """The given method keywords that the caller passed, removed from ``extra``."""
        return {k: self.extra.pop(k) for k in keys if k in self.extra}


Runner = Callable[[Problem, SolveOptions], "tuple[torch.Tensor, dict[str, Any]]"]
Check = Callable[[Operator], Any]


@dataclass(frozen=True)
class Method:
    """A registered method: ``name``, ``runner``, ``applicable`` check, one-line ``summary``."""

    name: str
    runner: Runner
    applicable: Check | None = None
    summary: str = ""


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, runner: Runner, *, applicable: Check | None = None, summary: str = "",
                    replace: bool = False) -> Method:
    """Register a reverse-step method under ``name`` for :func:`linop.solvers.solve`.

    Parameters
    ----------
    name : str
        The ``method=`` value that selects it (not ``"auto"``).
    runner : callable ``(problem, options) -> (a, info)``
        ``problem`` is a :class:`~linop.solvers.result.Problem` (flat torch batches
        ``problem.a_hat`` (N, n_in) and ``problem.target = z* − b`` (N, n_out), the operator
        ``problem.op``, ``problem.fwd`` / ``problem.adj`` / ``problem.rhs()``); ``options``
        a :class:`SolveOptions`.  Returns the reconstruction ``a`` (N, n_in) as a torch tensor
        on the problem's device and an ``info`` dict (put W's numerical rank in
        ``info["rank"]`` if the method computes it, and ``info["tol"]`` for the tolerance used).
    applicable : callable ``(op) -> Any``, optional
        Raises ``ValueError`` / ``NotImplementedError`` when the method cannot handle ``op``;
        called before any work.
    summary : str
        One line for listings.
    replace : bool
        Allow replacing an existing method of that name.

    Returns
    -------
    Method
    """
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register_method: name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(runner):
        raise TypeError(f"register_method: runner must be callable, got {type(runner).__name__}")
    if applicable is not None and not callable(applicable):
        raise TypeError(f"register_method: applicable must be callable or None, got {type(applicable).__name__}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"register_method: a method {name!r} is already registered (pass replace=True)")
    method = Method(name, runner, applicable, summary)
    _REGISTRY[name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError listing the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"solve: method must be one of {tuple(METHODS)}, got {name!r}") from None


class _MethodNames(Sequence):
    """``("auto", *registered)``, read from the registry on every access."""

    def _names(self) -> tuple[str, ...]:
        return ("auto",) + tuple(_REGISTRY)

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(_REGISTRY) + 1

    def __contains__(self, name: object) -> bool:
        return name == "auto" or (isinstance(name, str) and name in _REGISTRY)

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


#: Every accepted ``method=`` name: ``"auto"`` and the registered methods.
METHODS: Sequence[str] = _MethodNames()
