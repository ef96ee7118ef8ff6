"""The padded stride-1 solver: :class:`PaddedConvSolver` (maths in the package docstring)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ... import backend
from ...operators.conv import Conv2d
from ..fft import FFTConvSolver, small_lapack
from ..result import DEFAULT_MAX_BYTES
from .factor import SINGULAR_COND, SINGULAR_EIG, QuasiDefiniteFactor, lifted_spectra
from .lift import TorusLift, shift_phase
from .maps import TorusMaps
from .paths import SolvePaths
from .square import square_solver
from .torus import (
    all_channels,
    block_sizes,
    conv_geometry,
    effective_kernel,
    gather,
    padded_torus,
    peak_bytes,
    ring_entries,
)

__all__ = ["PaddedConvSolver"]


_METHODS = ("auto", "capacitance", "pcg")


class PaddedConvSolver(TorusMaps, SolvePaths):
    """Exact ``W⁺`` of a padded stride-1 conv via FFT + ring/boundary capacitance, factored once.

    Parameters
    ----------
    weight : (C_out, C_in / groups, k_h, k_w) array / tensor, or a :class:`~linop.operators.Conv2d`
        The network's kernel, or the operator (then its geometry is used and ``in_shape``,
        ``padding``, ``dilation``, ``groups``, ``stride`` must not be given).
    in_shape : (C_in, H, W)
    padding : int, (p_h, p_w), (top, bottom, left, right), ``'same'`` or ``'valid'``
    dilation : int or pair
    groups : int
    stride : must be 1 (``NotImplementedError`` otherwise)
    torus : (T_h, T_w), optional
        Torus size (default: the smallest exact one, see :func:`padded_torus`).
    method : {"auto", "capacitance", "pcg"}
        ``auto``: the capacitance factorisation when :func:`padded_conv_bytes` ≤ ``max_bytes``,
        else Fourier-preconditioned CG.  ``capacitance`` raises ``MemoryError`` over budget.
    rcond : float
        A frequency whose smallest singular value is below ``rcond · s_max`` is singular;
        then the Tikhonov lifting (``λ = reg · s_max²``) with refinement is used.
    reg : float
        Relative Tikhonov shift of that fallback (and of the PCG preconditioners).  Rounding
        leaves a null-space component of about ``eps / reg`` relative; each refinement step
        contracts by ``λ / (σ_min(W)² + λ)``.
    max_bytes : int
        Memory budget of the capacitance factorisation.
    refine : "auto", True or False
        Iterative refinement after the direct solve (each step one conv and one more solve).
        The capacitance system is of normal-equations type, so the direct solve's error grows
        like ``eps·cond(W)²``; ``"auto"`` refines when ``eps·cond_est > 1e-12``.
    device, dtype : where the factors and spectra live (float64 for exactness).
    row_chunk : rows per gather chunk while building the blocks.
    square : "auto", True or False
        Square invertible ``W`` (``C_in = C_out``, as many constrained ring entries as boundary
        outputs, e.g. ``'same'`` convs with equal channels): ``W⁻¹`` from the complementary block
        of ``C⁻¹`` (:mod:`.square`) — half the system, one LU, no normal equations.  ``"auto"``
        uses it when it applies and its condition estimate says the direct answer is accurate
        (``eps·cond_est(N_PB) ≤ 1e-8``, no refinement needed); ``True`` requires it (refined above that).
    fixed_zero : optional bool mask (C_in, H, W)
        Image entries held at zero (the solve is ``(W D)⁺`` with ``D`` the 0/1 diagonal of the
        free entries) — the phase positions that do not exist when a stride does not divide the
        input size (:mod:`.polyphase`).  They join the ring constraints (:func:`.ring_entries`).

    Notes
    -----
    The maths and its equations are in the module docstring.  ``solve(r)`` returns
    ``δ = W⁺ r``; the reconstruction is ``a* = â + δ`` with ``r = z* − b − W â``.  This class
    builds the geometry, the constraints and the factorisation; the torus maps and ``W`` / ``Wᵀ``
    come from :class:`.TorusMaps` (:mod:`.maps`), the per-batch solves (``tikhonov``,
    ``solve_blocks``, ``solve``, ``ccp_direct``) from :class:`.SolvePaths` (:mod:`.paths`).
    """

    def __init__(self, weight: Any, in_shape: tuple[int, int, int] | None = None, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, stride: Any = 1, torus: tuple[int, int] | None = None,
                 method: str = "auto", rcond: float = 1e-10, reg: float = 1e-6,
                 max_bytes: int = DEFAULT_MAX_BYTES, refine: bool | str = "auto", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64, row_chunk: int = 1024, fixed_zero: Any = None,
                 square: bool | str = "auto"):
        t0 = time.perf_counter()
        if method not in _METHODS:
            raise ValueError(f"PaddedConvSolver: method must be one of {_METHODS}, got {method!r}")
        if not (0 < rcond < 1) or not (0 < reg < 1):
            raise ValueError(f"PaddedConvSolver: rcond and reg must be in (0, 1), got rcond={rcond!r}, reg={reg!r}")
        if refine not in ("auto", True, False):
            raise ValueError(f"PaddedConvSolver: refine must be 'auto', True or False, got {refine!r}")
        self._init_geometry(weight, in_shape, padding, dilation, groups, stride, torus, reg, device, dtype)
        self._init_constraints(fixed_zero, rcond)
        self.reg, self.lam, self.cond_est = reg, 0.0, (float("nan"), float("nan"))
        self._init_factor(method, max_bytes, square, row_chunk)
        # eps·cond(capacitance) overestimates the direct solve's relative error by ~10–100x
        # (measured); above 1e-12 one or two refinement steps bring it to ~eps·cond(W).
        # The square path is not of normal-equations type: its direct error measured ≤ 2e-3·eps·cond_est
        # (4e-13 – 2e-12 on the benchmark's square layers), so it refines above eps·cond_est = 1e-8.
        self.refine = (bool(refine) if refine != "auto" else self.method == "capacitance" and
                       np.finfo(np.float64).eps * max(self.cond_est) > (1e-8 if self._sq is not None else 1e-12))
        self.factor_seconds = time.perf_counter() - t0

    def _init_geometry(self, weight: Any, in_shape: Any, padding: Any, dilation: Any, groups: int, stride: Any,
                       torus: tuple[int, int] | None, reg: float, device: Any, dtype: torch.dtype) -> None:
        """The conv's geometry, its torus, the circular conv's spectra and SVDs, the direct conv."""
        w, in_shape, padding, dilation, groups, stride = conv_geometry(weight, in_shape, padding, dilation,
                                                                       groups, stride)
        self.weight = w.detach().to(device=device, dtype=dtype)
        self.padding, self.dilation, self.groups = padding, dilation, groups
        weff = effective_kernel(self.weight, dilation, groups)
        self._weff = weff
        C_out, C_in, kh, kw = (int(s) for s in weff.shape)
        _, H, W = in_shape
        self.geo = padded_torus((H, W), (kh, kw), padding, torus)
        Ho, Wo = self.geo.out_hw
        self.C_in, self.C_out, self.H, self.W = C_in, C_out, H, W
        self.in_shape, self.out_shape = (C_in, H, W), (C_out, Ho, Wo)
        self.torus = self.geo.torus
        self.device, self.dtype = torch.device(device), dtype
        # W a by FFTs when cheaper than the direct conv; flops a sample (float64 conv runs at about
        # half the FFT path's rate here): conv 2 C_out C_in k² H_out W_out; FFTs 5 (C_in + C_out)
        # T log₂T plus the per-frequency product 8 C_out C_in F (measured on the benchmark layers)
        T2, F = self.torus[0] * self.torus[1], self.torus[0] * (self.torus[1] // 2 + 1)
        self.fft_forward = (5 * (C_in + C_out) * T2 * np.log2(T2) + 8 * C_out * C_in * F
                            < 2 * C_out * C_in * kh * kw * Ho * Wo)
        # the circular conv C on the torus (spectra + per-frequency SVDs) — the paper's machinery
        self.fs = FFTConvSolver(weff, (C_in,) + self.torus, reg=reg, device=device, dtype=dtype)
        # the direct conv, for residuals (refinement, PCG): same W, no FFT round trips
        self._op = Conv2d(self.weight.cpu(), in_shape, padding=padding, dilation=dilation, groups=groups)

    def _init_constraints(self, fixed_zero: Any, rcond: float) -> None:
        """The constrained ring (and fixed-zero) entries, the boundary outputs, the system's size and
        the index tensors of the per-batch maps."""
        C_out, dtype = self.C_out, self.dtype
        if fixed_zero is not None:
            fixed_zero = np.asarray(backend.to_numpy(fixed_zero) if not isinstance(fixed_zero, np.ndarray)
                                    else fixed_zero, dtype=bool)
            if fixed_zero.shape != self.in_shape:
                raise ValueError(f"PaddedConvSolver: fixed_zero must be a bool mask of shape {self.in_shape}, "
                                 f"got {fixed_zero.shape}")
        self.fixed_zero = fixed_zero
        self._mask = None if fixed_zero is None else torch.as_tensor(~fixed_zero, device=self.device)
        # constrained entries: ring (and fixed-zero) entries some valid output reads (ring_entries)
        support = (self._weff != 0).any(dim=0).cpu().numpy()
        self.case = block_sizes(C_out, self.C_in, self.geo)[0]
        self.ring, self.boundary = ring_entries(self.geo, support, fixed_zero, self.case)
        self.mB, self.mP = self.boundary.size * C_out, self.ring.size
        self.m = self.mB + self.mP
        self.need_bytes = peak_bytes(self.case, self.mB, self.mP, torch.finfo(dtype).bits // 8)
        sn = self.fs._svd[1]
        self.s_max = float(sn.max()) if sn.size else 0.0
        if self.s_max == 0.0:
            raise ValueError("PaddedConvSolver: the conv kernel is identically zero (W = 0)")
        self.singular_freqs = int((sn[..., -1] <= rcond * self.s_max).sum())
        self._B = torch.as_tensor(self.boundary, device=self.device)
        keep = ~np.isin(self.geo.rows[:, None] * self.torus[1] + self.geo.cols[None, :], self.boundary)
        self._zero_rows = None if keep.all() else torch.as_tensor(keep, device=self.device, dtype=dtype)
        self._P = torch.as_tensor(self.ring, device=self.device)
        if self.fft_forward:  # K̂ with the outputs' torus offset folded in (torus_forward)
            ph = np.conj(shift_phase(self.torus, (self.geo.rows[0], self.geo.cols[0])))
            kh = self.fs.khat
            self._KF = (kh * torch.from_numpy(ph).to(kh.device, kh.dtype)[..., None, None]).reshape(
                (-1,) + tuple(kh.shape[2:])).contiguous()
        self._rows = torch.as_tensor(self.geo.rows, device=self.device)
        self._cols = torch.as_tensor(self.geo.cols, device=self.device)

    def _init_factor(self, method: str, max_bytes: int, square: bool | str, row_chunk: int) -> None:
        """The method (capacitance within ``max_bytes``, else PCG) and, for the capacitance, its
        factorisation: the square path, or the lifted system at ``λ = 0`` (Tikhonov ``λ > 0`` when a
        frequency is singular or ``W`` is rank-deficient)."""
        if method == "capacitance" and self.need_bytes > max_bytes:
            raise MemoryError(
                f"PaddedConvSolver: the capacitance system is {self.m}x{self.m} ({self.boundary.size} boundary "
                f"x {self.C_out} out + {self.ring.size} constrained ring entries of {self.C_in} in channels) and "
                f"needs about {self.need_bytes / 2**30:.2f} GiB > max_bytes {max_bytes / 2**30:.2f} GiB. Use "
                "method='pcg' (exact, iterative, O(batch) memory), or raise max_bytes="
            )
        self.method = "capacitance" if (method == "capacitance" or
                                        (method == "auto" and self.need_bytes <= max_bytes)) else "pcg"
        Un, sn, Vhn = self.fs._svd
        self._sq = None if self.method != "capacitance" else square_solver(self, square, (Un, sn, Vhn), row_chunk)
        if self._sq is not None:
            self.cond_est = (self._sq.cond_est,)
        if self.method != "capacitance" or self._sq is not None:
            return
        self.lam = 0.0 if self.singular_freqs == 0 else self.reg * self.s_max**2
        ok = self._factor(Un, sn, Vhn, row_chunk)
        if ok and self.lam == 0.0 and (max(self.cond_est) > SINGULAR_COND or self._qd.min_eig_est < SINGULAR_EIG):
            ok = False  # Cholesky passed on rounding alone: the Schur complement is singular
        if not ok and self.lam == 0.0:  # K̂ invertible per frequency but W itself is not of full rank
            self.lam = self.reg * self.s_max**2
            ok = self._factor(Un, sn, Vhn, row_chunk)
        if not ok:
            raise np.linalg.LinAlgError(
                f"PaddedConvSolver: the regularised capacitance system ({self.m}x{self.m}, λ={self.lam:.3e}) "
                "is not quasi-definite in floating point; use method='pcg'")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_operator(cls, op: Any, **kw: Any) -> PaddedConvSolver:
        """Build from a :class:`~linop.operators.Conv2d` (its weight, shape, padding, dilation, groups)."""
        return cls(op, **kw)

    # ------------------------------------------------------------------ once per layer
    def _factor(self, Un: np.ndarray, sn: np.ndarray, Vhn: np.ndarray, row_chunk: int) -> bool:
        with small_lapack():
            A, G, Z = lifted_spectra(self.case, self.lam, self.s_max, Un, sn, Vhn)
        cdt = self.fs.khat.dtype
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, cdt)
        Ah, Gh, Zh = to(A), to(G), to(Z)
        # per-batch maps on the small side (lift.py): one Gram inverse, spatial boundary / ring taps
        self._maps = TorusLift(self.case, self._weff, self.fs.khat, (Un, sn, Vhn), self.lam, self.s_max, self.torus,
                               (self.H, self.W), self.geo.rows, self.geo.cols, self.boundary, self.ring)
        Th, Tw = self.torus
        spatial = lambda M: torch.fft.irfft2(M.permute(2, 3, 0, 1), s=(Th, Tw)).reshape(M.shape[2], M.shape[3], -1)
        B, P = all_channels(self.C_out, self.boundary), np.divmod(self.ring, self.torus[0] * self.torus[1])
        if self.case == "MDP":  # definite block B first
            F1 = gather(spatial(Ah), B, B, self.torus, row_chunk)
            S2 = lambda: gather(spatial(Zh), P, P, self.torus, row_chunk)
            coupling = lambda: gather(spatial(Gh), P, B, self.torus, row_chunk).T  # G_BP = G_PBᵀ
        else:  # definite block P first
            F1 = gather(spatial(Zh), P, P, self.torus, row_chunk)
            S2 = lambda: gather(spatial(Ah), B, B, self.torus, row_chunk)
            coupling = lambda: gather(spatial(Gh), P, B, self.torus, row_chunk)  # G_PB
        self._qd = QuasiDefiniteFactor(F1, coupling, S2, definite_first="B" if self.case == "MDP" else "P")
        self.cond_est = self._qd.cond_est
        return self._qd.ok

    def info(self) -> dict:
        """Geometry, sizes, conditioning and the algorithm used (for ``SolveResult.info``)."""
        out = {"exact_case": self.case, "torus": self.torus, "padding": self.geo.padding,
               "dilation": self.dilation, "groups": self.groups,
               "boundary_positions": int(self.boundary.size), "ring_positions": int(self.geo.ring.size),
               "ring_entries": int(self.ring.size),
               "capacitance_size": self.m, "capacitance_bytes": self.need_bytes, "solver_method": self.method,
               "tikhonov_lambda": self.lam, "refine": bool(getattr(self, "refine", False)),
               "singular_frequencies": self.singular_freqs,
               "factor_seconds": getattr(self, "factor_seconds", float("nan"))}
        if self._sq is not None:
            out["capacitance_cond_est"] = max(self.cond_est)
            out["square_system_size"] = self.mB  # capacitance_size stays the lifted system's m
            out["algorithm"] = ("square W: W⁻¹ = N_IV − N_IB N_PB⁻¹ N_PV (complementary block of C⁻¹ = N; "
                                "one LU of the boundary block)")
        elif self.method == "capacitance":
            out["capacitance_cond_est"] = max(self.cond_est)
            out["algorithm"] = ("padded capacitance (Schur complement of (CCᵀ)⁻¹ on B, bordered by the ring)"
                                if self.case == "MDP" else
                                "padded capacitance (Woodbury on CᵀC over the ring, Schur on B)")
            if self.lam > 0.0:
                out["algorithm"] += "; Tikhonov lifting + iterated refinement"
        else:
            out["algorithm"] = ("Craig (PCG on W Wᵀ), preconditioner S(CCᵀ)⁻¹Sᵀ" if self.case == "MDP"
                                else "PCGLS, preconditioner Eᵀ(CᵀC)⁻¹E")
        return out

