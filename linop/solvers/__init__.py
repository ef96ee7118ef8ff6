"""Reverse linear step ``W a + b = z*`` of feature reconstruction (seed 001 §3.1–3.2).

:func:`solve` computes the minimum-norm least-squares correction::

    a* = â + W⁺ (z* − b − W â)

— the MDP solution (Eqs. 4–6: closest to ``â`` among exact solutions) when W has full row
rank, the CCP solution (Eq. 7: least computing-consistency error) when it has full column
rank, and the closest-to-``â`` least-squares solution in between.

Modules
-------
``dispatch``     :func:`solve` and the ``"auto"`` choice (:func:`auto_method`).
``registry``     :func:`register_method`, :data:`METHODS`: methods by name.
``methods``      the built-in runners: dense, lsmr, lsqr, cg, fft, fft-pcg, fft-exact.
``case``         the MDP / CCP / rank-deficient label of W, decided once for every method.
``result``       :class:`SolveResult` and the input normalisation (:func:`~.result.prepare`).
``dense``, ``sparse``, ``iterative``, ``fft``, ``capacitance``   the solvers themselves.
"""
from __future__ import annotations

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .capacitance import CapacitanceSolver
from .case import problem_case
from .dense import DenseSolver, dense_bytes
from .dispatch import auto_method, solve
from .fft import FFTConvSolver, conv_spec
from .iterative import cgls, craig
from .registry import DEFAULT_TOL, METHODS, Method, SolveOptions, get_method, register_method
from .result import DEFAULT_MAX_BYTES, Problem, SolveResult
from .sparse import lsmr_correction

__all__ = ["solve", "SolveResult", "register_method", "get_method", "Method", "SolveOptions", "Problem",
           "METHODS", "DEFAULT_TOL", "DEFAULT_MAX_BYTES", "auto_method", "problem_case", "DenseSolver", "FFTConvSolver",
           "CapacitanceSolver", "craig", "cgls", "lsmr_correction", "conv_spec", "dense_bytes"]
