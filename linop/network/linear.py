"""Linear node kinds: ``y = A x`` (conv, FC, pooling, pads, …) and ``y = x + R x_b[slice]``.

Seed 000 (Eq. 3, appendix C): a conv / FC layer is ``c_l = W_l p_{l-1} + R_l x_b``.  The
equivalent network splits it into a :class:`LinearNode` (``W_l``; its output is the unit
layer's *pre-bias* value) and a :class:`BiasNode` (``+ R_l x_b``).  Both are their own
Jacobians; their reverse steps are the minimum-norm correction (seed 001 Eqs. 4–7) and the
bias subtraction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..operators.base import Operator
from ..operators.composite import Chain, HStack
from ..operators.structural import Identity, Slice
from .node import Node

__all__ = ["LinearNode", "BiasNode"]


@dataclass
class LinearNode(Node):
    op: Operator | None = None
    unit_layer: str | None = None  # "Conv0" … / "FC" when this is a unit layer's pre-bias output
    _pattern: Any = field(default=None, init=False, repr=False, compare=False)

    def forward(self, xs, x_b):
        return self.op.apply(xs[0])

    def linearize(self, xs, x_b) -> Operator:
        """A linear node is its own Jacobian: ``op``."""
        return self.op

    def structure(self, in_shapes) -> Operator:
        return self.op

    def tangent_cost(self, elementwise: float) -> float:
        """One multiply-add per structural non-zero of ``op``."""
        return float(self.op.structure[0][-1])

    @property
    def detail(self) -> str:
        return f"{type(self.op).__name__}" + (f"  [{self.unit_layer}]" if self.unit_layer else "")

    @property
    def structural_pattern(self) -> Any:
        """The closed-form pseudo-inverse pattern of an operator with at most one non-zero per
        row and column (flatten, channel pad, subsample, scale, identity, diagonal, average
        pooling: the operators that declare :attr:`~linop.operators.base.Operator.pinv_by_pattern`),
        or None — computed once per node.  Only those are examined, so a convolution's or dense
        layer's matrix is never assembled for it."""
        if self._pattern is None:
            from ..reverse.steps import structural_pinv

            # the operator says whether it may be of that kind (Operator.pinv_by_pattern)
            self._pattern = (structural_pinv(self.op) if self.op.pinv_by_pattern else None,)
        return self._pattern[0]

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """Minimum-norm correction ``a* = â + W⁺(z* − W â)`` (MDP Eqs. 4–6 / CCP Eq. 7);
        one-non-zero-per-row-and-column operators by their closed form, average pooling with
        stride = kernel copied back (§3.4(b)) unless ``options.avgpool == "exact"``.

        Both MDP/CCP labels are reported: ``case`` from W's rank, ``paper_case`` by seed 001's
        channel / width rule.  ``options.paper`` solves as the paper does (:meth:`_solve`)."""
        from ..reverse import steps
        from ..solvers.case import channel_case

        report = self._report()
        a_hat, op = a_hats[0], self.op
        report.paper_case = channel_case(op)[0]
        N = z_star.shape[0]
        windows = op.average_windows() if options.avgpool == "copy" else None  # the operator's own
        avg_copy = windows is not None
        # pool_rule "copy" (seed 001 §3.4(b)): unchanged average-pooling windows are copied back too
        keep = options.keep_unchanged and not (avg_copy and options.pool_rule == "copy")
        changed = ((z_star != z_hat).reshape(N, -1).any(1) if keep
                   else torch.ones(N, dtype=torch.bool, device=z_star.device))
        report.n_solved = int(changed.sum())
        if not bool(changed.any()):
            report.case, report.method = "unchanged", "none"
            return [a_hat.clone()], report
        pattern = self.structural_pattern
        a = None
        if pattern is not None:
            a, report.case = steps.structural_step(pattern, op.shape, z_star, a_hat)
            report.method, report.solved_as = "structural", "lsq-closest"
        elif avg_copy:
            try:
                kernel, stride, padding = windows
                a = steps.unpool_avg(z_star, kernel, op.in_shape, mode="copy", a_hat=a_hat,
                                     stride=stride, padding=padding, p_hat=z_hat if keep else None)
                report.case, report.method, report.solved_as = "MDP", "copy", "copy"
                report.solve_info = {"pool_rule": options.pool_rule}
            except NotImplementedError:
                a = None
        if a is None:
            return [self._solve(z_star, a_hat, changed, options, report)], report
        if keep:
            a = torch.where(changed.reshape((N,) + (1,) * (a.dim() - 1)), a, a_hat)
        return [a], report

    def _method(self, options) -> tuple[str, str | None]:
        """The solver method of this step and, when the requested one could not run, why."""
        from ..solvers import get_method

        method, fallback = options.solver, None
        if options.paper:  # seed 001 §3.2: the FFT solve wherever it applies
            try:
                get_method("fft").applicable(self.op)
                return "fft", None
            except (ValueError, NotImplementedError) as exc:
                fallback = f"paper mode: fft not applicable ({exc}); used {method}"
        check = get_method(method).applicable if method != "auto" else None
        if check is not None:
            try:  # e.g. the FFT paths cover stride-1 convs only: a layer they cannot do goes to auto
                check(self.op)
            except (ValueError, NotImplementedError) as exc:
                method, fallback = "auto", f"{options.solver} not applicable ({exc}); used auto"
        return method, fallback

    def _solve(self, z_star, a_hat, changed, options, report) -> torch.Tensor:
        """``a* = â + W⁺(z* − W â)`` for the changed samples (linop mode: the closest
        least-squares point, whatever W's rank).  Paper mode: the FFT solve where it applies
        (it picks MDP / CCP by channels itself, boundary frozen at â), else by the paper's
        label — MDP: the same formula; CCP: ``W⁺ z*`` (Eq. 7's minimum-norm least-squares
        point, â not used; equal to the formula above when W has full column rank)."""
        from ..solvers import solve

        idx = changed.nonzero().flatten()
        sub_a, sub_z = a_hat[idx], z_star[idx]
        method, fallback = self._method(options)
        start = sub_a
        if method == "fft":
            solved_as = None  # from the solver's info below
        elif options.paper:
            solved_as = report.paper_case
            if solved_as == "CCP":
                start = torch.zeros_like(sub_a)
        else:
            solved_as = "lsq-closest"
        res = solve(self.op, sub_z, start, method=method, tol=options.tol, maxiter=options.maxiter)
        a = a_hat.clone()
        a[idx] = torch.as_tensor(res.a).to(device=a.device, dtype=a.dtype).reshape(sub_a.shape)
        report.case, report.method, report.solve_info = res.case, res.method, dict(res.info)
        report.solved_as = solved_as or f"fft-{res.info.get('fft_case', report.paper_case)}"
        if fallback:
            report.solve_info["fallback"] = fallback
        return a


@dataclass
class BiasNode(Node):
    """``y = x + R x_b[bias_slice]``; ``restriction`` maps the slice to ``out_shape``."""

    bias_name: str = ""
    bias_slice: slice = field(default_factory=lambda: slice(0, 0))
    restriction: Operator | None = None
    unit_layer: str | None = None  # set when this is the own bias of a unit layer

    _local: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def reads_bias(self) -> bool:  # type: ignore[override]
        return self.bias_slice.stop > self.bias_slice.start

    def bias_term(self, x_b: torch.Tensor) -> torch.Tensor:
        """``R x_b[slice]`` as a tensor of shape ``(1, *out_shape)``."""
        return self.restriction.apply(x_b[self.bias_slice].reshape(1, -1))

    def forward(self, xs, x_b):
        return xs[0] + self.bias_term(x_b)

    def linearize(self, xs, x_b) -> Operator:
        """``[I, R S]`` on ``[x; x_b]``: identity on the input plus the restriction ``R`` of the
        bias slice (``S`` selects ``x_b[bias_slice]``; seed 000 Eq. C.5–C.8); just ``I`` for an
        empty slice.  x-independent: built once per ``len(x_b)`` and kept on the node."""
        n_b = int(x_b.numel())
        op = self._local.get(n_b)
        if op is None:
            sl = self.bias_slice
            op = Identity(self.out_shape)
            if self.reads_bias:
                op = HStack([op, Chain([Slice(n_b, sl.start, sl.stop), self.restriction])])
            self._local[n_b] = op
        return op

    def geometry(self, boxes, in_shapes):
        return boxes[0]  # the bias adds no image pixels

    @property
    def detail(self) -> str:
        return f"bias {self.bias_name} x_b[{self.bias_slice.start}:{self.bias_slice.stop}]"

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """``c* = z* − R b``."""
        from ..reverse import steps

        report = self._report()
        report.method = "subtract"
        c = steps.subtract_bias(z_star, self.bias_term(x_b), z_hat=z_hat, c_hat=a_hats[0],
                                keep_unchanged=options.keep_unchanged)
        return [c], report
