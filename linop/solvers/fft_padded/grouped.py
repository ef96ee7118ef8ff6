"""Exact ``W⁺`` of any zero-padded conv: groups × polyphase × the padded stride-1 solver.

* **Groups.**  A grouped conv is block diagonal over its channel groups (output channels
  ``g C_out/G …``, input channels ``g C_in/G …``), so ``W⁺ = blockdiag(W_g⁺)``: every group
  is solved on its own — its per-frequency systems are ``(C_out/G) × (C_in/G)`` and its
  capacitance ``G``-times smaller in each dimension than the dense block expansion of
  :func:`.effective_kernel` (depthwise, ``G = C``, included).
* **Stride.**  ``W_g = W_poly Π`` (:mod:`.polyphase`), ``W_g⁺ = Πᵀ W_poly⁺``.
* **Unused phases.**  Phase channels whose phase kernel is identically zero (e.g. a 1×1
  stride-2 conv reads one phase in four) are zero columns of ``W_poly``: ``W_poly = [W_u, 0]``
  up to a permutation, so ``W_poly⁺ = [W_u⁺; 0]`` — they are dropped before factoring.
* **Dilation** at stride 1 is the dilated (sparse) kernel of :class:`.PaddedConvSolver`; with
  a stride it is absorbed into the phase kernel.

Each remaining block is a padded stride-1 conv, solved by :class:`.PaddedConvSolver`
(capacitance, or its Fourier-preconditioned CG when the factor exceeds the budget).
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ... import backend
from ...operators.conv import Conv2d, pair
from ..result import DEFAULT_MAX_BYTES
from .polyphase import (
    from_polyphase,
    missing_entries,
    polyphase_geometry,
    polyphase_kernel,
)
from .solver import PaddedConvSolver
from .torus import conv_geometry, padded_conv_bytes

__all__ = ["ExactConvSolver", "exact_conv_bytes"]


def _phase_problem(w: torch.Tensor, in_shape: tuple[int, int, int], padding: tuple, stride: tuple, dilation: tuple):
    """The stride-1 problem of one group: (kernel, in_shape, padding, dilation, used channels or None,
    fixed-zero mask or None)."""
    if stride == (1, 1):
        return w, in_shape, padding, dilation, None, None
    geo = polyphase_geometry(in_shape[1:], tuple(w.shape[2:]), padding, stride, dilation)
    kp = polyphase_kernel(w, geo)
    miss = missing_entries(geo, in_shape[0])
    used = torch.nonzero(kp.abs().sum(dim=(0, 2, 3)) > 0).flatten()
    if used.numel() == kp.shape[1]:
        used = None
    else:
        kp = kp[:, used]
        miss = None if miss is None else miss[used.cpu().numpy()]
    c = kp.shape[1]
    return kp, (c,) + geo.phase_hw, geo.padding, (1, 1), used, miss


def exact_conv_bytes(op: Any, itemsize: int = 8) -> int:
    """Peak bytes of :class:`ExactConvSolver`'s factorisations for a :class:`~linop.operators.Conv2d`.

    ``G ×`` the peak of one group's (phase) capacitance (:func:`.padded_conv_bytes`): the
    factors of all groups are kept.  Structural: phase channels no tap reaches are not counted.  Raises ``ValueError`` like :func:`.polyphase_geometry`.
    """
    w, in_shape, padding, dilation, groups, stride = conv_geometry(op, None, 0, 1, 1, 1, who="exact_conv_bytes",
                                                                   allow_stride=True)
    cig, cog = in_shape[0] // groups, w.shape[0] // groups
    ones = torch.ones((cog, cig) + tuple(w.shape[2:]), dtype=torch.float64)  # the structure, not the values
    kp, shp, pad, dil, _, miss = _phase_problem(ones, (cig,) + in_shape[1:], padding, stride, dilation)
    d = pair(dil, "dilation")
    sup = (kp != 0).any(dim=0).numpy() if d == (1, 1) else None
    return groups * padded_conv_bytes(cog, shp[0], shp[1:], tuple(kp.shape[2:]), pad, dil, itemsize=itemsize,
                                      support=sup, fixed_zero=miss)


class ExactConvSolver:
    """``δ = W⁺ r`` for any zero-padded conv (padding, stride, dilation, groups): FFT + capacitance.

    Parameters
    ----------
    weight : a :class:`~linop.operators.Conv2d`, or a ``(C_out, C_in/groups, k_h, k_w)`` kernel
        (then ``in_shape`` and the geometry keywords describe the conv).
    in_shape, padding, dilation, groups, stride : as :class:`~linop.operators.Conv2d`.
        A stride need not divide the input size (missing phase entries are held at zero).
    max_bytes : int
        Memory budget of all groups' factorisations together (each group gets ``1/G``).
    **kw
        Passed to every group's :class:`.PaddedConvSolver` (``method``, ``rcond``, ``reg``,
        ``refine``, ``device``, ``dtype``, ``row_chunk``).
    """

    def __init__(self, weight: Any, in_shape: tuple[int, int, int] | None = None, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, stride: Any = 1, max_bytes: int = DEFAULT_MAX_BYTES,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64, **kw: Any):
        t0 = time.perf_counter()
        w, in_shape, padding, dilation, groups, stride = conv_geometry(
            weight, in_shape, padding, dilation, groups, stride, who="ExactConvSolver", allow_stride=True)
        self.weight = w.detach().to(device=device, dtype=dtype)
        self.padding, self.dilation, self.groups, self.stride = padding, dilation, groups, stride
        self.device, self.dtype = torch.device(device), dtype
        self._op = Conv2d(self.weight.cpu(), in_shape, padding=padding, dilation=dilation, groups=groups,
                          stride=stride)
        self.in_shape, self.out_shape = tuple(in_shape), tuple(int(s) for s in self._op.out_shape)
        cig, cog = in_shape[0] // groups, w.shape[0] // groups
        self.parts: list[tuple[PaddedConvSolver, torch.Tensor | None]] = []
        for g in range(groups):  # G independent blocks (a handful; depthwise: one per channel)
            kp, shp, pad, dil, used, miss = _phase_problem(self.weight[g * cog:(g + 1) * cog],
                                                           (cig,) + in_shape[1:], padding, stride, dilation)
            ps = PaddedConvSolver(kp, shp, padding=pad, dilation=dil, max_bytes=max(1, int(max_bytes) // groups),
                                  device=device, dtype=dtype, fixed_zero=miss, **kw)
            self.parts.append((ps, None if used is None else used.to(self.device)))
        self.cig, self.cog, self.phases = cig, cog, stride[0] * stride[1]
        self.need_bytes = sum(ps.need_bytes for ps, _ in self.parts)
        self.method = self.parts[0][0].method
        self.lam = max(ps.lam for ps, _ in self.parts)
        self.factor_seconds = time.perf_counter() - t0

    @property
    def ccp_direct(self) -> bool:
        """``a* = W⁺ (z* − b)`` may be solved for directly (:attr:`.PaddedConvSolver.ccp_direct`):
        every block qualifies and none has unused phase channels (zero columns of ``W``, where
        ``â`` is kept)."""
        return all(ps.ccp_direct and used is None for ps, used in self.parts)

    @property
    def single_pass(self) -> bool:
        """One group whose direct solve is the answer (:attr:`.PaddedConvSolver.single_pass`):
        :meth:`solve_blocks` applies."""
        return len(self.parts) == 1 and self.parts[0][0].single_pass

    def solve_blocks(self, blocks: Iterable[torch.Tensor], chunk: int = 256) -> torch.Tensor:
        """``δ = W⁺ r`` for ``r`` given as row blocks ``(n_i, *out_shape)``, formed lazily by the caller
        (:meth:`.PaddedConvSolver.solve_blocks`; :attr:`single_pass` required).  Returns (N, *in_shape)."""
        if not self.single_pass:
            raise ValueError("ExactConvSolver.solve_blocks: needs one group with a single-pass solver; use solve()")
        ps, used = self.parts[0]
        d = ps.solve_blocks(blocks, chunk)
        return self._assemble([(d, used)])

    def _assemble(self, parts: list) -> torch.Tensor:
        """Per-group answers ``(δ_g, used phase channels or None)`` → δ (N, *in_shape)."""
        N, (_, H, W) = parts[0][0].shape[0], self.in_shape
        out = []
        for d, used in parts:
            if used is not None:  # unused phase channels: zero rows of W_poly⁺
                full = d.new_zeros((N, self.cig * self.phases) + tuple(d.shape[2:]))
                full[:, used] = d
                d = full
            out.append(from_polyphase(d, self.stride, (H, W)) if self.stride != (1, 1) else d)
        delta = torch.cat(out, dim=1) if len(out) > 1 else out[0]
        return delta.reshape((N,) + (self.in_shape[0], H, W))

    @classmethod
    def from_operator(cls, op: Any, **kw: Any) -> ExactConvSolver:
        """Build from a :class:`~linop.operators.Conv2d`."""
        return cls(op, **kw)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """``W a`` by the direct conv."""
        return self._op.apply(a)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Wᵀ y`` by the direct transposed conv."""
        return self._op.apply_adjoint(y)

    def solve(self, r: Any, tol: float | None = None, maxiter: int | None = None, chunk: int = 64,
              refine: bool | None = None) -> tuple[torch.Tensor, dict]:
        """``δ = W⁺ r`` for ``r`` (N, *out_shape); returns ``(δ, info)`` (iterations: max over groups)."""
        r = backend.to_torch(r) if not isinstance(r, torch.Tensor) else r
        if r.ndim != 4 or tuple(r.shape[1:]) != self.out_shape:
            raise ValueError(f"ExactConvSolver.solve: r must have shape (N, {', '.join(map(str, self.out_shape))}), "
                             f"got {tuple(r.shape)}")
        r = r.to(device=self.device, dtype=self.dtype)
        parts, infos = [], []
        for g, (ps, used) in enumerate(self.parts):
            d, info = ps.solve(r[:, g * self.cog:(g + 1) * self.cog], tol=tol, maxiter=maxiter, chunk=chunk,
                               refine=refine)
            parts.append((d, used))
            infos.append(info)
        delta = self._assemble(parts)
        info = dict(infos[0])
        if len(infos) > 1:
            info["iterations"] = np.max([i["iterations"] for i in infos], axis=0)
            info["converged"] = np.all([i["converged"] for i in infos], axis=0)
        return delta, info

    def info(self) -> dict:
        """The first group's :meth:`.PaddedConvSolver.info`, with the group / polyphase structure."""
        out = self.parts[0][0].info()
        out.update({"groups": self.groups, "stride": self.stride, "dilation": self.dilation, "padding": self.padding,
                    "capacitance_size": sum(ps.m for ps, _ in self.parts), "capacitance_bytes": self.need_bytes,
                    "factor_seconds": self.factor_seconds, "tikhonov_lambda": self.lam})
        if "square_system_size" in out:  # square blocks: the LU system actually factored (square.py)
            out["square_system_size"] = sum(ps.mB for ps, _ in self.parts if ps._sq is not None)
        if self.groups > 1:
            out["algorithm"] += f"; block diagonal over {self.groups} groups, solved per group"
        if self.stride != (1, 1):
            ps, used = self.parts[0]
            out["polyphase"] = {"phase_channels": ps.C_in, "phase_shape": ps.in_shape[1:],
                                "phase_kernel": tuple(ps.weight.shape[2:]), "phase_padding": ps.padding,
                                "unused_phase_channels": 0 if used is None else self.cig * self.phases - ps.C_in}
            out["algorithm"] += f"; polyphase (stride {self.stride}: W = W_poly Π, W⁺ = Πᵀ W_poly⁺)"
        return out
